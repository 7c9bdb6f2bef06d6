"""The committed demo pair as the experiments use it: its ONNX export and its calibrated thresholds.

``make demo``, ``python -m simulate record``, the testbed and ``make bench`` all start from here, so they
export the same SLM to the same folder and calibrate with the same rule.
"""

from __future__ import annotations

from pathlib import Path

from edge.calibration import estimator_data, fit_estimators
from eval.taskeval import CALIBRATION_SEED, verify_all_records
from models.demo_pair import COMMITTED_PAIR
from models.task import MAX_SOLUTION_TOKENS, sample_problems
from proto.distribution import CodecSpec

BUILD = Path("build/demo")
SLM_EXPORT = BUILD / "slm-onnx"
LLM_DIR = COMMITTED_PAIR / "llm"
REJECTION_TARGET = 0.005  # default threshold: skipped tokens' mean rejection probability stays below this
TOLERATED_BETA = 0.1  # the risk-prone rule's tolerated rejection probability


def ensure_export(source: Path = COMMITTED_PAIR / "slm", out: Path = SLM_EXPORT) -> Path:
    """Export ``source`` to ONNX unless an export of it already exists (and is newer than its weights)."""
    manifest = out / "manifest.json"
    if manifest.is_file() and manifest.stat().st_mtime >= (source / "model.safetensors").stat().st_mtime:
        return out
    from models.export import export_model  # torch/optimum only when an export is really needed

    print(f"exporting {source} -> {out} (ONNX via optimum) ...")
    export_model(str(source), out)
    return out


def calibrate(runner, n: int) -> dict:
    """Verify-all (full32) on ``n`` training-split problems at the runner's sampling settings; per estimator,
    the line fit and thresholds."""
    problems = sample_problems(n, "train", seed=CALIBRATION_SEED)
    b, us = estimator_data(verify_all_records(runner, "calibration", problems, CodecSpec("full32"),
                                              MAX_SOLUTION_TOKENS))
    return fit_estimators(b, us, target=REJECTION_TARGET, tolerated=TOLERATED_BETA)
