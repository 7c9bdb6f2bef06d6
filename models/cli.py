"""Command line of `python -m models`: demo-pair, export, evaluate, pairs, span-slm, distill,
conditioned-slm."""

from __future__ import annotations

import json
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from core.cli import OneLineParser, UserError, non_negative_float, non_negative_int, positive_int, run_cli
from models.registry import format_pairs

COMMITTED_LLM = Path(__file__).resolve().parent / "demo_pair" / "llm"


def _demo_pair(args) -> int:
    from models.demo_pair import build_demo_pair, check_targets

    recipe = build_demo_pair(Path(args.out), steps=args.steps, n_eval=args.n_eval)
    for name in ("llm", "slm"):
        rec = recipe["models"][name]
        print(f"{name}: {rec['parameters']:,} parameters, held-out accuracy {rec['heldout_accuracy']:.3f}, "
              f"{rec['train_seconds']} s")
    missed = check_targets(recipe)
    if missed and args.steps is None:
        print("targets missed: " + "; ".join(missed))
        return 1
    return 0


def _export(args) -> int:
    from models.export import ExportError, export_model

    source = Path(args.model)
    if source.exists() and not (source / "config.json").is_file():
        raise UserError(f"{source} has no config.json: give a transformers model folder or a hub id")
    precision = _precision(args)
    try:
        if args.builder == "genai":
            from models.export_genai import export_genai

            manifest = export_genai(args.model, Path(args.out), precision)
        else:
            manifest = export_model(args.model, Path(args.out), fp16=precision == "fp16", int8=precision == "int8")
    except ExportError as exc:
        raise UserError(str(exc)) from None
    print(f"exported {args.model} -> {args.out}/{manifest.model_file} ({manifest.dtype}, opset {manifest.opset}, "
          f"{args.builder} builder); parity max |diff| {manifest.parity['max_abs_diff']:.2e} (tolerance "
          f"{manifest.parity['tolerance']}), top-1 agreement {manifest.parity['top1_agreement']:.3f}")
    return 0


def _precision(args) -> str:
    """The export's precision from --precision or the older --fp16 / --int8 flags (one of them at most)."""
    flags = [name for name, given in (("fp16", args.fp16), ("int8", args.int8)) if given]
    if len(flags) > 1 or (flags and args.precision and args.precision != flags[0]):
        raise UserError("give one precision: --precision, --fp16 or --int8")
    precision = args.precision or (flags[0] if flags else "fp32")
    if precision == "int4" and args.builder != "genai":
        raise UserError("int4 needs --builder genai (the optimum path quantizes to int8 at most)")
    return precision


def _evaluate(args) -> int:
    from models.evaluate import evaluate_dir

    if not (Path(args.model) / "config.json").is_file():
        raise UserError(f"{args.model} is not a transformers model folder (no config.json)")
    accuracy = evaluate_dir(args.model, n=args.n)
    print(json.dumps({"model": args.model, "heldout_accuracy": accuracy, "n": args.n}))
    return 0


def _pairs(args) -> int:
    print(format_pairs())
    return 0


def _span_slm(args) -> int:
    """Build (annotate, fine-tune, save, export) and/or measure a span-learned SLM (models/span_slm.py)."""
    out, onnx_out = Path(args.out), Path(args.onnx_out)
    control = (out.with_name(out.name + "-control"), onnx_out.with_name(onnx_out.name + "-control"))
    if args.base_onnx is not None and not (args.base_onnx / "manifest.json").is_file():
        raise UserError(f"--base-onnx {args.base_onnx} is not an export (no manifest.json)")
    if not args.eval_only:
        _build_span_slm(args, out, onnx_out, control if args.control else None)
    else:
        for folder in [onnx_out] + ([control[1]] if args.control else []):
            if not (folder / "manifest.json").is_file():
                raise UserError(f"--eval-only needs an export in {folder}: run python -m models span-slm first")
    if args.n_eval:
        _measure_span_slm(args, onnx_out, control[1] if args.control else None)
    return 0


