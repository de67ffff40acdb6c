"""Helpers for the labelling tests: a real server in a subprocess, and headless Chromium.

Everything here talks to loopback only. Chromium is Debian's package (installed with
apt-get when missing and we are root), driven through the Python ``playwright``
package; ``playwright install`` is never run (it would download a browser).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--no-proxy-server",  # loopback only, whatever the environment says
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_client(base_url: str, token: str | None = None, timeout: float = 10.0) -> httpx.Client:
    """An httpx client that ignores proxy settings (loopback only)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, trust_env=False)


class LabelServer:
    """``python -m rlhfkit.labelling serve`` on 127.0.0.1 in a subprocess, restartable on the same DB and port."""

    def __init__(self, db: Path, tasks: Path | None = None, *, port: int | None = None, log: Path | None = None, **options):
        self.db = Path(db).resolve()
        self.tasks = Path(tasks).resolve() if tasks is not None else None
        self.port = port or free_port()
        self.options = options
        self.log = Path(log) if log else self.db.with_suffix(".server.log")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "rlhfkit.labelling", "serve", "--db", str(self.db), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.tasks is not None:
            cmd += ["--tasks", str(self.tasks)]
        for key, value in self.options.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        return cmd

    def start(self, timeout: float = 60.0) -> LabelServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("a") as log:
            log.write(f"\n--- start {self.starts + 1}: {' '.join(self.command())}\n")
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        with http_client(self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"label server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    if client.get("/api/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"label server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, like a power cut for the process."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LabelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``python -m rlhfkit.labelling ARGS`` (the same commands as ``rlhfkit label ARGS``)."""
    return subprocess.run(
        [sys.executable, "-m", "rlhfkit.labelling", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def ensure_chromium() -> str:
    """Path of Debian's chromium, installing it with apt-get if missing; skips the test if that is impossible."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and installing it (apt-get install -y chromium) needs root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "chromium"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # a stale package index is the usual cause
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0 or not os.path.exists(CHROMIUM):
        pytest.skip(f"could not install chromium with apt-get: {(result.stderr or result.stdout)[-500:]}")
    return CHROMIUM


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=ensure_chromium(), args=CHROMIUM_ARGS, headless=True)
