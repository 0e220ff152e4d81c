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


def _moto_server_binary() -> str | None:
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.exists():
        return str(candidate)
    return shutil.which("moto_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = _free_port()
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
            except Exception:  # noqa: BLE001 - not up yet
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
