"""CLI errors are one clear line (exit 2), never a traceback; and the edge package never imports torch."""


import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_module


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_folder(tmp_path):
    proc = run_module("edge", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    _assert_one_line_error(proc, "does not exist")


def test_non_onnx_folder(demo_slm_dir):
    proc = run_module("edge", "generate", "--model", str(demo_slm_dir), "--prompt", "x")
    _assert_one_line_error(proc, "not an ONNX export", "python -m models export")


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--max-new-tokens", "0"], ["--top-p", "2"],
                                 ["--provider", "gpu9"], ["--bogus"]])
def test_bad_arguments(slm_onnx, bad):
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", "x", *bad)
    _assert_one_line_error(proc)


@pytest.mark.parametrize("bad,needle", [(["--temperatures", "1,a"], "comma-separated"),
                                        (["--modes", "default,bogus"], "step-exact"),
                                        (["--problems", "0"], "positive")])
def test_eval_modes_bad_arguments(bad, needle):
    _assert_one_line_error(run_module("eval", "modes", *bad), needle)


def test_models_export_rejects_non_model_folder(tmp_path):
    proc = run_module("models", "export", "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    _assert_one_line_error(proc, "config.json")


def test_generate_runs(slm_onnx):
    proc = run_module("edge", "generate", "--model", str(slm_onnx), "--prompt", "Q:7+5-3+8 A:",
                      "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Q:7+5-3+8 A:") and '"tokens_per_s"' in proc.stdout


def test_edge_does_not_import_torch():
    code = ("import sys, edge, edge.runtime, core.sampling, edge.generate, edge.model, edge.cli, edge.manifest, "
            "proto.fingerprint; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
