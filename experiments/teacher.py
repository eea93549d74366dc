"""RecOne's cold-start data: reasoning traces from a teacher LLM behind an OpenAI-compatible chat API.

docs/paper.md ("RecOne"): about 1,000 traces from a stronger teacher (DeepSeek-R1 in the paper) feed a short SFT
before GRPO. For every example the teacher gets the same [system, user] prompt the policy sees
(`prompts.build_messages`). Its answer is kept when it passes the strict format rule (`prompts.parse_completion`
with the example's rating scale) and its rating is within `tolerance` of the label. **Bias correction**: when the
format is right but the rating is wrong, the teacher is told the true rating and asked to rewrite its answer,
same format, with reasoning consistent with that rating; the rewrite goes through the same check.

Decisions:
- One JSON line per example is appended to the output file as soon as the example is done, by the main thread
  only (workers ask the teacher and check; they never write). A rerun skips every `example_id` already in the
  file, so nothing is asked twice; a partial last line (a crash mid-write) is cut off and that example redone.
- An example whose request fails for good (`TeacherError`: a 4xx other than 429, or retries used up) is counted
  under `rejected["error"]` but NOT written, so the next run asks again: failures of the server are not
  verdicts on the example.
- A repeated `example_id` in the input is asked once (later copies count as `duplicates`).
- Only `message.content` is used; a reasoning server's `reasoning_content` (R1's hidden chain of thought) is
  dropped, because the SFT target is the four-tag answer itself. A null content becomes "" (a format failure).
- Standard library HTTP only (urllib); retries with exponential back-off, honouring `Retry-After`.
- Redirects are not followed: the request carries the API key, and a redirect may lead to another host. A 3xx is
  a TeacherError naming its Location (set --base-url to the final address).
- `timeout_s` bounds each request as a whole (connect, headers and body): a watchdog closes the connection at
  the deadline, so a server that drips a byte a second times out too (and is retried).
- A broken connection (http.client's IncompleteRead, BadStatusLine, RemoteDisconnected, ...) is retried like a
  timeout.
- The CLI exits 1, with a message, when examples were asked and none got an answer (every one failed).

CLI: `python -m experiments.teacher --examples data/amazon-music/train.jsonl --out runs/teacher/traces.jsonl
--model deepseek-reasoner --base-url https://api.deepseek.com/v1 --limit 1000`.
"""
from __future__ import annotations

import argparse
import email.utils
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prompts import build_messages, parse_completion
from prompts.templates import rating_scale

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_TOL_EPS = 1e-9  # float noise: 5 - 4.5 must count as 0.5


@dataclass
class TeacherConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI-compatible API root; requests go to {base_url}/chat/completions."""
    model: str = "deepseek-reasoner"
    """Model name sent with each request; also recorded as source "teacher:<model>"."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key, read once when the client is built; unset = no auth header."""
    temperature: float = 0.6
    """Sampling temperature of the teacher."""
    max_tokens: int = 2048
    """Completion length limit per request (a reasoning model's hidden thinking may count against it)."""
    timeout_s: float = 120.0
    """Deadline of one request as a whole (connect, headers, body), in seconds; a timeout is retried."""
    max_retries: int = 5
    """Retries after the first attempt (429, 500, 502, 503, 504, timeouts, connection errors)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled on each further retry."""
    max_backoff_s: float = 30.0
    """Cap on any single wait, also on a server's Retry-After."""
    concurrency: int = 4
    """Examples in flight at once (threads)."""
    tolerance: float = 0.0
    """A trace is kept when |rating - label| <= tolerance (0 = the exact label)."""
    bias_correction: bool = True
    """Ask once more, giving the true rating, when the first answer is well formed but its rating is wrong."""


