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
    try:
        manifest = export_model(args.model, Path(args.out), fp16=args.fp16, int8=args.int8)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    print(f"exported {args.model} -> {args.out}/{manifest.model_file} ({manifest.dtype}, opset {manifest.opset}); "
          f"parity max |diff| {manifest.parity['max_abs_diff']:.2e} (tolerance {manifest.parity['tolerance']})")
    return 0


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
    p = sub.add_parser("export", help="export a causal LM to ONNX for the edge (optimum) with a parity check")
    p.add_argument("--model", required=True, help="hub id or local transformers folder")
    p.add_argument("--out", required=True, help="output folder (model.onnx, tokenizer, manifest.json)")
    p.add_argument("--fp16", action="store_true", help="float16 weights (inputs/outputs stay fp32)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantization of MatMul weights")
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
