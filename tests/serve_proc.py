"""A real `ladr-rt serve` process on 127.0.0.1 (an ephemeral port) and raw-socket clients, shared by
tests/test_serve_hostile.py and the server section of tests/hostile_sweep.py. Not a test module."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ladr_rt.cli"]
ROUTE = "/v1/images/generations"


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.pop("LADR_RT_API_KEY", None)
    e.update(extra)
    return e


class ServeProc:
    """``ladr-rt serve --port 0 --device cpu ARGS``; ``wait_ready`` blocks until its ready line."""

    def __init__(self, *args, extra_env: dict | None = None, cli: list[str] | None = None):
        self.argv = (cli or CLI) + ["serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *map(str, args)]
        self.p = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env(**(extra_env or {})), cwd=ROOT)
        self.lines: list[str] = []
        self.port: int | None = None
        self._out = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        threading.Thread(target=lambda: self._out.append(self.p.stdout.read()), daemon=True).start()

    def _read(self):
        for ln in self.p.stderr:
            self.lines.append(ln.rstrip("\n"))
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", ln)
            if m:
                self.port = int(m.group(1))

    def wait_ready(self, timeout: float = 180) -> "ServeProc":
        deadline = time.monotonic() + timeout
        while not any(" ready: " in ln for ln in self.lines):
            if self.p.poll() is not None:
                self._t.join(5)
                raise AssertionError(f"serve exited {self.p.returncode}: {self.stderr}")
            assert time.monotonic() < deadline, f"serve not ready in {timeout} s: {self.stderr}"
            time.sleep(0.05)
        return self

    def wait(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        self._t.join(5)
        return rc

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)
            raise AssertionError(f"serve did not stop within {timeout} s of {sig!r}: {self.stderr}") from None

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    # ------------------------------------------------------------------ clients

    def connect(self, timeout: float = 60) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s

    def send(self, body: bytes | dict, headers: dict | None = None, path: str = ROUTE, method: str = "POST",
             content_length: bool = True) -> socket.socket:
        """Sends a request on a new connection and returns it (unread): the caller reads the
        answer with ``answer`` or hangs up."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        h = {"Host": "127.0.0.1", "Content-Type": "application/json", **(headers or {})}
        if content_length:
            h["Content-Length"] = str(len(raw))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        s = self.connect()
        s.sendall(head.encode("latin-1") + raw)
        return s

    def request(self, body: bytes | dict, headers: dict | None = None, timeout: float = 120, **kw):
        s = self.send(body, headers, **kw)
        s.settimeout(timeout)
        try:
            return answer(s)
        finally:
            s.close()

    def metric(self, name: str) -> float:
        s = self.send(b"", method="GET", path="/metrics", content_length=False)
        try:
            status, _, body = answer(s)
        finally:
            s.close()
        for ln in body.decode().splitlines():
            if ln.startswith(name + " "):
                return float(ln.split()[1])
        raise AssertionError(f"no metric {name}")

    def until(self, cond, timeout: float = 60, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.p.poll() is None, f"serve died ({self.p.returncode}) waiting for {what}: {self.stderr}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.stderr}"
            time.sleep(0.05)


def one_running_one_queued(s: ServeProc) -> tuple[socket.socket, socket.socket]:
    """On a one-slot server: client a in the slot, client b waiting behind it; both left open."""
    a = s.send({"prompt": "a"})
    s.until(lambda: s.metric("ladr_rt_busy_slots") == 1, what="a running")
    b = s.send({"prompt": "b"})
    s.until(lambda: s.metric("ladr_rt_queue_depth") == 1, what="b queued")
    return a, b


# The two waits of hang_up_behind_the_head that test the server (the others only set the scene).
LEFT_THE_QUEUE, TOOK_ITS_PLACE = "c to leave the queue", "d queued where c was"


def hang_up_behind_the_head(s: ServeProc) -> tuple[socket.socket, ...]:
    """A queued client c, not at the head, hangs up: its request must leave the queue
    (``LEFT_THE_QUEUE``), and the next client d must take its place, with no spurious 429
    (``TOOK_ITS_PLACE``); each failure is the AssertionError of ``until`` naming that wait.
    Returns the clients a (running), b and d (queued), left open."""
    a, b = one_running_one_queued(s)
    c = s.send({"prompt": "c"})
    s.until(lambda: s.metric("ladr_rt_queue_depth") == 2, what="c queued")
    c.close()
    s.until(lambda: s.metric("ladr_rt_queue_depth") == 1, timeout=10, what=LEFT_THE_QUEUE)
    d = s.send({"prompt": "d"})
    s.until(lambda: s.metric("ladr_rt_queue_depth") == 2, timeout=10, what=TOOK_ITS_PLACE)
    return a, b, d


def answer(s: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers (lower-case names), body) of one HTTP/1.1 response on ``s``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response ({buf[:200]!r})")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:n]
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += s.recv(65536)
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            while len(rest) < n + 2:
                rest += s.recv(65536)
            body, rest = body + rest[:n], rest[n + 2:]
            if n == 0:
                return status, headers, body
    return status, headers, rest


def error_of(status: int, headers: dict, body: bytes) -> dict:
    """The OpenAI error object of a response (asserting its shape)."""
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    return e


# The server's access log: one line per request (ladr_rt/serve/app.py ACCESS_LOGGER), e.g.
# "ladr-rt serve: 127.0.0.1 POST /v1/images/generations 200 0.392s n=1".
ACCESS_LINE = re.compile(r"^ladr-rt serve: \S+ [A-Z]+ /\S* \d{3} [\d.]+s n=")


def problems(stderr: str) -> list[str]:
    """Lines in a server's stderr that a hostile client must never cause."""
    return [ln for ln in stderr.splitlines() if re.search(r"Traceback|Exception in|Error:|terminate called|"
                                                          r"Task exception|never retrieved|Cancel \d+ running", ln)]
