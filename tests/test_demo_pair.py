"""The committed demo pair is a meaningful pair, reproduced by the evaluation command; training still works."""

import json

import pytest

from models.demo_pair import LLM_TARGET, MIN_GAP, SLM_MAX
from tests.conftest import DEMO_PAIR, run_module


@pytest.fixture(scope="module")
def accuracies():
    out = {}
    for name in ("llm", "slm"):
        proc = run_module("models", "evaluate", "--model", str(DEMO_PAIR / name), "--n", "500")
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["heldout_accuracy"]
    return out


def test_committed_accuracy_reproduced(accuracies):
    recipe = json.loads((DEMO_PAIR / "recipe.json").read_text())
    for name in ("llm", "slm"):
        assert accuracies[name] == pytest.approx(recipe["models"][name]["heldout_accuracy"], abs=0.01)
    assert accuracies["llm"] >= LLM_TARGET
    assert accuracies["slm"] <= SLM_MAX and accuracies["llm"] - accuracies["slm"] >= MIN_GAP


def test_weights_are_small_and_fp16():
    for name in ("llm", "slm"):
        weights = DEMO_PAIR / name / "model.safetensors"
        assert weights.stat().st_size < 25 * 2**20
        assert json.loads((DEMO_PAIR / name / "config.json").read_text())["vocab_size"] == 32000


def test_training_command_micro_budget(tmp_path):
    """The real build command end to end (tokenizer, both models, evaluation) at a tiny budget."""
    proc = run_module("models", "demo-pair", "--out", str(tmp_path), "--steps", "4", "--n-eval", "8",
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert set(recipe["models"]) == {"llm", "slm"}
    assert (tmp_path / "llm" / "model.safetensors").is_file() and (tmp_path / "slm" / "tokenizer.json").is_file()
