"""The distilled SLM's build (``python -m models distill``): the loss, the fine-tune, the command's arguments.

Fast: the loss equals KL + CE computed by hand, is minimal (zero KL, zero gradient) where the SLM's logits equal
the LLM's, and is the plain cross-entropy at alpha = 0 (the control); on a tiny random Llama the batch loss
reads the solution positions of the model's own logits, over the task's ids or the full softmax, and a few
steps of fine-tuning are seeded (the same weights twice) and differ from the control's. The command's arguments
are refused in one line, in-process (no model is loaded).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from models.cli import main as models_main
from models.distill import (DistillSpec, batch_distill_loss, control_paths, control_spec, distill_finetune,
                            distill_loss, task_ids_of, training_rows)
from models.task import sample_problems
from tests.conftest import DEMO_PAIR


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_PAIR / "slm"))


# -- the loss ------------------------------------------------------------------------------------------
def test_the_loss_is_alpha_kl_plus_one_minus_alpha_ce_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    targets = torch.tensor([1, 2])
    kl_rows, ce_rows = [], []
    for s, t, y in zip(student.tolist(), teacher.tolist(), targets.tolist()):
        p = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]
        q = [math.exp(v) / sum(math.exp(w) for w in t) for v in t]
        kl_rows.append(sum(qi * math.log(qi / pi) for qi, pi in zip(q, p)))
        ce_rows.append(-math.log(p[y]))
    kl, ce = sum(kl_rows) / 2, sum(ce_rows) / 2
    got, got_kl, got_ce = distill_loss(student, teacher, targets, alpha=0.3)
    assert float(got_kl) == pytest.approx(kl, rel=1e-5) and float(got_ce) == pytest.approx(ce, rel=1e-5)
    assert float(got) == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-5)
    # forward KL(LLM || SLM), not the reverse
    reverse = F.kl_div(F.log_softmax(teacher, -1), F.log_softmax(student, -1), log_target=True, reduction="batchmean")
    assert abs(float(reverse) - kl) > 1e-3


def test_the_kl_term_is_minimal_where_the_slm_equals_the_llm():
    teacher = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4])
    student = teacher.clone().requires_grad_(True)
    loss, kl, _ = distill_loss(student, teacher, targets, alpha=1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6) and float(grad.abs().max()) < 1e-6
    for seed in range(5):  # any move away from the teacher's logits costs (a shift of all logits does not)
        noise = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed + 1))
        assert float(distill_loss(teacher + 0.1 * noise, teacher, targets, 1.0)[0]) > float(loss.detach())


def test_alpha_zero_is_the_cross_entropy_and_needs_no_teacher():
    student = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([5, 0, 3, 3])
    loss, kl, ce = distill_loss(student, None, targets, alpha=0.0)
    assert float(loss) == pytest.approx(float(F.cross_entropy(student, targets)), rel=1e-6) and math.isnan(kl)
    teacher = torch.randn(4, 6)
    assert float(distill_loss(student, teacher, targets, 0.0)[0]) == pytest.approx(float(loss), rel=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(student, None, targets, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillSpec(alpha=1.5)
    assert control_spec(DistillSpec(alpha=0.7, steps=9)) == DistillSpec(alpha=0.0, steps=9)


# -- on tiny random Llamas -------------------------------------------------------------------------------
def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_the_batch_loss_reads_the_solution_positions(tokenizer):
    student, teacher = _tiny_llama(0), _tiny_llama(1)
    rows = training_rows(tokenizer, sample_problems(2, "train", seed=3))
    ids, labels = rows[0]
    n_prompt = len(tokenizer(sample_problems(2, "train", seed=3)[0].prompt)["input_ids"])
    assert labels[n_prompt - 1:-1] == ids[n_prompt:] and labels[-1] == -100  # the solution and EOS only
    columns = task_ids_of(rows)
    with torch.no_grad():
        s = student(torch.tensor([ids])).logits[0, n_prompt - 1:-1]  # [solution, V]
        t = teacher(torch.tensor([ids])).logits[0, n_prompt - 1:-1]
        target = torch.tensor(ids[n_prompt:])
        full = batch_distill_loss(student, teacher, rows[:1], tokenizer.pad_token_id, 0.4)
        want = distill_loss(s, t, target, 0.4)
        assert all(float(a) == pytest.approx(float(b), rel=1e-4) for a, b in zip(full, want))
        restricted = batch_distill_loss(student, teacher, rows[:1], tokenizer.pad_token_id, 0.4, columns)
        want = distill_loss(s[:, columns], t[:, columns], torch.searchsorted(columns, target), 0.4)
        assert all(float(a) == pytest.approx(float(b), rel=1e-4) for a, b in zip(restricted, want))


def test_a_few_steps_are_seeded_and_differ_from_the_control(tokenizer):
    rows = training_rows(tokenizer, sample_problems(6, "train", seed=4))
    spec = DistillSpec(alpha=0.5, steps=4, batch=3, full_batch=2, restricted_share=0.5, lr=1e-2, seed=7)
    teacher = _tiny_llama(1)

    def run(s: DistillSpec):
        student = _tiny_llama(0)
        record = distill_finetune(student, teacher, rows, tokenizer.pad_token_id, s, progress=False)
        return student.state_dict(), record

    first, record = run(spec)
    again, _ = run(spec)
    control, control_record = run(control_spec(spec))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], _tiny_llama(0).state_dict()["model.embed_tokens.weight"])
    assert not torch.equal(first["model.embed_tokens.weight"], control["model.embed_tokens.weight"])
    assert record["restricted_steps"] == 2 and len(record["loss_curves"]["kl"]) == 1
    assert record["loss_curves"]["kl"][0] > 0 and control_record["loss_curves"]["kl"] == [None]


# -- the command -------------------------------------------------------------------------------------------
def _exit_code(argv: list[str]) -> int:
    """``python -m models ARGV``'s exit status, in-process (argparse's errors exit, run_cli's return)."""
    try:
        return models_main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("bad, needle", [
    (["--alpha", "1.5"], "--alpha: must be a number in [0, 1], got 1.5"),
    (["--alpha", "-0.1"], "--alpha: must be a number in [0, 1]"),
    (["--alpha", "nan"], "--alpha: must be a number in [0, 1]"),
    (["--alpha", "x"], "--alpha: must be a number in [0, 1], got x"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--seed", "-1"], "--seed: must be an integer >= 0"),
    (["--threads", "0"], "--threads: must be a positive integer"),
    (["--n-eval", "-2"], "--n-eval: must be an integer >= 0"),
    (["--out", "o", "--onnx-out", "o"], "must name different folders"),
])
def test_bad_arguments_are_refused_in_one_line(capsys, bad, needle):
    assert _exit_code(["distill", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_an_output_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert _exit_code(["distill", "--out", str(tmp_path / "f"), "--onnx-out", str(tmp_path / "o")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_the_controls_folders_sit_beside_the_builds():
    from pathlib import Path

    assert control_paths(Path("build/distilled_slm"), Path("build/distilled_slm-onnx")) == (
        Path("build/distilled_slm-control"), Path("build/distilled_slm-control-onnx"))
    assert control_paths(Path("a/x"), Path("b/y")) == (Path("a/x-control"), Path("b/y-control"))
