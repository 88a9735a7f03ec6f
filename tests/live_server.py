"""Start `model-gateway serve` as a real process on a free port and wait until it is ready."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).parent.parent


def required_binary(name: str, hint: str) -> str:
    """The path of a program the test needs (on PATH or beside this Python): missing, the
    test fails in CI (`.ci/run` installs it) and is skipped elsewhere."""
    import pytest

    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed ({hint})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """`model-gateway serve` in a child process: started, killed, restarted on its port."""

    def __init__(
        self,
        variants: list[dict[str, Any]] | None = None,
        cwd: Path = ROOT,
        environ: dict[str, str] | None = None,
        **env: str,
    ) -> None:
        """`env`: settings (`MODEL_GATEWAY_` is added to each name); `environ`: other variables
        of the server's environment, as they are."""
        self.port = free_port()
        self._cwd = cwd  # `python -m app` runs the `app` of this tree (benchmarks: A/B)
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_GATEWAY_")}
        self._env.update(environ or {})
        # Tests about keys ask for them; those about draining, for a drain.
        env = {"auth": "off", "drain_s": "0", **env}
        self._env.update({f"MODEL_GATEWAY_{k.upper()}": v for k, v in env.items()})
        if variants is not None:
            self._env["MODEL_GATEWAY_VARIANTS"] = json.dumps(variants)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 120) -> None:
        command = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port)]  # fmt: skip
        self._process = process = subprocess.Popen(command, cwd=self._cwd, env=self._env)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not ready within {ready_timeout_s} s")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used (Linux)."""
        assert self._process is not None
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def terminate(self) -> None:
        """SIGTERM, as an orchestrator stops a container; `wait` for the exit."""
        assert self._process is not None
        self._process.terminate()

    def wait(self, timeout_s: float) -> int:
        assert self._process is not None
        code = self._process.wait(timeout=timeout_s)
        self._process = None
        return code

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


@contextmanager
def live_server(
    variants: list[dict[str, Any]] | None = None, ready_timeout_s: float = 120, **env: str
) -> Iterator[str]:
    server = ServerProcess(variants, **env)
    try:
        server.start(ready_timeout_s)
        yield server.url
    finally:
        server.stop()


def metric_value(base_url: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    text = httpx.get(base_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)
