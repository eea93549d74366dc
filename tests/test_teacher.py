"""experiments.teacher: the chat client's retries, trace checking, bias correction and resumable generation,
against a scripted OpenAI-style server on 127.0.0.1 (started here; no other traffic)."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from experiments.teacher import (ChatClient, TeacherConfig, TeacherError, check_trace, correction_messages,
                                 generate_traces, kept_traces)
from prompts import build_messages


def answer(rating, user="Likes warm pop songwriting.", tail=""):
    return (f"<analyze user>{user}</analyze user>\n<analyze item>Graceland. [pos] melodies [neg] world music"
            f"</analyze item>\n<match>Mostly a fit.</match>\n<rate>{rating}</rate>{tail}")


def make_example(k, rating=5.0):
    return {
        "example_id": f"ex{k}", "user_id": f"U{k}", "item_id": f"I{k}", "timestamp": 1_300_000_000 + k,
        "rating": rating, "rating_scale": [1, 5],
        "user_history": [
            {"item_id": "H1", "title": "Rumours", "categories": ["CDs & Vinyl", "Pop"], "brand": "Fleetwood Mac",
             "price": 9.99, "rating": 5.0, "timestamp": 1_200_000_000, "summary": "Timeless",
             "text": "Every song is a keeper.", "description": "The 1977 album."},
            {"item_id": "H2", "title": "Kid A", "categories": ["CDs & Vinyl", "Rock"], "brand": "Radiohead",
             "price": 11.49, "rating": 3.0, "timestamp": 1_210_000_000, "summary": "Too cold",
             "text": "Too many electronic textures.", "description": "Fourth studio album."},
        ],
        "user_avg_rating": 4.0,
        "item": {"title": f"Item-{k}", "categories": ["CDs & Vinyl", "World Music"], "brand": "Paul Simon",
                 "price": 12.98, "description": "Recorded with South African musicians."},
        "item_history": [
            {"user_id": "A1", "rating": 5.0, "timestamp": 1_100_000_000, "summary": "Joyful",
             "text": "The rhythms are infectious."},
            {"user_id": "A2", "rating": 4.0, "timestamp": 1_150_000_000, "summary": "Great melodies",
             "text": "A couple of tracks feel like filler."},
        ],
        "item_avg_rating": 4.5,
    }


class Server:
    """A ThreadingHTTPServer whose replies a test scripts: `script` is a list of replies used in order (then
    `default`), each reply a callable(request_json) -> (status, headers, content, delay_s) or such a tuple."""

    def __init__(self, default=None):
        self.script, self.default, self.requests = [], default, []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append({"path": self.path, "json": body, "auth": self.headers.get("Authorization")})
                    reply = owner.script.pop(0) if owner.script else owner.default
                status, headers, content, delay = reply(body) if callable(reply) else reply
                if delay:
                    time.sleep(delay)
                if status == 200:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content,
                                                                   "reasoning_content": "hidden thoughts"}}]})
                else:
                    payload = json.dumps({"error": {"message": content}})
                data = payload.encode()
                try:
                    self.send_response(status)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def cfg_for(server, **kw):
    base = dict(base_url=server.base_url, model="teacher-x", api_key_env="RECZERO_TEST_TEACHER_KEY",
                timeout_s=5.0, max_retries=3, backoff_s=0.01, max_backoff_s=0.05, concurrency=2)
    base.update(kw)
    return TeacherConfig(**base)


MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
OK = (200, None, "hello", 0)


# ---------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------
def test_chat_success_sends_openai_request_and_keeps_only_content(server, monkeypatch):
    monkeypatch.setenv("RECZERO_TEST_TEACHER_KEY", "sk-test")
    server.script = [OK]
    assert ChatClient(cfg_for(server, temperature=0.3, max_tokens=77)).chat(MESSAGES) == "hello"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["json"] == {"model": "teacher-x", "messages": MESSAGES, "temperature": 0.3, "max_tokens": 77}


def test_no_key_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("RECZERO_TEST_TEACHER_KEY", raising=False)
    server.script = [OK]
    ChatClient(cfg_for(server)).chat(MESSAGES)
    assert server.requests[0]["auth"] is None


def test_429_honours_retry_after_then_succeeds(server):
    server.script = [(429, {"Retry-After": "0"}, "slow down", 0), OK]
    client = ChatClient(cfg_for(server, backoff_s=5.0, max_backoff_s=5.0))  # Retry-After 0 beats back-off 5 s
    t0 = time.monotonic()
    assert client.chat(MESSAGES) == "hello"
    assert time.monotonic() - t0 < 2.0
    assert len(server.requests) == 2 and client.requests == 2


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retried(server, status):
    server.script = [(status, None, "oops", 0), OK]
    assert ChatClient(cfg_for(server)).chat(MESSAGES) == "hello"
    assert len(server.requests) == 2


def test_timeout_is_retried(server):
    server.script = [(200, None, "too late", 1.0), OK]
    t0 = time.monotonic()
    assert ChatClient(cfg_for(server, timeout_s=0.3)).chat(MESSAGES) == "hello"
    assert len(server.requests) == 2 and time.monotonic() - t0 < 1.0


def test_400_raises_without_retry(server):
    server.script = [(400, None, "context length exceeded", 0), OK]
    with pytest.raises(TeacherError) as info:
        ChatClient(cfg_for(server)).chat(MESSAGES)
    assert info.value.status == 400 and "context length exceeded" in str(info.value)
    assert len(server.requests) == 1


def test_retries_run_out(server):
    server.default = (503, None, "down", 0)
    with pytest.raises(TeacherError, match="after 3 attempts"):
        ChatClient(cfg_for(server, max_retries=2)).chat(MESSAGES)
    assert len(server.requests) == 3


def test_connection_refused_is_retried_then_raises():
    s = Server()
    url = s.base_url
    s.close()  # nothing listens on the port any more
    cfg = TeacherConfig(base_url=url, model="m", max_retries=1, backoff_s=0.01, timeout_s=1.0)
    with pytest.raises(TeacherError, match="after 2 attempts"):
        ChatClient(cfg).chat(MESSAGES)


# ---------------------------------------------------------------------------------------------------------
# Checking and correcting a trace
# ---------------------------------------------------------------------------------------------------------
def test_check_trace():
    ex = make_example(0, rating=5.0)
    assert check_trace(answer(5), ex, 0.0) == (True, "ok", 5.0)
    keep, reason, rating = check_trace(answer(2), ex, 0.0)
    assert not keep and reason.startswith("wrong_rating") and rating == 2.0
    assert check_trace(answer(4.5), ex, 0.5)[0] and not check_trace(answer(4.5), ex, 0.0)[0]
    for bad in [answer(5, tail=" I hope this helps."), answer(5, user=" "), "<rate>5</rate>", answer(6)]:
        keep, reason, _ = check_trace(bad, ex, 0.0)
        assert not keep and reason.startswith("format"), bad
    # the example's own scale is used: 8 is fine on 1-10
    assert check_trace(answer(8), dict(ex, rating=8.0, rating_scale=[1, 10]), 0.0)[0]


def test_correction_messages_give_the_true_rating():
    msgs = build_messages(make_example(0))
    out = correction_messages(msgs, answer(2), 5.0)
    assert out[:2] == msgs and out[2] == {"role": "assistant", "content": answer(2)}
    assert out[3]["role"] == "user" and "is 5." in out[3]["content"] and "<analyze user>" in out[3]["content"]
    assert len(msgs) == 2  # the input is not changed


# ---------------------------------------------------------------------------------------------------------
# Generating traces
# ---------------------------------------------------------------------------------------------------------
def is_correction(body):
    return len(body["messages"]) > 2


def by_title(ratings, corrected=None):
    """A reply function: the rating for the example whose item title is in the prompt (Item-k -> ratings[k])."""
    def reply(body):
        if is_correction(body):
            return 200, None, corrected, 0
        user = body["messages"][1]["content"]
        k = next(k for k in sorted(ratings, reverse=True) if f"Item-{k}\n" in user)
        r = ratings[k]
        return 200, None, r if isinstance(r, str) else answer(r), 0
    return reply


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_keeps_first_pass_and_writes_records(server, tmp_path):
    server.default = by_title({0: 5, 1: "no tags at all 5"})
    out = tmp_path / "traces.jsonl"
    stats = generate_traces([make_example(0), make_example(1)], cfg_for(server), out, verbose=False)
    recs = {r["example_id"]: r for r in lines(out)}
    assert recs["ex0"]["kept"] and recs["ex0"]["stage"] == "first" and recs["ex0"]["rating"] == 5.0
    assert recs["ex0"]["source"] == "teacher:teacher-x" and recs["ex0"]["label"] == 5.0
    assert recs["ex0"]["prompt_messages"] == build_messages(make_example(0))
    assert not recs["ex1"]["kept"] and recs["ex1"]["stage"] == "rejected" and recs["ex1"]["reason"].startswith("format")
    assert stats["first_kept"] == 1 and stats["rejected"]["format"] == 1 and stats["corrections"] == 0
    assert len(server.requests) == 2  # a format failure is not corrected
    assert [r["example_id"] for r in kept_traces(out)] == ["ex0"]


def test_bias_correction(server, tmp_path):
    server.default = by_title({0: 2}, corrected=answer(5))
    out = tmp_path / "traces.jsonl"
    stats = generate_traces([make_example(0, rating=5.0)], cfg_for(server), out, verbose=False)
    assert len(server.requests) == 2
    second = server.requests[1]["json"]["messages"]
    assert second[2] == {"role": "assistant", "content": answer(2)} and "is 5." in second[3]["content"]
    (rec,) = lines(out)
    assert rec["kept"] and rec["stage"] == "corrected" and rec["completion"] == answer(5)
    assert rec["first_completion"] == answer(2) and rec["first_reason"].startswith("wrong_rating")
    assert stats["corrected_kept"] == 1 and stats["first_kept"] == 0 and stats["kept"] == 1


def test_failed_correction_and_no_correction(server, tmp_path):
    server.default = by_title({0: 2}, corrected=answer(3))
    stats = generate_traces([make_example(0)], cfg_for(server), tmp_path / "a.jsonl", verbose=False)
    (rec,) = lines(tmp_path / "a.jsonl")
    assert not rec["kept"] and rec["stage"] == "rejected" and "wrong_rating" in rec["reason"]
    assert stats["rejected"]["wrong_rating"] == 1 and stats["corrections"] == 1
    n = len(server.requests)
    generate_traces([make_example(0)], cfg_for(server, bias_correction=False), tmp_path / "b.jsonl", verbose=False)
    assert len(server.requests) == n + 1


def test_tolerance(server, tmp_path):
    server.default = by_title({0: 4.5})
    stats = generate_traces([make_example(0)], cfg_for(server, tolerance=0.5), tmp_path / "t.jsonl", verbose=False)
    assert stats["first_kept"] == 1 and len(server.requests) == 1
    assert lines(tmp_path / "t.jsonl")[0]["rating"] == 4.5


def test_resume_asks_only_new_examples(server, tmp_path):
    server.default = by_title({k: 5 for k in range(5)})
    out = tmp_path / "traces.jsonl"
    examples = [make_example(k) for k in range(5)]
    generate_traces(examples[:3], cfg_for(server), out, verbose=False)
    assert len(server.requests) == 3
    stats = generate_traces(examples, cfg_for(server), out, verbose=False)
    assert len(server.requests) == 5 and stats["skipped"] == 3 and stats["asked"] == 2
    assert sorted(r["example_id"] for r in lines(out)) == [f"ex{k}" for k in range(5)]


def test_truncated_last_line_is_redone(server, tmp_path):
    server.default = by_title({k: 5 for k in range(3)})
    out = tmp_path / "traces.jsonl"
    examples = [make_example(k) for k in range(3)]
    generate_traces(examples[:2], cfg_for(server, concurrency=1), out, verbose=False)
    text = out.read_text()
    last = text.splitlines()[-1]
    out.write_text(text[: len(text) - len(last) // 2 - 1])  # crash in the middle of the second line
    assert len(kept_traces(out)) == 1
    cut_id = json.loads(last)["example_id"]
    stats = generate_traces(examples, cfg_for(server), out, verbose=False)
    assert stats["skipped"] == 1 and stats["asked"] == 2 and len(server.requests) == 4
    recs = lines(out)  # every line parses again
    assert sorted(r["example_id"] for r in recs) == ["ex0", "ex1", "ex2"] and cut_id in {"ex0", "ex1"}


def test_errors_are_counted_not_written(server, tmp_path):
    def reply(body):
        return (400, None, "bad", 0) if "Item-1\n" in body["messages"][1]["content"] else (200, None, answer(5), 0)
    server.default = reply
    out = tmp_path / "traces.jsonl"
    examples = [make_example(0), make_example(1), make_example(0)]  # a duplicate id is asked once
    stats = generate_traces(examples, cfg_for(server), out, verbose=False)
    assert stats["rejected"]["error"] == 1 and stats["kept"] == 1 and stats["duplicates"] == 1
    assert [r["example_id"] for r in lines(out)] == ["ex0"]
    server.default = (200, None, answer(5), 0)
    stats = generate_traces(examples[:2], cfg_for(server), out, verbose=False)  # the failed one is asked again
    assert stats["asked"] == 1 and stats["kept"] == 1 and len(lines(out)) == 2


def test_concurrency_is_bounded(server, tmp_path):
    active, peak, lock = [0], [0], threading.Lock()

    def reply(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return 200, None, answer(5), 0
    server.default = reply
    stats = generate_traces([make_example(k) for k in range(8)], cfg_for(server, concurrency=3),
                            tmp_path / "c.jsonl", verbose=False)
    assert stats["kept"] == 8 and 1 < peak[0] <= 3
