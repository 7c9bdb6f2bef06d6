"""The span-learned SLM's build (``python -m models span-slm``): marker, annotation, label substitution, manifest.

Fast: the marker id is an existing id no task text contains (by its characters, and by encoding many problems);
steps are cut after the tokens that hold a step end (the BPE merges ``;-`` and `` #-``); label substitution puts
the marker at hard steps' first tokens and leaves the input alone; the SFT loss is the plain cross-entropy where
no label is the marker, and its offload decision moves the marker's logit alone; annotation counts wrong samples
(scripted models) and padding changes no logit (a tiny random Llama); ``offload_marker_id`` round-trips through
the manifest, is copied by the export from ``span_marker.json`` and a bad value is refused in one clear error.

Integration (a CLI run): the whole build on a tiny random SLM with a handful of problems and steps, its export
and a two-problem measure against the demo LLM.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from edge.manifest import Manifest, ModelFolderError, load_manifest
from models.export import ExportError, offload_marker_id
from models.span_marker import (IGNORE, MARKER_FILE, TASK_ALPHABET, can_occur_in_task, choose_marker_id,
                                marker_record, read_marker_id, split_steps, step_end_ids, step_starts,
                                substitute_labels, write_marker_file)
from models.span_slm import (Annotation, SpanSpec, annotate, annotation_summary, factored_loss, left_pad,
                             plain_rows, sample_continuations, sft_loss, sft_rows)
from models.task import held_out_problems, sample_problems
from tests.conftest import DEMO_PAIR, run_module

MARKER = 31_999  # the demo tokenizer's last BPE merge, 'abcDefghiJkl'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_PAIR / "slm"))


@pytest.fixture(scope="module")
def ends(tokenizer):
    return step_end_ids(tokenizer)


# -- the marker ----------------------------------------------------------------------------------------
def test_the_marker_is_the_last_merge_and_no_task_character(tokenizer):
    assert choose_marker_id(tokenizer) == MARKER
    assert not set(tokenizer.decode([MARKER])) & TASK_ALPHABET and not can_occur_in_task(tokenizer, MARKER)
    assert MARKER not in tokenizer.all_special_ids and len(tokenizer) == 32_000  # no token added


def test_the_marker_never_appears_in_task_text(tokenizer):
    problems = sample_problems(10_000, "train", seed=5) + held_out_problems(500)
    assert all(set(p.text) <= TASK_ALPHABET for p in problems)  # the alphabet the proof rests on
    ids = {i for row in tokenizer([p.text for p in problems])["input_ids"] for i in row}
    assert MARKER not in ids
    assert all(can_occur_in_task(tokenizer, i) or i in tokenizer.all_special_ids for i in ids)


def test_the_marker_record_says_why(tokenizer, tmp_path):
    record = marker_record(tokenizer, MARKER)
    assert record["offload_marker_id"] == MARKER and record["token"] == "abcDefghiJkl"
    assert "no token added" in record["why"]
    write_marker_file(tmp_path, record)
    assert read_marker_id(tmp_path) == MARKER and read_marker_id(tmp_path / "missing") is None


# -- steps and labels ----------------------------------------------------------------------------------
def _solution_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_steps_are_cut_after_the_token_holding_a_step_end(tokenizer, ends):
    ids = _solution_ids(tokenizer, "6-0=6;6-4=2;2-8=-6;-6-7=-13 #-13")
    steps = [tokenizer.decode(s) for s in split_steps(ids, ends)]
    assert steps == ["6-0=6;", "6-4=2;", "2-8=-6;-", "6-7=-13 #-", "13</s>"]  # ';-' and ' #-' are one token each
    assert sum(split_steps(ids, ends), []) == ids
    assert step_starts(ids, ends) == [0, 6, 12, 18, 25]
    plain = _solution_ids(tokenizer, "7+5=12;12-3=9;9+8=17 #17")
    assert [tokenizer.decode(s) for s in split_steps(plain, ends)] == ["7+5=12;", "12-3=9;", "9+8=17 #", "17</s>"]


def test_label_substitution_keeps_the_input_and_marks_only_hard_starts(tokenizer, ends):
    prompt = tokenizer("Q:7+5-3+8 A:")["input_ids"]
    solution = _solution_ids(tokenizer, "7+5=12;12-3=9;9+8=17 #17")
    ids = prompt + solution
    starts = step_starts(solution, ends)
    labels = substitute_labels(ids, len(prompt), [starts[0], starts[2]], MARKER)
    assert len(labels) == len(ids)
    assert labels[: len(prompt) - 1] == [IGNORE] * (len(prompt) - 1) and labels[-1] == IGNORE
    n = len(prompt) - 1
    for offset, token in enumerate(solution):  # label t is the target of the position reading ids[:t+1]
        assert labels[n + offset] == (MARKER if offset in (starts[0], starts[2]) else token)
    assert substitute_labels(ids, len(prompt), [], MARKER)[n:-1] == solution
    with pytest.raises(ValueError, match="outside a solution"):
        substitute_labels(ids, len(prompt), [len(solution)], MARKER)


def _annotation(tokenizer, problem, wrong):
    prompt = tokenizer(problem.prompt)["input_ids"]
    return Annotation(problem, prompt, _solution_ids(tokenizer, problem.solution), wrong)


def test_hard_steps_follow_the_rule_and_unmarked_rows_stay_plain(tokenizer, ends):
    problems = sample_problems(2, "train", seed=3)
    a = _annotation(tokenizer, problems[0], [0, 2, 1, 8] + [0] * 4)
    b = _annotation(tokenizer, problems[1], [0] * 8)
    a.wrong = a.wrong[: len(split_steps(a.solution_ids, ends))]  # 4 or 5 steps (3 or 4 operations)
    b.wrong = b.wrong[: len(split_steps(b.solution_ids, ends))]
    starts = step_starts(a.solution_ids, ends)
    assert a.hard_starts(2, ends) == [starts[1], starts[3]]
    assert a.hard_starts(1, ends) == [starts[1], starts[2], starts[3]]
    rows = sft_rows([a, b], 2, MARKER, ends)
    assert [ids for ids, _ in rows] == [a.prompt_ids + a.solution_ids, b.prompt_ids + b.solution_ids]
    assert sum(label == MARKER for label in rows[0][1]) == 2 and MARKER not in rows[1][1]
    assert all(MARKER not in labels for _, labels in plain_rows([a, b]))
    summary = annotation_summary([a, b], SpanSpec(), ends)
    assert summary["hard_steps"] == 2 and summary["problems_unmarked"] == 1
    assert summary["wrong_in_hard_share"] == pytest.approx(10 / 11)


# -- annotation and the loss, on scripted and tiny models ----------------------------------------------
class ScriptedLM:
    """Always puts all mass on one id; counts its calls (the KV cache is the step count)."""

    def __init__(self, token: int, vocab: int = 32_000):
        self.token, self.vocab = token, vocab

    def eval(self):
        return self

    def __call__(self, input_ids, past_key_values=None, **_):
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        logits[:, :, self.token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=(past_key_values or 0) + 1)


def test_a_model_that_always_ends_the_step_gets_every_step_wrong(tokenizer):
    semicolon = tokenizer.convert_tokens_to_ids(";")
    problems = sample_problems(3, "train", seed=4)
    got = annotate(ScriptedLM(semicolon), tokenizer, problems, samples=3, max_step_tokens=8, seed=0, progress=False)
    assert all(w == 3 for a in got for w in a.wrong)  # ';' alone is never a correct step


def test_sampling_stops_at_a_stop_id_or_the_budget():
    stop = frozenset({7})
    g = torch.Generator().manual_seed(0)
    assert sample_continuations(ScriptedLM(7, 16), [[1, 2], [1]], stop, 5, g, 0) == [[7], [7]]
    assert sample_continuations(ScriptedLM(4, 16), [[1, 2]], stop, 5, g, 0) == [[4] * 5]


def _tiny_llama(vocab: int = 32_000):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def test_left_padding_changes_no_logit():
    model = _tiny_llama(64)
    short, long = [1, 5, 9], [1, 7, 8, 9, 10, 11]
    ids, mask, positions = left_pad([long, short], pad_id=3)
    with torch.inference_mode():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        alone = model(input_ids=torch.tensor([short]), use_cache=True)
        assert torch.allclose(batched.logits[1, -1], alone.logits[0, -1], atol=1e-5)
        step = model(input_ids=torch.tensor([[4], [4]]), past_key_values=batched.past_key_values, use_cache=True,
                     attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                     position_ids=positions[:, -1:] + 1)
        step_alone = model(input_ids=torch.tensor([[4]]), past_key_values=alone.past_key_values, use_cache=True)
        assert torch.allclose(step.logits[1, -1], step_alone.logits[0, -1], atol=1e-5)


def test_annotation_is_seeded(tokenizer):
    model, problems = _tiny_llama(), sample_problems(2, "train", seed=6)
    first = annotate(model, tokenizer, problems, samples=2, max_step_tokens=4, seed=9, progress=False)
    again = annotate(model, tokenizer, problems, samples=2, max_step_tokens=4, seed=9, progress=False)
    assert [a.wrong for a in first] == [a.wrong for a in again]
    assert all(0 <= w <= 2 for a in first for w in a.wrong)


def test_without_a_marker_label_the_loss_is_the_plain_cross_entropy():
    import torch.nn.functional as F

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    correct = torch.tensor([1, 2, 3, 4, 5, 6])
    got = factored_loss(logits, 9, correct, torch.zeros(6))  # column 9 is the marker
    assert float(got) == pytest.approx(float(F.cross_entropy(logits, correct)), rel=1e-5)


def test_the_offload_decision_moves_only_the_markers_logit():
    """Training the marker up must not reshape the other ids (the plain cross-entropy towards the marker pushes
    the correct id down most: the SLM would lose the steps it marks)."""
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(1), requires_grad=True)
    correct, offload = torch.tensor([1, 2, 3, 4]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    decision = factored_loss(logits, 9, correct, offload, marker_weight=1.0) - factored_loss(
        logits, 9, correct, offload, marker_weight=0.0)
    (grad,) = torch.autograd.grad(decision, logits)
    assert torch.all(grad[:, :9] == 0) and torch.all(grad[offload == 1, 9] < 0) and torch.all(grad[offload == 0, 9] > 0)


def test_the_loss_on_a_model_reads_the_substituted_labels(tokenizer, ends):
    import torch.nn.functional as F

    model = _tiny_llama()
    a = _annotation(tokenizer, sample_problems(1, "train", seed=7)[0], [])
    a.wrong = [2] + [0] * (len(split_steps(a.solution_ids, ends)) - 1)  # the first step is hard
    (ids, labels), = sft_rows([a], 2, MARKER, ends)
    with torch.no_grad():
        got = sft_loss(model, [(ids, labels)], MARKER, tokenizer.pad_token_id)
        logits = model(torch.tensor([ids])).logits[0, len(a.prompt_ids) - 1:-1]  # [solution, V]
        offload = torch.zeros(len(logits))
        offload[0] = 1.0
        want = factored_loss(logits, MARKER, torch.tensor(a.solution_ids), offload)
        assert float(got) == pytest.approx(float(want), rel=1e-4)
        plain = sft_loss(model, plain_rows([a]), MARKER, tokenizer.pad_token_id)
        assert float(plain) == pytest.approx(float(F.cross_entropy(logits, torch.tensor(a.solution_ids))), rel=1e-4)


# -- the manifest ----------------------------------------------------------------------------------------
def _manifest_folder(tmp_path, **changes):
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"")
    shutil.copy(DEMO_PAIR / "slm" / "tokenizer.json", folder / "tokenizer.json")
    manifest = Manifest(source="x", model_file="model.onnx", model_type="llama", logit_width=32_000, id_space=32_000,
                        tokenizer_hash="h", bos_token_id=1, eos_token_ids=[2], inputs=[], outputs=[], dtype="fp32",
                        opset=14)
    manifest.save(folder)
    data = json.loads((folder / "manifest.json").read_text())
    data.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_the_marker_round_trips_through_the_manifest(tmp_path):
    assert load_manifest(_manifest_folder(tmp_path / "a", offload_marker_id=MARKER)).offload_marker_id == MARKER
    assert load_manifest(_manifest_folder(tmp_path / "b")).offload_marker_id is None
    older = _manifest_folder(tmp_path / "c")
    data = json.loads((older / "manifest.json").read_text())
    del data["offload_marker_id"]  # a manifest written before the field existed
    (older / "manifest.json").write_text(json.dumps(data))
    assert load_manifest(older).offload_marker_id is None


@pytest.mark.parametrize("bad", [-1, 32_000, "31999", True, 3.5])
def test_a_bad_marker_in_the_manifest_is_refused(tmp_path, bad):
    with pytest.raises(ModelFolderError, match=r"offload_marker_id must be null or an integer id in 0\.\.31999"):
        load_manifest(_manifest_folder(tmp_path, offload_marker_id=bad))


def test_the_export_copies_the_marker_file(tmp_path):
    assert offload_marker_id(str(tmp_path), 32_000) is None  # no span_marker.json
    assert offload_marker_id("org/some-hub-model", 32_000) is None
    (tmp_path / MARKER_FILE).write_text(json.dumps({"offload_marker_id": MARKER}))
    assert offload_marker_id(str(tmp_path), 32_000) == MARKER
    with pytest.raises(ExportError, match="outside the id space"):
        offload_marker_id(str(tmp_path), 1_000)
    (tmp_path / MARKER_FILE).write_text(json.dumps({"offload_marker_id": "x"}))
    with pytest.raises(ExportError, match="offload_marker_id must be an integer"):
        offload_marker_id(str(tmp_path), 32_000)


# -- the command, end to end on a tiny SLM ----------------------------------------------------------------
def test_the_command_builds_exports_and_measures_a_tiny_slm(tmp_path, tokenizer):
    source = tmp_path / "tiny"
    _tiny_llama().save_pretrained(str(source))
    tokenizer.save_pretrained(str(source))
    out, onnx, report = tmp_path / "span", tmp_path / "span-onnx", tmp_path / "report.json"
    proc = run_module("models", "span-slm", "--source", str(source), "--out", str(out), "--onnx-out", str(onnx),
                      "--problems", "4", "--samples", "2", "--min-wrong", "1", "--steps", "3", "--threads", "1",
                      "--n-eval", "2", "--report", str(report), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / MARKER_FILE).read_text())["offload_marker_id"] == MARKER
    recipe = json.loads((out / "span_recipe.json").read_text())
    assert recipe["annotation"]["problems"] == 4 and "RL stage is not implemented" in recipe["scope"]
    manifest = load_manifest(onnx)
    assert manifest.offload_marker_id == MARKER and manifest.parity["max_abs_diff"] <= manifest.parity["tolerance"]
    rows = {r["config"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["llm-only"]["llm_token_share"] == 1.0
    assert rows["slm-alone span"]["llm_token_share"] == 0.0 and rows["slm-alone span"]["offload_per_token"] == 0.0
    learned = rows["span-learned (step ends: task)"]
    assert 0.0 <= learned["offload_per_slm_draw"] <= 1.0 and 0.0 <= learned["llm_token_share"] <= 1.0