def _span_spec(args):
    from models.span_slm import SpanSpec

    if args.min_wrong > args.samples:
        raise UserError(f"--min-wrong {args.min_wrong} exceeds --samples {args.samples}: no step could be hard")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    return SpanSpec(problems=args.problems, samples=args.samples, min_wrong=args.min_wrong, steps=args.steps,
                    lr=args.lr, probe=args.probe, seed=args.seed)


def _build_span_slm(args, out: Path, onnx_out: Path, control: tuple[Path, Path] | None) -> None:
    from models.export import ExportError, export_model
    from models.span_slm import build_span_slm

    record = build_span_slm(out, _span_spec(args), args.source, args.threads, control[0] if control else None)
    a = record["annotation"]
    print(f"annotated {a['problems']} training problems ({a['steps']} steps x {a['samples_per_step']} samples, "
          f"{record['annotate_seconds']} s): step error rate {a['step_error_rate']:.3f}, hard steps "
          f"{a['hard_steps']} ({a['hard_step_share']:.1%}), wrong samples in hard steps "
          f"{a['wrong_in_hard_share']:.1%}; fine-tuned in {record['train_seconds']} s -> {out}")
    try:
        for folder, onnx in [(out, onnx_out)] + ([control] if control else []):
            manifest = export_model(str(folder), onnx)
            print(f"exported {folder} -> {onnx} (parity max |diff| {manifest.parity['max_abs_diff']:.2e}, "
                  f"offload_marker_id {manifest.offload_marker_id})")
    except ExportError as exc:
        raise UserError(str(exc)) from None


def _measure_span_slm(args, onnx_out: Path, control_onnx: Path | None) -> None:
    import tempfile

    from models.export import export_model
    from models.span_eval import format_report, measure

    with tempfile.TemporaryDirectory() as tmp:
        base = args.base_onnx
        if base is None:  # the SLM the span SLM was copied from, exported as the edge runs it
            base = Path(tmp) / "base"
            export_model(str(args.source), base)
        report = measure(onnx_out, base, args.llm, n=args.n_eval, temperature=args.temperature, seed=args.seed,
                         threads=args.eval_threads, ends=tuple(args.step_ends), control_onnx=control_onnx)
    report["command"] = "python -m models " + " ".join(args.argv)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"report -> {args.report}")


def _step_ends(text: str) -> list[str]:
    from argparse import ArgumentTypeError

    from models.span_eval import STEP_END_SETS

    names = [name.strip() for name in text.split(",")]
    if not names or any(name not in STEP_END_SETS for name in names):
        raise ArgumentTypeError(f"must be a comma-separated list of {', '.join(STEP_END_SETS)}, got {text}")
    return names


def _model_folder(text: str) -> Path:
    from argparse import ArgumentTypeError

    if not (Path(text) / "config.json").is_file():
        raise ArgumentTypeError(f"{text} is not a transformers model folder (no config.json)")
    return Path(text)


