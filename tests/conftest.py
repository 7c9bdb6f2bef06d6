"""Shared fixtures: the committed demo pair, and its SLM exported to ONNX once per test session.

Also the ``integration`` marker (``make test-fast`` deselects it): every test that starts a process
(a verifier, a CLI run) or loads a real model. It is applied here, at collection, so no test can forget
it: a test is integration if its module is listed in ``INTEGRATION_MODULES``, if it uses (directly or
through other fixtures) one of ``INTEGRATION_FIXTURES``, or if its own body calls ``run_module`` or
``subprocess``.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_PAIR = ROOT / "models" / "demo_pair"

# Modules whose tests all share a started verifier, an exported model or a real LLM.
INTEGRATION_MODULES = {
    "test_batching",  # the real engine on the demo LLM, in-process, many sessions
    "test_bench_smoke",  # builds and exports a model
    "test_coarse",  # the real engine on the demo LLM
    "test_demo_pair",
    "test_demo_smoke",
    "test_edge_runtime",
    "test_families",  # builds, exports and serves a tiny model of each family
    "test_genai",  # builds, exports (optimum and the genai builder) and serves a tiny model
    "test_hostile",
    "test_hybrid_e2e",
    "test_load",
    "test_resilience",
    "test_security",
    "test_simulate_real",
    "test_spans",  # the real engine on the demo LLM, and a verifier process
    "test_sweep",
    "test_verdict_keying",  # the real engine on the demo LLM, in-process
}
# slm_onnx exports the demo SLM to ONNX (tens of seconds); qwen_shaped_tokenizer (tests/test_id_space.py) is
# what every test that builds, exports or serves the Qwen2-shaped pair depends on.
INTEGRATION_FIXTURES = {"slm_onnx", "qwen_shaped_tokenizer"}
_STARTS_A_PROCESS = ("run_module(", "subprocess.", "VerifierProcess(")


def _is_integration(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    if module is not None and module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
        return True
    if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return any(call in source for call in _STARTS_A_PROCESS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)


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
