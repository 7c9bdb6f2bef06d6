"""Child processes that announce readiness with one line on stdout: the verifier, the testbed's relay.

One launcher for every caller (``make demo``, the experiment harness, the testbed, the tests): start
the command, read stdout until the line ``PREFIX address`` appears, keep stderr in a file (a chatty
child never blocks on a full pipe), and stop it with SIGTERM (then SIGKILL) on exit. Standard library
only, so a caller without torch (the edge) can start a local verifier.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERIFIER_READY = "verifier listening on "  # printed by `python -m cloud serve` once it accepts calls
METRICS_READY = "metrics on "  # printed before it when --metrics-port is given


def project_env() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH (children import the project)."""
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


class ChildProcess:
    """A child process that prints ``ready_prefix + address`` once ready; a context manager."""

    def __init__(self, cmd: list[str], ready_prefix: str, timeout: float = 120.0):
        self.cmd = list(cmd)
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=project_env(), stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        self.address = self._wait_ready(ready_prefix, timeout)

    def on_line(self, line: str) -> None:
        """Called with every stdout line before the ready line (subclasses pick up extra facts)."""

    def _wait_ready(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()  # the child prints its ready line once, then nothing
            if line.startswith(prefix):
                return line[len(prefix):].strip()
            self.on_line(line)
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{shlex.join(self.cmd[:8])} exited with {self.proc.returncode}: "
                                   f"{self.stderr_text()[-2000:]}")
        self.stop()
        raise TimeoutError(f"{shlex.join(self.cmd[:8])} not ready within {timeout:g} s")

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a graceful stop (the verifier drains)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class VerifierProcess(ChildProcess):
    """``python -m cloud serve --model MODEL --port 0`` as a child; ``address`` is where it listens.

    ``prefix`` runs it under another command (``ip netns exec NS`` for the testbed).
    """

    def __init__(self, model: str, host: str = "127.0.0.1", extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 120.0, prefix: tuple[str, ...] = ()):
        self.metrics_url: str | None = None  # set when started with --metrics-port
        cmd = [*prefix, sys.executable, "-m", "cloud", "serve", "--model", str(model), "--host", host, "--port",
               "0", *extra_args]
        super().__init__(cmd, VERIFIER_READY, startup_timeout)

    def on_line(self, line: str) -> None:
        if line.startswith(METRICS_READY):
            self.metrics_url = line[len(METRICS_READY):].strip()