def _add_span_slm(sub) -> None:
    from models.span_slm import DEFAULT_SOURCE, SpanSpec

    d = SpanSpec()
    p = sub.add_parser("span-slm", help="fine-tune a copy of the demo SLM to emit the offload marker before the steps "
                                        "it tends to get wrong (SplitReason's SFT stage), export it, measure it")
    p.add_argument("--out", default="build/span_slm", help="the fine-tuned transformers folder (default %(default)s)")
    p.add_argument("--onnx-out", default="build/span_slm-onnx", help="its ONNX export (default %(default)s)")
    p.add_argument("--source", type=_model_folder, default=DEFAULT_SOURCE,
                   help="the SLM to copy (default: the demo SLM)")
    p.add_argument("--problems", type=positive_int, default=d.problems,
                   help="training-split problems to annotate (default %(default)s)")
    p.add_argument("--samples", type=positive_int, default=d.samples,
                   help="m: T=1 samples of each step (default %(default)s)")
    p.add_argument("--min-wrong", type=positive_int, default=d.min_wrong,
                   help="k: a step is hard when at least k of its m samples are wrong (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="fine-tuning steps (default %(default)s)")
    p.add_argument("--lr", type=non_negative_float, default=d.lr, help="peak learning rate (> 0; default %(default)s)")
    p.add_argument("--probe", action="store_true", help="the offload decision trains the marker's output row only "
                   "(a probe on the hidden state): the SLM keeps all its skill, the marker is less precise")
    p.add_argument("--seed", type=int, default=d.seed, help="problems, samples, batches and evaluation seeds")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads for annotation and training (default "
                   "%(default)s: on a loaded 2-core host a second thread costs more than it brings, bench.threads)")
    p.add_argument("--control", action="store_true", help="also fine-tune a control copy on the same rows without "
                   "the marker (OUT-control, ONNX-OUT-control) and compare it (alone, and with span-uncertainty at "
                   "the same offload rate)")
    p.add_argument("--eval-only", action="store_true", help="measure an existing build (skip annotation/training)")
    p.add_argument("--n-eval", type=non_negative_int, default=300,
                   help="held-out problems to measure (0: skip; default %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature of the measure")
    p.add_argument("--eval-threads", type=positive_int, default=1, help="threads of the edge runtime and verifier")
    p.add_argument("--step-ends", type=_step_ends, default=["task"],
                   help="span stop ids measured: task (STEP_END_TEXTS, as eval uses), all (every id holding ; or #), "
                        "or task,all")
    p.add_argument("--llm", type=_model_folder, default=COMMITTED_LLM, help="the verifier's model (default: demo LLM)")
    p.add_argument("--base-onnx", type=Path, help="an existing export of --source (else exported to a temp folder)")
    p.add_argument("--report", type=Path, default=Path("reports/span_slm.json"),
                   help="where the measure is written (default %(default)s)")
    p.set_defaults(func=_span_slm)


def _distill(args) -> int:
    """Fine-tune, save and export a distilled copy of the demo SLM (and the control), then measure them."""
    from models.distill import DistillSpec, control_paths, format_report, run_distill
    from models.export import ExportError

    out, onnx_out = Path(args.out), Path(args.onnx_out)
    control = control_paths(out, onnx_out) if args.control else None
    folders = [out, onnx_out, *(control or ())]
    if len(set(map(Path.resolve, folders))) < len(folders):
        raise UserError(f"--out {out} and --onnx-out {onnx_out} must name different folders (controls included)")
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} exists and is not a folder")
    try:
        record = run_distill(out, onnx_out, DistillSpec(alpha=args.alpha, steps=args.steps, seed=args.seed), control,
                             args.n_eval, args.report, args.threads, "python -m models " + " ".join(args.argv))
    except ExportError as exc:
        raise UserError(str(exc)) from None
    for rec in [record] + ([record["control"]] if control else []):
        print(f"{rec['what']}: {rec['train_seconds']} s, final loss {rec['final_loss']:.4f} -> {rec['export']['onnx']} "
              f"(parity max |diff| {rec['export']['parity']['max_abs_diff']:.2e})")
    if args.n_eval:
        print(format_report(record["measure"]))
        print(f"report -> {args.report}")
    return 0


