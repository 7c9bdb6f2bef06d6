"""Start a verifier as a real subprocess on a free loopback port (used by `make demo`, the CLI and tests).

Only the standard library here: a caller without torch (the edge) can launch a local verifier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY_PREFIX = "verifier listening on "
METRICS_PREFIX = "metrics on "


class VerifierProcess:
    """A `python -m cloud serve` child process; a context manager that stops it on exit."""

    def __init__(self, model: str, host: str = "127.0.0.1", extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 120.0):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "cloud", "serve", "--model", str(model), "--host", host, "--port", "0",
               *extra_args]
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.metrics_url: str | None = None  # set when started with --metrics-port
        self.address = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # the server prints its ready line once, then nothing
            if line.startswith(METRICS_PREFIX):
                self.metrics_url = line[len(METRICS_PREFIX):].strip()
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"verifier exited with {self.proc.returncode}: {self.stderr_text()[-2000:]}")
        self.stop()
        raise TimeoutError(f"verifier not ready within {timeout:g} s")

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful stop
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> VerifierProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
