"""The committed demo pair as the experiments use it: its ONNX export and its calibrated thresholds.

``make demo``, ``python -m simulate record``, the testbed and ``make bench`` all start from here, so they
export the same SLM to the same folder and calibrate with the same rule.
"""

from __future__ import annotations

from pathlib import Path

from core.sampling import SamplingSettings
from edge.calibration import estimator_data, fit_estimators
from edge.hybrid import HybridConfig
from eval.taskeval import CALIBRATION_SEED
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


def calibrate(runner, n: int, settings: SamplingSettings) -> dict:
    """Verify-all on ``n`` training-split problems; per estimator, the line fit and thresholds."""
    config = HybridConfig(threshold=float("-inf"), codec=CodecSpec("full32"), settings=settings,
                          max_new_tokens=MAX_SOLUTION_TOKENS, record_all_estimators=True)
    runs = runner.hybrid("calibration", config, sample_problems(n, "train", seed=CALIBRATION_SEED), report_q=True)
    b, us = estimator_data([r for run in runs for r in run.result.records])
    return fit_estimators(b, us, target=REJECTION_TARGET, tolerated=TOLERATED_BETA)