def _unit_interval(text: str) -> float:
    from argparse import ArgumentTypeError

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _add_distill(sub) -> None:
    from models.distill import DistillSpec

    d = DistillSpec()
    p = sub.add_parser("distill", help="fine-tune a copy of the demo SLM on alpha * KL(LLM || SLM) + (1 - alpha) * "
                                       "cross-entropy (knowledge distillation), export it, measure it")
    p.add_argument("--out", default="build/distilled_slm", help="the distilled transformers folder (default "
                                                                 "%(default)s)")
    p.add_argument("--onnx-out", default="build/distilled_slm-onnx", help="its ONNX export (default %(default)s)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="fine-tuning steps (default %(default)s)")
    p.add_argument("--alpha", type=_unit_interval, default=d.alpha,
                   help="weight of the KL term in [0, 1]; 0 = hard labels only (default %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=d.seed, help="problems, batches and evaluation seeds")
    p.add_argument("--threads", type=positive_int, default=1, help="torch and edge-runtime threads (default "
                                                                   "%(default)s)")
    p.add_argument("--control", action="store_true", help="also the identical fine-tune with alpha = 0 "
                   "(OUT-control, ONNX folder with -control after OUT's name): separates distillation from extra "
                   "training")
    p.add_argument("--n-eval", type=non_negative_int, default=500,
                   help="held-out problems to measure (0: skip; default %(default)s)")
    p.add_argument("--report", type=Path, default=Path("reports/distill.json"),
                   help="where the measure is written (default %(default)s)")
    p.set_defaults(func=_distill)


def _conditioned_slm(args) -> int:
    """Build (choose the LLM layer, fine-tune, save, export) and/or measure a prompt-conditioned SLM
    (models/conditioned.py)."""
    from models.conditioned import (DEFAULT_LLM, ConditionedSpec, control_paths, format_report, llm_layers,
                                    run_conditioned)
    from models.export import ExportError

    out, onnx_out = Path(args.out), Path(args.onnx_out)
    folders = [out, onnx_out, *(control_paths(out, onnx_out) if args.control else ())]
    if len(set(map(Path.resolve, folders))) < len(folders):
        raise UserError(f"--out {out} and --onnx-out {onnx_out} must name different folders (controls included)")
    if args.layer is not None and args.layer > llm_layers(DEFAULT_LLM):
        raise UserError(f"--layer must be auto or in 0..{llm_layers(DEFAULT_LLM)} (the LLM's hidden states), "
                        f"got {args.layer}")
    if args.eval_only and not (onnx_out / "manifest.json").is_file():
        raise UserError(f"--eval-only needs an export in {onnx_out}: run python -m models conditioned-slm first")
    spec = ConditionedSpec(layer=args.layer, steps=args.steps, seed=args.seed)
    try:
        result = run_conditioned(out, onnx_out, spec, args.control, args.n_eval, args.report, tuple(args.temperatures),
                                 args.threads, args.eval_only, "python -m models " + " ".join(args.argv))
    except ExportError as exc:
        raise UserError(str(exc)) from None
    if result["recipe"]:
        rec = result["recipe"]
        print(f"conditioned SLM: LLM layer {rec['conditioning']['layer']}, fine-tuned in {rec['train_seconds']} s, "
              f"validation loss {rec['validation_loss']['llm_rows']:.4f} (zero rows "
              f"{rec['validation_loss']['zero_rows']:.4f}) -> {out}")
    for onnx, export in result["exports"].items():
        print(f"exported -> {onnx} (parity max |diff| {export['parity']['max_abs_diff']:.2e}, conditioning "
              f"{export['conditioning']})")
    if result["measure"]:
        print(format_report(result["measure"]))
        print(f"report -> {args.report}")
    return 0


def _layer(text: str) -> int | None:
    """``auto`` (None: chosen by measurement) or a hidden-state index >= 0."""
    from argparse import ArgumentTypeError

    if text == "auto":
        return None
    if not text.isdigit():
        raise ArgumentTypeError(f"must be auto or an integer >= 0, got {text}")
    return int(text)


def _temperatures(text: str) -> list[float]:
    from argparse import ArgumentTypeError

    try:
        return [non_negative_float(t.strip()) for t in text.split(",")]
    except ValueError:  # float('x'): argparse would print no reason
        raise ArgumentTypeError(f"must be comma-separated numbers >= 0, got {text}") from None


def _add_conditioned_slm(sub) -> None:
    p = sub.add_parser("conditioned-slm", help="LLM-to-SLM prompt conditioning: fine-tune a copy of the demo SLM "
                                               "with a projector reading the frozen demo LLM's prompt states, export "
                                               "it (extra input llm_hidden), measure it")
    p.add_argument("--out", default="build/conditioned_slm", help="the fine-tuned folder: SLM, projector, "
                                                                  "conditioning.json (default %(default)s)")
    p.add_argument("--onnx-out", default="build/conditioned_slm-onnx", help="its ONNX export (default %(default)s)")
    p.add_argument("--layer", type=_layer, default=None, help="the LLM hidden state to read (0 = embeddings .. L), or "
                   "auto: a short fine-tune per candidate, lowest validation loss (default auto)")
    p.add_argument("--steps", type=positive_int, default=400, help="fine-tuning steps (default %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="problems, batches, projector and evaluation seeds")
    p.add_argument("--threads", type=positive_int, default=1, help="torch and edge-runtime threads (default "
                                                                   "%(default)s)")
    p.add_argument("--control", action="store_true", help="also the identical fine-tune with the conditioning zeroed "
                   "(OUT-control, build/conditioned_slm-control-onnx for the defaults): separates the conditioning "
                   "from the extra training")
    p.add_argument("--n-eval", type=non_negative_int, default=500,
                   help="held-out problems to measure SLM-only (0: skip; default %(default)s)")
    p.add_argument("--temperatures", type=_temperatures, default=[1.0, 0.0],
                   help="comma-separated sampling temperatures of the measure (default 1,0)")
    p.add_argument("--eval-only", action="store_true", help="measure an existing build (skip training and export)")
    p.add_argument("--report", type=Path, default=Path("reports/conditioned_slm.json"),
                   help="where the measure is written (default %(default)s)")
    p.set_defaults(func=_conditioned_slm)


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m models", description=__doc__, formatter_class=RawDescriptionHelpFormatter,
                           epilog="Known real pairs (python -m models pairs):\n" + format_pairs())
    sub = parser.add_subparsers()
    p = sub.add_parser("demo-pair", help="rebuild the offline demo pair (tokenizer, LLM, SLM); ~10 min on 2 cores")
    p.add_argument("--out", required=True, help="output folder (gets llm/, slm/, tokenizer/, recipe.json)")
    p.add_argument("--steps", type=positive_int, help="override the training budget (a quick smoke run)")
    p.add_argument("--n-eval", type=positive_int, default=500, help="held-out problems to evaluate")
    p.set_defaults(func=_demo_pair)
    p = sub.add_parser("export", help="export a causal LM to ONNX for the edge (optimum or onnxruntime-genai's "
                                      "builder) with a parity check")
    p.add_argument("--model", required=True, help="hub id or local transformers folder")
    p.add_argument("--out", required=True, help="output folder (model.onnx, tokenizer, manifest.json)")
    p.add_argument("--fp16", action="store_true", help="float16 weights (inputs/outputs stay fp32)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization of MatMul weights")
    p.add_argument("--builder", default="optimum", choices=["optimum", "genai"],
                   help="optimum (default; runs on the ort edge backend) or onnxruntime-genai's model builder "
                        "(fused attention, int4/int8 MatMulNBits; runs on the genai backend; needs `make "
                        "genai-builder`)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4"],
                   help="weights: fp32 (default), fp16, int8, int4 (genai only); --fp16/--int8 are the same")
    p.set_defaults(func=_export)
    p = sub.add_parser("evaluate", help="held-out task accuracy of a transformers model folder")
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=positive_int, default=500)
    p.set_defaults(func=_evaluate)
    p = sub.add_parser("pairs", help="list known real model pairs that share a tokenizer")
    p.set_defaults(func=_pairs)
    _add_span_slm(sub)
    _add_distill(sub)
    _add_conditioned_slm(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    parser.set_defaults(argv=argv)  # recorded in reports (the command that made them)
    return run_cli(parser, argv)
