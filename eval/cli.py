"""Command line of `python -m eval`: calibration, the accuracy–transmission frontier sweep, and the modes table.

Both run held-out task problems through the real edge loop against a real verifier (started locally from
the sweep config's ``verifier_model`` when no address is given).
"""

from __future__ import annotations

from argparse import ArgumentTypeError

from core.cli import OneLineParser, UserError, address, non_negative_float, non_negative_int, positive_int, run_cli
from edge.calibration import save_calibration
from edge.manifest import ModelFolderError
from edge.runtime import PROVIDER_ALIASES
from eval.modes import MODES
from proto.distribution import CODEC_NAMES


def _calibrate(args) -> int:
    from edge.client import VerifierError, connect
    from edge.model import EdgeModel
    from core.sampling import SamplingSettings
    from eval.taskeval import Runner, load_prompts, run_calibration
    from proto.distribution import CodecSpec

    cal_prompts, test_prompts = load_prompts(args.prompts, args.n, args.n_test)
    model = EdgeModel(args.model, providers=args.provider)
    settings = SamplingSettings(temperature=args.temperature)
    try:
        channel = connect(args.verifier, timeout=args.timeout)
        data = run_calibration(Runner(model, channel, settings, args.seed), cal_prompts, test_prompts,
                               CodecSpec(args.codec), args.max_new_tokens, args.target, args.tolerated)
    except VerifierError as exc:
        raise UserError(str(exc)) from None
    save_calibration(args.out, data)
    print(f"{'estimator':<13} {'a':>7} {'b':>7} {'r2':>5}  {'rule':<9} {'u_th':>9} {'test TR':>7} "
          f"{'pred beta':>9} {'meas beta':>9}")
    for name, fit in data["fits"].items():
        for rule, t in data["test"][name].items():
            print(f"{name:<13} {fit['a']:>7.3f} {fit['b']:>7.3f} {fit['r2']:>5.2f}  {rule:<9} {t['threshold']:>9.4g} "
                  f"{t['transmission_rate']:>7.3f} {t['predicted_skipped_beta']:>9.4f} {t['measured_skipped_beta']:>9.4f}")
    print(f"wrote {args.out} ({data['n_calibration_tokens']} calibration tokens, {data['n_test_tokens']} test tokens)")
    return 0


def _sweep(args) -> int:
    from pathlib import Path

    from edge.client import VerifierError, connect
    from edge.model import EdgeModel
    from eval.sweep import load_config
    from eval.plots import plot_frontier

    config = load_config(args.config)
    out = Path(args.out)
    model = EdgeModel(config.model, providers=args.provider)
    try:
        if config.verifier:
            rows = _sweep_with(config, out, model, connect(config.verifier, timeout=args.timeout))
        else:
            from core.process import VerifierProcess

            with VerifierProcess(config.verifier_model) as verifier:
                rows = _sweep_with(config, out, model, connect(verifier.address, timeout=args.timeout))
    except VerifierError as exc:
        raise UserError(str(exc)) from None
    for path in plot_frontier(rows, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'frontier.csv'} ({len(rows)} points)")
    return 0


def _sweep_with(config, out, model, channel):
    from core.sampling import SamplingSettings
    from eval.sweep import run_sweep
    from eval.taskeval import Runner

    try:
        return run_sweep(config, out, Runner(model, channel, SamplingSettings(), config.seed))
    finally:
        channel.close()


def _modes(args) -> int:
    import json
    import shlex
    import sys
    from pathlib import Path

    from edge.client import VerifierError
    from eval.modes import format_table, modes_runners, run_modes
    from models.task import held_out_problems

    command = shlex.join(["python", "-m", "eval", *sys.argv[1:]])
    try:
        with modes_runners(args.threads, args.provider, args.verifier, args.seed, args.timeout,
                           args.model) as runner_for:
            section = run_modes(runner_for, held_out_problems(args.problems), tuple(args.temperatures),
                                args.calibration_problems, command, tuple(args.modes), args.tr_problems)
    except VerifierError as exc:
        raise UserError(str(exc)) from None
    print(format_table(section))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(section, indent=2) + "\n")
    print(f"wrote {out}")
    from eval.plots import plot_modes
    from eval.sweep import read_rows

    frontier = read_rows(Path(args.frontier)) if args.frontier and Path(args.frontier).is_file() else None
    for path in plot_modes(section["rows"], out.parent, frontier):
        print(f"wrote {path}")
    return 0


