"""`python -m bench`: run the edge decode benchmark and the other sections, merge each into reports/bench.json, print
their tables."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from eval.modes import format_table as format_modes

from bench import (decode_models, edge_decode, edge_real, pipeline, quality, report, sim, threads, uncertainty_cost,
                   verifier)


MODES_TR_PROBLEMS = 200  # the modes section's tr_at_99 threshold scan: problems per scanned point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=report.DEFAULT_OUT, help="JSON report (merged into)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median reported)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run (>= 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both ORT and PyTorch")
    parser.add_argument(
        "--slm",
        type=Path,
        default=decode_models.DEFAULT_SLM_DIR,
        help="demo SLM transformers folder (its tokenizer is also the 50M model's)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=decode_models.DEFAULT_CACHE_DIR,
        help="where the 50M model and the ONNX exports are built once and reused",
    )
    parser.add_argument("--skip-quality", action="store_true",
                        help="skip the quality sweep (quality.tr_at_99 & co., ~10 min on 2 cores)")
    parser.add_argument("--skip-sim", action="store_true", help="skip the simulator section (sim.*)")
    parser.add_argument("--skip-edge-real", action="store_true",
                        help="skip the edge_real section (our edge vs onnxruntime-genai's own search on the "
                             "Qwen2.5-0.5B shape and the 42M Llama, fp32/int8/int4; ~15 min cold, ~6 min warm)")
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="skip the pipeline section (protocol v2 lookahead vs stop-and-wait on the netns "
                             "testbed, ~6 min; skipped with the reason where namespaces cannot be made)")
    parser.add_argument("--skip-verifier", action="store_true",
                        help="skip the verifier section (recorded default-policy Verify streams replayed by 1-64 "
                             "sessions against --batching on and off, and Generate; ~3 min)")
    parser.add_argument("--verifier-threads", type=int, default=verifier.THREADS,
                        help="torch threads of the verifier section's verifiers (default 1: the load generator "
                             "needs a core too)")
    parser.add_argument("--skip-modes", action="store_true",
                        help="skip the modes section (every collaboration mode on the same problems at T = 1 and 0, "
                             "python -m eval modes, with tr_at_99 scans; ~30 min, plus ~40 min once to build the "
                             "span, conditioned and distilled SLMs)")
    parser.add_argument("--modes-problems", type=int, default=300, help="held-out problems per mode (default 300)")
    parser.add_argument("--skip-validation", action="store_true",
                        help="sim section without the netns validation (sim.validation_max_error)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.tokens < 2 or args.threads < 1 or args.verifier_threads < 1:
        print("python -m bench: error: need --repeats >= 1, --tokens >= 2, --threads >= 1, --verifier-threads >= 1",
              file=sys.stderr)
        return 2
    try:
        models = decode_models.prepare_default_models(args.slm, args.cache)
    except FileNotFoundError as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "bench", *argv])
    section = edge_decode.run(models, args.repeats, args.tokens, args.threads, command)
    section["uncertainty_cost"] = uncertainty_cost.measure(models, section, args.threads)
    report.merge_report(args.out, "edge", section)
    print(report.format_table(section))
    print(uncertainty_cost.format_table(section["uncertainty_cost"]))
    print(f"\nwrote {args.out} (section 'edge')")
    if not args.skip_edge_real:
        section = edge_real.run(args.cache, args.slm, repeats=args.repeats, n_tokens=args.tokens,
                                threads=args.threads, command=command)
        report.merge_report(args.out, "edge_real", section)
        print(edge_real.format_table(section))
        print(f"wrote {args.out} (section 'edge_real')")
    if not args.skip_quality:
        from eval.pair import ensure_export

        ensure_export()  # the config's edge model
        section = quality.run()
        report.merge_report(args.out, "quality", section)
        print(quality.format_table(section))
        print(f"wrote {args.out} (section 'quality')")
    if not args.skip_sim:
        section = sim.run(skip_validation=args.skip_validation)
        report.merge_report(args.out, "sim", section)
        print(sim.format_table(section))
        print(f"wrote {args.out} (section 'sim')")
    if not args.skip_pipeline:
        section = pipeline.run(command=command)
        report.merge_report(args.out, "pipeline", section)
        print(pipeline.format_table(section))
        print(f"wrote {args.out} (section 'pipeline')")
    if not args.skip_verifier:
        section = verifier.run(threads=args.verifier_threads, command=command)
        section["thread_default"] = threads.run()  # forward times at 1 thread, the default, all cores, 4x
        report.merge_report(args.out, "verifier", section)
        print(verifier.format_table(section))
        print(f"wrote {args.out} (section 'verifier')")
    if not args.skip_modes:
        section = _modes_section(args.modes_problems, command)
        report.merge_report(args.out, "modes", section)
        print(format_modes(section))
        print(f"wrote {args.out} (section 'modes')")
    return 0


def _modes_section(problems: int, command: str) -> dict:
    """``python -m eval modes`` at its defaults (T = 1 and 0, the demo pair, a local verifier, one thread each),
    then ``sim_tokens_per_s`` of every row: its mode recorded on the first ``simulate.modes.DEFAULT_PROBLEMS``
    problems (same seeds) and replayed by the simulator at 10 Mbit/s, 50 ms RTT, one device (``simulate/modes.py``)."""
    from eval.modes import modes_runners, run_modes
    from models.task import held_out_problems
    from simulate.modes import DEFAULT_PROBLEMS, fill_modes

    with modes_runners(threads=1) as runner_for:
        section = run_modes(runner_for, held_out_problems(problems), (1.0, 0.0), 60, command,
                            tr_problems=min(problems, MODES_TR_PROBLEMS))
        return fill_modes(section, runner_for, held_out_problems(min(problems, DEFAULT_PROBLEMS)))


if __name__ == "__main__":
    raise SystemExit(main())
