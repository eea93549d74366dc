"""experiments.teacher against misbehaving servers on 127.0.0.1 (started here, in threads; no other traffic):
redirects are not followed with the key, a dripping server hits the request's deadline, broken responses are
retried, and a run in which no example succeeded exits non-zero. Every test is bounded to a few seconds."""
import json
import re
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments.teacher import ChatClient, TeacherConfig, TeacherError, exit_code, generate_traces

from test_teacher import MESSAGES, Server, answer, cfg_for, make_example

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-secret-test-key"


def ok_response(content="hello") -> bytes:
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body)) + body


class RawServer:
    """A TCP server whose replies are raw bytes: `script` holds one function(socket) per connection, in order
    (then `default`). Every request's method, path and headers are recorded."""

    def __init__(self, script=(), default=None):
        self.script, self.default, self.requests = list(script), default or send(ok_response()), []
        self.lock, self.stop = threading.Lock(), threading.Event()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    body += self.request.recv(65536)
                with owner.lock:
                    owner.requests.append(head.decode("latin-1"))
                    reply = owner.script.pop(0) if owner.script else owner.default
                try:
                    reply(self.request, owner.stop)
                except OSError:
                    pass  # the client hung up

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.port = self.server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send(data: bytes):
    def reply(sock, stop):
        sock.sendall(data)
    return reply


def drip(data: bytes, every_s: float = 0.1, at_most_s: float = 3.0):
    """Send `data` one byte at a time: each read of the client gets a byte well within its socket timeout."""
    def reply(sock, stop):
        end = time.monotonic() + at_most_s
        for k in range(len(data)):
            if stop.is_set() or time.monotonic() > end:
                return
            sock.sendall(data[k:k + 1])
            time.sleep(every_s)
    return reply


@pytest.fixture
def raw():
    servers = []

    def make(*args, **kwargs):
        servers.append(RawServer(*args, **kwargs))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def config(base_url, **kw):
    base = dict(base_url=base_url, model="m", api_key_env="RECZERO_TEST_TEACHER_KEY", timeout_s=1.0, max_retries=1,
                backoff_s=0.01, max_backoff_s=0.05, concurrency=2)
    return TeacherConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------
# Redirects: never followed (before: a 302 was followed to another host, the API key with it)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_error_names_its_location(server, raw, monkeypatch, status):
    monkeypatch.setenv("RECZERO_TEST_TEACHER_KEY", KEY)
    elsewhere = raw()
    location = f"http://localhost:{elsewhere.port}/steal/chat/completions"
    server.script = [(status, {"Location": location}, "moved", 0)]
    with pytest.raises(TeacherError) as info:
        ChatClient(cfg_for(server)).chat(MESSAGES)
    assert location in str(info.value) and f"HTTP {status}" in str(info.value) and info.value.status == status
    assert KEY not in str(info.value)
    assert elsewhere.requests == []  # nothing reached the other host, key or not
    assert len(server.requests) == 1 and server.requests[0]["auth"] == f"Bearer {KEY}"  # and no retry


# ----------------------------------------------------------------------------------------------------
# A total deadline per request (before: timeout_s bounded each read, and a drip never timed out)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_dripping_server_hits_the_deadline_and_is_retried(raw, where):
    response = ok_response("x" * 200)
    head, _, body = response.partition(b"\r\n\r\n")
    dripping = (lambda sock, stop: (sock.sendall(head + b"\r\n\r\n"), drip(body)(sock, stop))) if where == "body" \
        else drip(response)
    s = raw(script=[dripping, dripping])
    client = ChatClient(config(s.base_url, timeout_s=0.5, max_retries=1))
    start = time.monotonic()
    with pytest.raises(TeacherError, match=r"after 2 attempts.*no complete response within 0\.5 s"):
        client.chat(MESSAGES)
    assert time.monotonic() - start < 2.0  # 2 attempts x 0.5 s, plus a short back-off
    assert len(s.requests) == 2


def test_the_deadline_leaves_a_prompt_answer_alone(raw):
    s = raw()
    assert ChatClient(config(s.base_url, timeout_s=0.5)).chat(MESSAGES) == "hello"


# ----------------------------------------------------------------------------------------------------
# Broken responses are retried (before: IncompleteRead / BadStatusLine crashed the whole command)
# ----------------------------------------------------------------------------------------------------

BROKEN = {
    "IncompleteRead": send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{\"choices\""),
    "BadStatusLine": send(b"garbage, not HTTP\r\n\r\n"),
    "RemoteDisconnected": send(b""),
    "LineTooLong": send(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_response_is_retried(raw, kind):
    s = raw(script=[BROKEN[kind]])
    client = ChatClient(config(s.base_url))
    assert client.chat(MESSAGES) == "hello"
    assert len(s.requests) == 2 and client.requests == 2


def test_broken_responses_until_the_retries_run_out(raw):
    s = raw(default=BROKEN["IncompleteRead"])
    with pytest.raises(TeacherError, match=r"after 3 attempts.*IncompleteRead"):
        ChatClient(config(s.base_url, max_retries=2)).chat(MESSAGES)


def test_generate_survives_broken_responses(raw, tmp_path):
    s = raw(script=[BROKEN["BadStatusLine"], BROKEN["IncompleteRead"]], default=send(ok_response(answer(5))))
    stats = generate_traces([make_example(0), make_example(1)], config(s.base_url, max_retries=3),
                            tmp_path / "t.jsonl", verbose=False)
    assert stats["kept"] == 2 and stats["rejected"]["error"] == 0


# ----------------------------------------------------------------------------------------------------
# No example succeeded: a non-zero exit (before: 0)
# ----------------------------------------------------------------------------------------------------

def test_the_command_exits_1_when_every_example_failed(server, tmp_path):
    server.default = (400, None, "model not found", 0)
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(make_example(k)) + "\n" for k in range(2)))
    argv = [sys.executable, "-m", "experiments.teacher", "--examples", str(examples), "--out",
            str(tmp_path / "traces.jsonl"), "--base-url", server.base_url, "--model", "m", "--max-retries", "0",
            "--api-key-env", "RECZERO_TEST_TEACHER_KEY"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "error: no example succeeded: all 2 failed" in done.stderr and "model not found" in done.stderr


def test_exit_code_counts_any_answer_as_success():
    stats = {"asked": 3, "rejected": {"error": 2, "format": 1, "wrong_rating": 0}, "errors": ["ex0: boom"]}
    assert exit_code(stats) == 0  # a rejected answer is still an answer
    assert exit_code({**stats, "rejected": {"error": 3, "format": 0, "wrong_rating": 0}}) == 1
    assert exit_code({"asked": 0, "rejected": {"error": 0}, "errors": []}) == 0  # all done before: nothing to ask