class TeacherError(RuntimeError):
    """A request that failed for good: a non-retryable status, or the retries ran out."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Deadline:
    """Shuts down every socket of one request when its time is up (started by `arm`, stopped by `disarm`).

    A socket timeout bounds one read, not a response: a server sending a byte a second would never time out.
    The watchdog shuts the socket down at the deadline instead, which ends any read in progress. The socket is
    recorded when it connects: urllib drops the connection's reference to it once the headers are in, while the
    response goes on reading the body from it.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def connection_class(self, base):
        """`base` (HTTPConnection or HTTPSConnection) whose sockets are recorded for the watchdog."""
        deadline = self

        def make(*args, **kwargs):
            conn = base(*args, **kwargs)
            connect = conn.connect

            def watched_connect():
                connect()
                with deadline._lock:
                    deadline._sockets.append(conn.sock)
                    if deadline.expired:
                        _shutdown(conn.sock)
            conn.connect = watched_connect
            return conn
        return make

    def arm(self) -> None:
        self._timer.start()

    def disarm(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket | None) -> None:
    """End the reads in progress on `sock` (from another thread). The plain socket's shutdown acts on the
    descriptor, also for an SSL socket (whose state it leaves alone) and after urllib has `close()`d it."""
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watched:
    """Mixed into urllib's HTTP and HTTPS handlers: their connections run under the request's deadline."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self._deadline.connection_class(http_class), req, **kwargs)


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect (the request carries the API key): the 3xx reaches the caller as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ChatClient:
    """A minimal, thread-safe client of an OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._lock = threading.Lock()
        self.requests = 0
        """HTTP requests sent so far, retries included."""

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _wait(self, attempt: int, retry_after: float | None) -> None:
        delay = self.cfg.backoff_s * (2 ** attempt) if retry_after is None else retry_after
        time.sleep(min(max(0.0, delay), self.cfg.max_backoff_s))

    def _send(self, request: urllib.request.Request) -> tuple[int, Any, bytes]:
        """One attempt: (status, headers, body), everything received within `timeout_s` (the watchdog). A 2xx or
        any error status is returned; a broken connection or the deadline raises (OSError or HTTPException)."""
        deadline = _Deadline(self.cfg.timeout_s)
        opener = urllib.request.build_opener(_NoRedirect(), _WatchedHTTP(deadline), _WatchedHTTPS(deadline))
        deadline.arm()
        try:
            try:
                with opener.open(request, timeout=self.cfg.timeout_s) as response:
                    status, headers, raw = response.status, response.headers, response.read()
            except urllib.error.HTTPError as exc:  # an error status (3xx included: redirects are not followed)
                status, headers = exc.code, exc.headers
                raw = exc.read() if exc.fp is not None else b""
        except (OSError, http.client.HTTPException):
            if deadline.expired:
                raise TimeoutError(f"no complete response within {self.cfg.timeout_s:g} s") from None
            raise
        finally:
            deadline.disarm()
        if deadline.expired:  # the watchdog ended a read: what arrived may be cut short
            raise TimeoutError(f"no complete response within {self.cfg.timeout_s:g} s")
        return status, headers, raw

    def chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The assistant's `content` for `messages`. Raises TeacherError when the request fails for good."""
        payload = json.dumps({"model": self.cfg.model, "messages": [dict(m) for m in messages],
                              "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}).encode()
        last, retry_after = "", None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._wait(attempt - 1, retry_after)
            retry_after = None
            request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
            with self._lock:
                self.requests += 1
            try:
                status, headers, raw = self._send(request)
            except (OSError, http.client.HTTPException) as exc:
                # Timeouts, refused or reset connections, and broken responses (http.client's IncompleteRead,
                # BadStatusLine, RemoteDisconnected) are retried.
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
                continue
            if 200 <= status < 300:
                return _content(raw, self.url)
            if 300 <= status < 400:
                location = headers.get("Location") if headers else None
                raise TeacherError(f"teacher request to {self.url} was redirected (HTTP {status}) to "
                                   f"{location or '(no Location header)'}; redirects are not followed, so the API "
                                   f"key never goes to another address: set --base-url to the final address",
                                   status, location or "")
            body = _snippet(raw)
            if status not in RETRY_STATUSES:
                raise TeacherError(f"teacher request failed: HTTP {status} from {self.url}: {body}", status, body)
            retry_after = _retry_after(headers.get("Retry-After") if headers else None)
            last = f"HTTP {status}: {body}"
        raise TeacherError(f"teacher request failed after {self.cfg.max_retries + 1} attempts to {self.url}; "
                           f"last error: {last}", None, last)


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _content(raw: bytes, url: str) -> str:
    """choices[0].message.content of a response body (reasoning_content is ignored)."""
    try:
        content = json.loads(raw)["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise TeacherError(f"unexpected response from {url}: {_snippet(raw)}", 200, _snippet(raw)) from None
    return content if isinstance(content, str) else ""


def _fmt(x: float) -> str:
    return f"{x:g}"


def correction_messages(messages: Sequence[Mapping[str, str]], first_answer: str,
                        label: float) -> list[dict[str, str]]:
    """The original conversation, the teacher's first answer, and a turn giving the true rating and asking for a
    rewrite in the same format whose reasoning leads to that rating."""
    turn = (f"The rating this user actually gave the target item is {_fmt(float(label))}. "
            "Rewrite your whole answer so that it ends with exactly this rating and so that the analysis "
            "explains, from the user's history and the item's details, why this user would give it. "
            "Do not mention that you were told the rating. Use exactly the same format as before: the four "
            "tagged steps <analyze user>, <analyze item>, <match> and <rate>, each exactly once and in that "
            f"order, nothing before the first tag or after </rate>, and only the number {_fmt(float(label))} "
            "inside <rate> </rate>.")
    return [dict(m) for m in messages] + [{"role": "assistant", "content": first_answer},
                                          {"role": "user", "content": turn}]


def check_trace(text: str, example: Mapping[str, Any], tolerance: float = 0.0,
                template: str = "tbr") -> tuple[bool, str, float | None]:
    """(keep, reason, rating): keep a well-formed answer whose rating is within `tolerance` of the label.

    reason is "ok", "format: <parser error>" or "wrong_rating: <rating> vs label <label>".
    """
    lo, hi = rating_scale(example)
    parsed = parse_completion(text, template=template, rating_min=lo, rating_max=hi)
    if not parsed.format_ok:
        return False, f"format: {parsed.error}", parsed.rating
    label = float(example["rating"])
    if abs(parsed.rating - label) > tolerance + _TOL_EPS:
        return False, f"wrong_rating: {_fmt(parsed.rating)} vs label {_fmt(label)}", parsed.rating
    return True, "ok", parsed.rating


def example_id(example: Mapping[str, Any]) -> str:
    """The example's id (as experiments.task names it)."""
    eid = example.get("example_id")
    if eid:
        return str(eid)
    return f"{example['user_id']}|{example['item_id']}|{example['timestamp']}"


def _read_done(path: Path) -> set[str]:
    """Ids already in the trace file. A partial last line is cut off the file; a bad line elsewhere raises."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    done: set[str] = set()
    good_end = 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1  # text after the final newline: empty, or a line cut mid-write
        if line.strip():
            try:
                record = json.loads(line)
                eid = str(record["example_id"])
            except (ValueError, KeyError, TypeError):
                record = None
            if record is None or last:
                if last:
                    break
                raise ValueError(f"{path}: line {i + 1} is not a trace record; fix or remove it")
            done.add(eid)
        if not last:
            good_end += len(line) + 1
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return done


def _one(example: Mapping[str, Any], messages: list[dict[str, str]], cfg: TeacherConfig, client: ChatClient,
         template: str) -> dict[str, Any]:
    """Ask, check, maybe correct: the record to write (raises TeacherError)."""
    label = float(example["rating"])
    first = client.chat(messages)
    keep, reason, rating = check_trace(first, example, cfg.tolerance, template)
    record = {"example_id": example_id(example), "prompt_messages": messages, "completion": first,
              "rating": rating, "label": label, "kept": keep, "stage": "first" if keep else "rejected",
              "reason": reason, "source": f"teacher:{cfg.model}", "first_completion": None,
              "first_reason": None}
    if keep or not (cfg.bias_correction and reason.startswith("wrong_rating")):
        return record
    second = client.chat(correction_messages(messages, first, label))
    keep2, reason2, rating2 = check_trace(second, example, cfg.tolerance, template)
    record.update(completion=second, rating=rating2, kept=keep2, stage="corrected" if keep2 else "rejected",
                  reason=reason2 if keep2 else f"after correction, {reason2}", first_completion=first,
                  first_reason=reason)
    return record


def generate_traces(examples: Iterable[Mapping[str, Any]], cfg: TeacherConfig, out_path: str | Path,
                    client: ChatClient | None = None, template: str = "tbr", verbose: bool = True) -> dict:
    """Ask the teacher about every example not yet in `out_path`, appending one JSON line per example as soon as
    it is done (module docstring). Returns the run's counts (also printed unless verbose=False)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    client = client or ChatClient(cfg)
    done = _read_done(out_path)
    examples = list(examples)
    stats: dict[str, Any] = {"requested": len(examples), "skipped": 0, "duplicates": 0, "asked": 0,
                             "first_kept": 0, "corrections": 0, "corrected_kept": 0, "kept": 0,
                             "rejected": {"format": 0, "wrong_rating": 0, "error": 0}, "errors": []}
    todo, seen = [], set()
    for ex in examples:
        eid = example_id(ex)
        if eid in done:
            stats["skipped"] += 1
        elif eid in seen:
            stats["duplicates"] += 1
        else:
            seen.add(eid)
            todo.append(ex)
    requests_before = client.requests
    with open(out_path, "a", encoding="utf-8") as out, \
            ThreadPoolExecutor(max_workers=max(1, cfg.concurrency)) as pool:
        futures = {pool.submit(_one, ex, build_messages(ex, template=template), cfg, client, template): ex
                   for ex in todo}
        for future in as_completed(futures):
            stats["asked"] += 1
            try:
                record = future.result()
            except TeacherError as exc:
                stats["rejected"]["error"] += 1
                if len(stats["errors"]) < 10:
                    stats["errors"].append(f"{example_id(futures[future])}: {exc}")
                continue
            if record["first_completion"] is not None:
                stats["corrections"] += 1
            if record["kept"]:
                stats["kept"] += 1
                stats["first_kept" if record["stage"] == "first" else "corrected_kept"] += 1
            else:
                key = "format" if "format:" in record["reason"] else "wrong_rating"
                stats["rejected"][key] += 1
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    stats["http_requests"] = client.requests - requests_before
    if verbose:
        r = stats["rejected"]
        print(f"teacher traces -> {out_path}: {stats['requested']} requested, {stats['skipped']} skipped "
              f"(already done), {stats['asked']} asked; kept {stats['kept']} (first pass {stats['first_kept']}, "
              f"after correction {stats['corrected_kept']} of {stats['corrections']}); rejected: format "
              f"{r['format']}, wrong rating {r['wrong_rating']}, error {r['error']}", flush=True)
        for line in stats["errors"]:
            print(f"  error: {line}", file=sys.stderr)
    return stats


def kept_traces(path: str | Path) -> list[dict[str, Any]]:
    """The kept records of a trace file, in file order (for the SFT stage); a partial last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kept"):
            kept.append(record)
    return kept


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", required=True, help="a JSONL file of prepared examples (recdata)")
    ap.add_argument("--out", required=True, help="trace file (JSONL); resumed if it exists")
    ap.add_argument("--limit", type=int, default=0, help="use the first N examples (0 = all)")
    ap.add_argument("--template", default="tbr")
    for f in fields(TeacherConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                        type=(lambda s: s.lower() in ("1", "true", "yes")) if f.type in (bool, "bool")
                        else type(f.default))
    args = ap.parse_args(argv)
    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in fields(TeacherConfig)})
    examples = []
    with open(args.examples, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                examples.append(json.loads(line))
                if args.limit and len(examples) >= args.limit:
                    break
    return generate_traces(examples, cfg, args.out, template=args.template)


def exit_code(stats: Mapping[str, Any]) -> int:
    """1 when examples were asked and every one failed (no answer at all), else 0; says so on stderr."""
    if stats["asked"] and stats["rejected"]["error"] == stats["asked"]:
        first = stats["errors"][0] if stats["errors"] else ""
        print(f"error: no example succeeded: all {stats['asked']} failed (first error: {first})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
