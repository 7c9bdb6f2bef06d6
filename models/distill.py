"""``python -m models distill``: a copy of the demo SLM fine-tuned towards the demo LLM's distributions
(knowledge distillation, Hinton et al. 2015), with a control that separates distillation from extra training.

Loss, over solution tokens only (the prompt is given at inference), mean per position:
    alpha * KL(q || p) + (1 - alpha) * CE(p, correct token)
with q the frozen demo LLM's distribution at temperature 1 and p the SLM's. Forward KL(q || p) is the
quantity the hybrid cares about: speculative sampling accepts a draft from p with probability
sum_x min(p(x), q(x)) = 1 - TV(p, q), and Pinsker bounds TV by sqrt(KL / 2). Temperature 1 because the verifier
compares the T = 1 distributions (the session's settings apply to both sides alike).

Choices (why):
- Initialised from the demo SLM, same architecture: its from-scratch training is chaotic (README "The demo
  pair": 1560 steps 74%, 1600 steps 1.2%), so a fresh student would measure the seed, not distillation.
- The LLM's distributions are computed on the fly (``torch.no_grad``), not precomputed: the full 32k rows of
  3,000 problems x ~27 solution tokens would take ~10 GB, a top-k cache would cut exactly the tails the full
  phase is there to teach, and the LLM's forward costs less than the SLM's forward and backward.
- Two phases, as models/train.py and the span SLM do: for ``restricted_share`` of the steps both softmaxes run
  over the task's ids only (the ~20 ids a solution can hold; the LLM's distribution is then its distribution
  conditioned on those ids), cheap; then the full 32k softmax on ``full_batch`` rows, so the SLM's tails are
  taught the LLM's tails (what acceptance of an off-task draft depends on).
- Control: the identical fine-tune (rows, steps, seed, batches, schedule) with alpha = 0, i.e. hard labels
  only. On the span SLM, extra training alone took the SLM from 60% to 92% at T=1; only distilled − control
  is distillation's effect.

Measured (``measure``): SLM-alone held-out accuracy at T = 1 and T = 0 through the edge runtime (ONNX), as
``models/span_eval.py`` runs it (problem i with seed ``seed + i``), and the mean KL(LLM || SLM) and
1 - TV(LLM, SLM) (the expected acceptance of one T=1 draft) over held-out solution tokens, teacher-forced on the
correct solution, full softmax. Seeded throughout, one torch thread by default, budgets are step counts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from models.finetune import encode_problem, finetune_loop, load_slm, pad_batch, save_fp16
from models.span_marker import IGNORE, substitute_labels
from models.task import Problem, held_out_problems, sample_problems

RECIPE_FILE = "distill_recipe.json"
DEMO_PAIR = Path(__file__).resolve().parent / "demo_pair"
DEFAULT_SOURCE, DEFAULT_TEACHER = DEMO_PAIR / "slm", DEMO_PAIR / "llm"
CURVE_EVERY = 25  # steps per point of the recorded loss curves


@dataclass(frozen=True)
class DistillSpec:
    """Loss mix and fine-tuning budget (schedule and data as the span SLM's, so the two builds compare)."""

    alpha: float = 0.5  # weight of KL(LLM || SLM); 1 - alpha on the hard labels' cross-entropy; 0 = control
    problems: int = 3000  # training-split problems (the rows)
    steps: int = 600  # optimizer steps
    batch: int = 32  # rows per step over the task's ids
    full_batch: int = 8  # rows per step in the full-softmax phase
    restricted_share: float = 0.75  # share of the steps with both softmaxes over the task's ids
    lr: float = 1e-3
    weight_decay: float = 0.0  # a short fine-tune from trained weights: no pull towards zero
    constant_share: float = 0.5  # constant LR, then linear decay to zero
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


# -- data and loss -------------------------------------------------------------------------------------
def training_rows(tokenizer, problems: list[Problem]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per problem: the correct text, labels on the solution tokens and EOS only."""
    rows = []
    for problem in problems:
        prompt, solution = encode_problem(tokenizer, problem)
        rows.append((prompt + solution, substitute_labels(prompt + solution, len(prompt), [], 0)))
    return rows


def task_ids_of(rows):
    """[n] the sorted ids that can be a target (the solutions' tokens): the restricted phase's softmax."""
    import torch

    return torch.tensor(sorted({t for row_ids, labels in rows for t, label in zip(row_ids[1:], labels)
                                if label != IGNORE}))


def distill_loss(student_logits, teacher_logits, targets, alpha: float):
    """(loss, kl, ce): ``alpha`` * KL(softmax(teacher) || softmax(student)) + (1 - ``alpha``) * CE(student,
    targets), each a mean over the M positions. Logits [M, n] over the same n columns; targets [M] columns.
    ``teacher_logits`` may be None when alpha is 0 (kl is then reported as nan: not computed)."""
    import torch
    import torch.nn.functional as F

    log_p = F.log_softmax(student_logits, -1)  # [M, n]
    ce = F.nll_loss(log_p, targets)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError("the KL term needs the teacher's logits")
        return ce, torch.tensor(float("nan")), ce
    log_q = F.log_softmax(teacher_logits.float(), -1)  # [M, n]
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # sum_x q (log q - log p), mean over M
    return alpha * kl + (1 - alpha) * ce, kl, ce


def solution_logits(model, ids, mask, keep, columns=None):
    """[M, n] logits at the positions ``keep`` [B, L] marks, over ``columns`` [n] ids (None: every id)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]  # [M, H]
    if columns is None:
        return model.lm_head(hidden)  # [M, V]
    return hidden @ model.lm_head.weight[columns].T  # [M, n]


def batch_distill_loss(student, teacher, rows, pad_id: int, alpha: float, columns=None):
    """``distill_loss`` of ``rows`` over ``columns`` (sorted ids holding every target; None: the full softmax);
    the teacher runs without gradients and not at all when alpha is 0."""
    import torch

    ids, mask, labels = pad_batch(rows, pad_id)
    keep = labels != IGNORE  # [B, L]: solution positions
    targets = labels[keep]  # [M] ids
    if columns is not None:
        targets = torch.searchsorted(columns, targets)  # [M] columns
    teacher_logits = None
    if alpha > 0:
        with torch.no_grad():
            teacher_logits = solution_logits(teacher, ids, mask, keep, columns)
    return distill_loss(solution_logits(student, ids, mask, keep, columns), teacher_logits, targets, alpha)


def distill_finetune(student, teacher, rows, pad_id: int, spec: DistillSpec, progress: bool = True) -> dict:
    """Fine-tune ``student`` in place (models/finetune.py's loop: seeded batches, restricted then full softmax,
    constant then decaying LR); returns the training record with loss curves (means over CURVE_EVERY steps)."""
    columns = task_ids_of(rows)
    parts = {"kl": [], "ce": []}

    def batch_loss(batch, restricted: bool):
        loss, kl, ce = batch_distill_loss(student, teacher, batch, pad_id, spec.alpha, columns if restricted else None)
        parts["kl"].append(kl.item())
        parts["ce"].append(ce.item())
        return loss

    name = "distill SLM" if spec.alpha > 0 else "control (hard labels)"
    record = finetune_loop(student, rows, spec, batch_loss, f"fine-tune {name}", progress)
    curves = {key: _curve(values) for key, values in [("loss", record.pop("losses")), *parts.items()]}
    return {**record, "task_ids": len(columns), "restricted_steps": int(spec.restricted_share * spec.steps),
            "loss_curves": {"every_steps": CURVE_EVERY, **curves,
                            "note": "kl and ce are over the task's ids in the restricted steps, over all 32k ids "
                                    "after; kl is null where not computed (alpha = 0)"}}


def _curve(values: list[float]) -> list[float | None]:
    means = [float(np.mean(values[i : i + CURVE_EVERY])) for i in range(0, len(values), CURVE_EVERY)]
    return [None if math.isnan(m) else round(m, 5) for m in means]


# -- the build -----------------------------------------------------------------------------------------
def load_teacher(folder: str | Path):
    """The frozen LLM in fp32 (as the verifier runs it), in eval mode, no gradients."""
    model, _ = load_slm(folder)
    model.eval().requires_grad_(False)
    return model


def build_distilled(out: Path, spec: DistillSpec, source: Path = DEFAULT_SOURCE, teacher_dir: Path = DEFAULT_TEACHER,
                    threads: int = 1, command: str = "", progress: bool = True) -> dict:
    """Fine-tune a copy of ``source`` with ``spec`` (alpha 0: the control), save it fp16 to ``out`` with its
    recipe; returns the record."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    student, tokenizer = load_slm(source)
    teacher = load_teacher(teacher_dir) if spec.alpha > 0 else None
    rows = training_rows(tokenizer, sample_problems(spec.problems, "train", seed=spec.seed))
    training = distill_finetune(student, teacher, rows, tokenizer.pad_token_id, spec, progress)
    record = {
        "what": ("distilled: alpha * KL(LLM T=1 || SLM) + (1 - alpha) * CE on solution tokens" if spec.alpha > 0
                 else "control: the identical fine-tune with hard labels only (alpha = 0)"),
        "source": str(source), "teacher": str(teacher_dir) if spec.alpha > 0 else None, "spec": asdict(spec),
        **training, "threads": threads, "command": command,
    }
    save_fp16(student, tokenizer, Path(out))
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    record["load_average_after"] = list(os.getloadavg())
    write_recipe(Path(out), record)
    return record


def write_recipe(out: Path, record: dict) -> None:
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def control_spec(spec: DistillSpec) -> DistillSpec:
    """The control: everything as ``spec`` but alpha = 0 (hard labels only)."""
    return replace(spec, alpha=0.0)


# -- the measure ---------------------------------------------------------------------------------------
def slm_alone(onnx_folder: Path, temperature: float, problems: list[Problem], seed: int, threads: int = 1,
              progress: bool = True) -> dict:
    """SLM-only generation through the edge runtime (threshold +inf: nothing sent), problem i with seed
    seed + i; the summary of models/span_eval.py's Row (accuracy, its 95% interval, per-problem correctness)."""
    from tqdm import tqdm

    from core.sampling import SamplingSettings
    from edge.hybrid import HybridConfig, generate_hybrid
    from edge.model import EdgeModel
    from models.span_eval import Row
    from models.task import MAX_SOLUTION_TOKENS, is_correct

    model = EdgeModel(onnx_folder, threads=threads)
    config = HybridConfig(threshold=math.inf, settings=SamplingSettings(temperature=temperature),
                          max_new_tokens=MAX_SOLUTION_TOKENS)
    row = Row(f"{onnx_folder.name} T={temperature:g}", [], 0, 0, 0, 0, 0.0)
    for i, problem in enumerate(tqdm(problems, desc=row.name, unit="problem", leave=False, disable=not progress)):
        result = generate_hybrid(model, model.encode(problem.prompt), config, seed=seed + i)
        row.correct.append(int(is_correct(problem, result.text)))
        row.tokens += len(result.token_ids)
        row.seconds += result.seconds
    summary = row.summary()
    return {key: summary[key] for key in ("accuracy", "ci95", "problems", "tokens", "tokens_per_s", "correct")}


def divergence(teacher, student, tokenizer, problems: list[Problem], batch: int = 50) -> dict:
    """Mean KL(LLM || SLM) and mean 1 - TV(LLM, SLM) per held-out solution token (teacher-forced on the correct
    solution, full softmax, T = 1), with 95% intervals over problems (a problem's tokens are not independent:
    the ratio estimator's variance, clustered by problem)."""
    import torch
    import torch.nn.functional as F

    rows = training_rows(tokenizer, problems)
    kl_sums, accept_sums, counts = [], [], []
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            ids, mask, labels = pad_batch(rows[i : i + batch], tokenizer.pad_token_id)
            keep = labels != IGNORE  # [B, L]
            log_q = F.log_softmax(solution_logits(teacher, ids, mask, keep), -1)  # [M, V]
            log_p = F.log_softmax(solution_logits(student, ids, mask, keep), -1)  # [M, V]
            kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [M]
            accept = torch.minimum(log_q.exp(), log_p.exp()).sum(-1)  # [M]: 1 - TV
            per_row = keep.sum(-1).tolist()  # [B] solution tokens of each problem (keep is row-major)
            kl_sums += [float(x.sum()) for x in kl.split(per_row)]
            accept_sums += [float(x.sum()) for x in accept.split(per_row)]
            counts += per_row
    return {"kl_mean": _ratio(kl_sums, counts), "accept_mean": _ratio(accept_sums, counts),
            "positions": int(sum(counts)), "problems": len(rows)}


def _ratio(sums: list[float], counts: list[int]) -> dict:
    """sum(sums) / sum(counts) and its 95% half-width (delta method, clustered by problem)."""
    from models.span_eval import Z95

    s, c = np.asarray(sums), np.asarray(counts, dtype=float)
    ratio, n = s.sum() / c.sum(), len(s)
    var = ((s - ratio * c) ** 2).sum() / max(1, n - 1) / n / c.mean() ** 2
    return {"mean": float(ratio), "ci95": float(Z95 * math.sqrt(var))}


def paired_difference(a: list[int], b: list[int]) -> dict:
    """Mean of a - b over the same problems (same seeds) and its 95% half-width."""
    from models.span_eval import Z95

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return {"mean": float(d.mean()), "ci95": Z95 * sd / math.sqrt(len(d))}


def measure(models: dict[str, tuple[Path, Path]], teacher_dir: Path = DEFAULT_TEACHER, n: int = 500, seed: int = 0,
            threads: int = 1, progress: bool = True) -> dict:
    """Every model of ``models`` (name -> (transformers folder, ONNX export)) on the same ``n`` held-out
    problems: SLM-alone accuracy at T = 1 and T = 0, KL(LLM || SLM) and 1 - TV; paired accuracy differences of
    each model against the first and of ``distilled`` against ``control`` when both are there."""
    import torch

    torch.set_num_threads(threads)
    load_before, problems = list(os.getloadavg()), held_out_problems(n)
    teacher = load_teacher(teacher_dir)
    rows = {}
    for name, (folder, onnx) in models.items():
        student, tokenizer = load_slm(folder)
        rows[name] = {"model": str(folder), "onnx": str(onnx),
                      **divergence(teacher, student.eval(), tokenizer, problems),
                      **{f"T={t:g}": slm_alone(onnx, t, problems, seed, threads, progress) for t in (1.0, 0.0)}}
    base = next(iter(models))
    pairs = [(name, base) for name in models if name != base]
    if {"distilled", "control"} <= set(models):
        pairs.append(("distilled", "control"))
    differences = {f"{a} - {b}": {t: paired_difference(rows[a][t]["correct"], rows[b][t]["correct"])
                                  for t in ("T=1", "T=0")} for a, b in pairs}
    return {"models": rows, "paired_accuracy_differences": differences, "problems": n, "seed": seed,
            "threads": threads, "teacher": str(teacher_dir),
            "load_average": {"before": load_before, "after": list(os.getloadavg())}}


def format_report(report: dict) -> str:
    head = f"{'model':<12} {'T=1 accuracy':>13} {'T=0 accuracy':>13} {'KL(LLM||SLM)':>15} {'1 - TV':>15}"
    lines = [head, "-" * len(head)]
    for name, r in report["models"].items():
        t1, t0, kl, acc = r["T=1"], r["T=0"], r["kl_mean"], r["accept_mean"]
        lines.append(f"{name:<12} {100 * t1['accuracy']:>6.1f}±{100 * t1['ci95']:<5.1f} "
                     f"{100 * t0['accuracy']:>6.1f}±{100 * t0['ci95']:<5.1f} "
                     f"{kl['mean']:>8.4f}±{kl['ci95']:<6.4f} {acc['mean']:>8.4f}±{acc['ci95']:<6.4f}")
    for pair, d in report["paired_accuracy_differences"].items():
        lines.append(f"paired {pair}: T=1 {100 * d['T=1']['mean']:+.1f}±{100 * d['T=1']['ci95']:.1f} points, "
                     f"T=0 {100 * d['T=0']['mean']:+.1f}±{100 * d['T=0']['ci95']:.1f}")
    lines.append(f"{report['problems']} held-out problems; KL and 1 - TV per solution token (teacher-forced, T=1, "
                 f"full softmax); load average before/after {report['load_average']['before'][0]:.2f}/"
                 f"{report['load_average']['after'][0]:.2f}")
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------------
def run_distill(out: Path, onnx_out: Path, spec: DistillSpec, control: tuple[Path, Path] | None = None,
                n_eval: int = 500, report_path: Path | None = None, threads: int = 1, command: str = "",
                source: Path = DEFAULT_SOURCE, teacher_dir: Path = DEFAULT_TEACHER, progress: bool = True) -> dict:
    """Build the distilled SLM (and with ``control`` = (folder, ONNX folder) the control), export each to ONNX
    (parity-checked), then ``measure_builds``. Returns the distilled recipe."""
    from models.export import export_model

    builds = [(out, onnx_out, build_distilled(out, spec, source, teacher_dir, threads, command, progress))]
    if control is not None:
        builds.append((*control, build_distilled(control[0], control_spec(spec), source, teacher_dir, threads,
                                                 command, progress)))
    for folder, onnx, record in builds:
        manifest = export_model(str(folder), onnx)
        record["export"] = {"onnx": str(onnx), "parity": manifest.parity}
        write_recipe(folder, record)
    return measure_builds(out, onnx_out, control, n_eval, report_path, spec.seed, threads, command, source,
                          teacher_dir, progress)


def measure_builds(out: Path, onnx_out: Path, control: tuple[Path, Path] | None = None, n_eval: int = 500,
                   report_path: Path | None = None, seed: int = 0, threads: int = 1, command: str = "",
                   source: Path = DEFAULT_SOURCE, teacher_dir: Path = DEFAULT_TEACHER, progress: bool = True) -> dict:
    """Measure the built SLMs with the source SLM on ``n_eval`` held-out problems (0: skip); write the measure
    into the distilled recipe (with the control's recipe) and the full report to ``report_path``."""
    from models.export import export_model

    record = json.loads((out / RECIPE_FILE).read_text())
    if control is not None:
        record["control"] = {"folder": str(control[0]), **json.loads((control[0] / RECIPE_FILE).read_text())}
    if n_eval:
        with tempfile.TemporaryDirectory() as tmp:
            base_onnx = Path(tmp) / "source"  # the SLM the copies start from, exported as the edge runs it
            export_model(str(source), base_onnx)
            models = {"source": (source, base_onnx), "distilled": (out, onnx_out)}
            if control is not None:
                models["control"] = control
            report = measure(models, teacher_dir, n_eval, seed, threads, progress)
        report["command"] = command
        record["measure"] = {k: v for k, v in report.items() if k != "models"}
        record["measure"]["models"] = {name: _without_per_problem(r) for name, r in report["models"].items()}
        if report_path is not None:
            report_path.parent.mkdir(parents=True, exist_ok=True)
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    write_recipe(out, record)
    return record


def _without_per_problem(row: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "correct"} if isinstance(v, dict) else v)
            for k, v in row.items()}


def control_paths(out: Path, onnx_out: Path) -> tuple[Path, Path]:
    """The control's folders: OUT-control, and ONNX-OUT with -control after OUT's name when ONNX-OUT's name starts
    with it (build/distilled_slm-onnx -> build/distilled_slm-control-onnx), else ONNX-OUT-control."""
    name = onnx_out.name
    if name.startswith(out.name) and name != out.name:
        name = out.name + "-control" + name[len(out.name):]
    else:
        name += "-control"
    return out.with_name(out.name + "-control"), onnx_out.with_name(name)
