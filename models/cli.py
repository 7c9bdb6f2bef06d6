"""Command line of `python -m models`: demo-pair, export, evaluate, pairs."""

from __future__ import annotations

import json
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from core.cli import OneLineParser, UserError, positive_int, run_cli
from models.registry import format_pairs


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
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
