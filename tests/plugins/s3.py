"""Fixture for a real S3-compatible service: moto's standalone server on loopback (see tests/conftest.py).

`s3_server` (session scope) starts `moto_server` from the venv on a free loopback port, points the standard AWS
environment variables at it for the test session (s3fs / botocore read AWS_ENDPOINT_URL), yields an object with
`.endpoint`, `.fs` (an s3fs filesystem) and `.bucket(name=None) -> "s3://name"` (creates a fresh bucket), and
stops the server by its PID. Skips when moto_server is not installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.needs import skip_or_fail
from tests.ports import free_port


def _moto_server_binary() -> str | None:
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    return shutil.which("moto_server")


class S3Server:
    def __init__(self, endpoint: str, pid: int):
        self.endpoint = endpoint
        self.pid = pid
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            import s3fs

            self._fs = s3fs.S3FileSystem(
                key="testing", secret="testing", client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True
            )
        return self._fs

    def bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return f"s3://{name}"


ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server():
    binary = _moto_server_binary()
    if binary is None:
        skip_or_fail("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"moto-{port}.log"), "wb")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    try:
        deadline = time.time() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with code {proc.returncode} (log: {log.name})")
            try:
                urllib.request.urlopen(endpoint + "/", timeout=1).read()
                break
            except Exception:
                if time.time() > deadline:
                    pytest.fail(f"moto_server did not answer on {endpoint} within 30 s")
                time.sleep(0.1)
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import fsspec

        fsspec.AbstractFileSystem.clear_instance_cache()
        yield S3Server(endpoint, proc.pid)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()  # by PID: the process this fixture started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


class TcpProxy:
    """A TCP forwarder in front of the S3 server whose `outage(seconds)` drops every connection and refuses new
    ones for a while: a real network failure seen by botocore, without losing the server's (in-memory) state."""

    def __init__(self, target: tuple[str, int]):
        import threading

        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.down_until = 0.0
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _reset(self, s: socket.socket) -> None:
        import struct

        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            s.close()
        except OSError:
            pass

    def _accept(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._reset(s)
            with self.lock:
                self.conns -= {src, dst}

    def outage(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for s in conns:
            self._reset(s)

    def restore(self) -> None:
        self.down_until = 0.0

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.outage(0)


class S3Proxy(S3Server):
    """The session's S3 server seen through a TcpProxy: `.outage(s)`, `.restore()`, `.env` for subprocesses."""

    def __init__(self, server: S3Server, proxy: TcpProxy):
        super().__init__(f"http://127.0.0.1:{proxy.port}", server.pid)
        self.proxy, self.direct = proxy, server

    def bucket(self, name: str | None = None) -> str:
        return self.direct.bucket(name)  # created directly: an outage must not break the test's own set-up

    def outage(self, seconds: float) -> None:
        self.proxy.outage(seconds)

    def restore(self) -> None:
        self.proxy.restore()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AWS_ENDPOINT_URL": self.endpoint, "AWS_MAX_ATTEMPTS": "1"}


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """This test talks to S3 through a proxy that can fail (AWS_ENDPOINT_URL points at it for the test)."""
    import s3fs

    host, port = s3_server.endpoint.split("//", 1)[1].split(":")
    proxy = TcpProxy((host, int(port)))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: ours are under test
    s3fs.S3FileSystem.clear_instance_cache()  # each fsspec class caches its own instances
    try:
        yield S3Proxy(s3_server, proxy)
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
