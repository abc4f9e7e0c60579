"""A local S3 endpoint (moto_server on 127.0.0.1) for tests and the loader benchmark; not for production data."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(port: int | None = None, timeout: float = 30.0, attempts: int = 5) -> tuple[subprocess.Popen, str]:
    """Start `moto_server -H 127.0.0.1 -p PORT` and wait until it answers HTTP; returns (process, URL).

    Without ``port``, a free one is picked; another process can take it before moto binds it, so a server that
    exits at once is retried on a new port (``attempts`` times)."""
    for attempt in range(attempts if port is None else 1):
        try:
            return _start_moto_server(port or free_port(), timeout)
        except RuntimeError as err:
            if "exited" not in str(err) or attempt == attempts - 1 or port is not None:
                raise
    raise AssertionError("unreachable")


def _start_moto_server(port: int, timeout: float) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        raise RuntimeError("moto_server not found: pip install 'moto[server]' into the venv")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode} on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                if s.recv(16).startswith(b"HTTP/"):
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout} s")


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