def _route(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from edge.client import VerifierError
    from eval.modes import modes_runners
    from eval.routing import format_report, run_routing_report

    command = shlex.join(["python", "-m", "eval", *sys.argv[1:]])
    try:
        with modes_runners(args.threads, args.provider, args.verifier, args.seed, args.timeout) as runner_for:
            report = run_routing_report(runner_for, args.temperatures, args.train_problems, args.calibration_problems,
                                        args.problems, args.token_calibration_problems, args.first_k,
                                        tuple(args.token_thresholds), Path(args.out), command)
    except VerifierError as exc:
        raise UserError(str(exc)) from None
    print(format_report(report))
    print(f"wrote {args.out}")
    return 0


def _thresholds(text: str) -> list[float]:
    try:
        return [non_negative_float(t) for t in text.split(",") if t.strip()]
    except (ValueError, ArgumentTypeError):
        raise ArgumentTypeError(f"{text!r}: give comma-separated numbers >= 0, e.g. 0.1,0.05") from None


def _mode_names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if not names or unknown:
        raise ArgumentTypeError(f"{text[:80]!r}: give comma-separated modes out of {', '.join(MODES)}")
    return names


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ArgumentTypeError(f"{text[:80]!r} is not a comma-separated list of numbers, e.g. 1,0") from None
    if not values or any(not 0 <= v <= 10 for v in values):
        raise ArgumentTypeError(f"{text[:80]!r}: give temperatures in [0, 10], e.g. 1,0")
    return values


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m eval", description="Experiment harness: calibration and frontier sweeps.")
    sub = parser.add_subparsers()
    p = sub.add_parser("calibrate", help="fit uncertainty -> rejection on verify-all runs and pick thresholds")
    p.add_argument("--model", required=True, help="ONNX export folder of the edge model")
    p.add_argument("--verifier", required=True, type=address, help="HOST:PORT of the verifier")
    p.add_argument("--prompts", required=True, help="'demo' (task problems) or a file with one prompt per line")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--n", type=positive_int, default=60, help="calibration prompts")
    p.add_argument("--n-test", type=positive_int, default=60, help="disjoint test prompts (checks the prediction)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0)
    p.add_argument("--codec", default="full32", choices=CODEC_NAMES, help="p~ used for beta (full32 = p itself)")
    p.add_argument("--target", type=non_negative_float, default=0.005,
                   help="empirical rule: tolerated mean rejection probability of skipped tokens")
    p.add_argument("--tolerated", type=non_negative_float, default=0.1, help="risk-prone rule's tolerated beta")
    p.add_argument("--max-new-tokens", type=positive_int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--timeout", type=non_negative_float, default=30.0)
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("sweep", help="accuracy-transmission frontier over thresholds x estimators x codecs")
    p.add_argument("--config", required=True, help="sweep config JSON (see README)")
    p.add_argument("--out", required=True, help="output folder: frontier.csv and PNG plots (resumable)")
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--timeout", type=non_negative_float, default=30.0)
    p.set_defaults(func=_sweep)
    p = sub.add_parser("modes", help="every collaboration mode side by side on the same problems, seeds and verifier")
    p.add_argument("--model", help="ONNX export folder used in place of the demo SLM's export (the modes that run "
                   "their own edge model keep it, eval/slms.py)")
    p.add_argument("--verifier", type=address, help="HOST:PORT of a verifier (default: start the demo LLM's)")
    p.add_argument("--problems", type=positive_int, default=300, help="held-out problems per mode and temperature")
    p.add_argument("--modes", type=_mode_names, default=list(MODES),
                   help="comma-separated modes (default: all; a missing edge model is built first)")
    p.add_argument("--tr-problems", type=non_negative_int, default=0,
                   help="tr_at_99 of the token-level rows (default, conditioned, distilled) on the first N problems: "
                        "a threshold scan per row (0 = skip, the default)")
    p.add_argument("--temperatures", type=_temperatures, default=[1.0, 0.0], help="comma-separated (default 1,0)")
    p.add_argument("--calibration-problems", type=positive_int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="edge (ORT) and local verifier threads")
    p.add_argument("--out", default="reports/modes.json", help="JSON to write (default reports/modes.json); the "
                   "plots go next to it")
    p.add_argument("--frontier", default="reports/frontier/frontier.csv",
                   help="a sweep's frontier.csv to draw the default's threshold curve from, when it exists")
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--timeout", type=non_negative_float, default=30.0)
    p.set_defaults(func=_modes)
    p = sub.add_parser("route", help="prompt-level routing: train, calibrate and measure the edge's router "
                       "(hybrid vs cloud-only per prompt)")
    p.add_argument("--verifier", type=address, help="HOST:PORT of a verifier (default: start the demo LLM's)")
    p.add_argument("--problems", type=positive_int, default=200, help="held-out problems per row and temperature")
    p.add_argument("--train-problems", type=positive_int, default=300, help="training-split problems to fit on")
    p.add_argument("--calibration-problems", type=positive_int, default=200,
                   help="training-split problems the routing threshold is calibrated on")
    p.add_argument("--token-calibration-problems", type=positive_int, default=60,
                   help="problems the default's token threshold is calibrated on (as eval modes)")
    p.add_argument("--first-k", type=positive_int, default=4, help="tokens the first-k router drafts")
    p.add_argument("--token-thresholds", type=_thresholds, default=[0.2, 0.1, 0.05, 0.02, 0.01, 0.005],
                   help="default's token thresholds swept for the equal-accuracy comparison (those below its own)")
    p.add_argument("--temperatures", type=_temperatures, default=[0.0, 1.0], help="comma-separated (default 0,1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="edge (ORT) and local verifier threads")
    p.add_argument("--out", default="reports/routing.json", help="JSON to write; the routers go next to it")
    p.add_argument("--provider", default="auto", choices=["auto", *PROVIDER_ALIASES])
    p.add_argument("--timeout", type=non_negative_float, default=30.0)
    p.set_defaults(func=_route)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, user_errors=(ModelFolderError, ValueError))
