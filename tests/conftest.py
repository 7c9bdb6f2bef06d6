"""Shared fixtures: the committed demo pair, and its SLM exported to ONNX once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_PAIR = ROOT / "models" / "demo_pair"


@pytest.fixture(scope="session")
def demo_slm_dir() -> Path:
    return DEMO_PAIR / "slm"


@pytest.fixture(scope="session")
def demo_llm_dir() -> Path:
    return DEMO_PAIR / "llm"


@pytest.fixture(scope="session")
def slm_onnx(tmp_path_factory, demo_slm_dir) -> Path:
    """The demo SLM exported with the project's own export command (fp32)."""
    from models.export import export_model

    out = tmp_path_factory.mktemp("onnx") / "slm"
    export_model(str(demo_slm_dir), out)
    return out


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m ARGS`` from the repo root, as a user would; captures text output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
