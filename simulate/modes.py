"""``sim_tokens_per_s`` of the modes table (``python -m eval modes``, bench section ``modes``): every row's mode
recorded on a subset of its problems through eval's Runner (same seeds: the same tokens as the table's first
problems), then its trace replayed by the simulator at one point: 10 Mbit/s uplink, 100 Mbit/s downlink, 50 ms
RTT, one device, the verifier's service time fitted on the trace itself (``simulate/compute.py``).

The simulator replays what each mode's real loop recorded: token-level traces (slm-only, default,
default-pipelined), the cloud-only stream (llm-only) and the span/step loop's traces (mode coarse: spans and
judged steps are round trips whose verifier work is one forward per span token, ``simulate/coarse.py``); it
never re-implements a mode. ``eval`` must not import the simulator, so the table is filled here, afterwards:
``python -m simulate modes --modes reports/modes.json --traces DIR`` or ``fill_modes`` (bench).

Each row gains ``sim_tokens_per_s``, ``sim_trace_tokens_per_s`` (the recorded subset's own tokens/s on
loopback: tokens / the generations' wall time, the figure the simulator's point is to be read against, on the
same problems) and ``sim_problems``; the section gains ``sim`` (the point, the traces' folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from eval.policies import POLICIES, ROUTED
from simulate.config import LinkConfig, SimConfig
from simulate.engine import simulate
from simulate.trace import load_trace

POINT = {"uplink_bps": 10e6, "downlink_bps": 100e6, "rtt_s": 0.05, "devices": 1}
DEFAULT_PROBLEMS = 20
DEFAULT_TRACES = Path("reports/sim/modes_traces")


def trace_path(folder: Path, row: dict) -> Path:
    """One trace per row: ``MODE@T<temperature>.jsonl``."""
    return Path(folder) / f"{row['mode']}@T{row['temperature']:g}.jsonl"


def row_threshold(row: dict) -> float:
    """The row's threshold: the calibrated one the table ran at, else the policy's fixed number."""
    if row.get("threshold") is not None:
        return float(row["threshold"])
    return POLICIES[row["mode"]].threshold_from(None)


def replayable(row: dict) -> bool:
    """Every row but ``routed``: its generations mix two routes (Generate and hybrid) in one run, which one
    trace file of one route cannot hold; its sim_tokens_per_s stays null."""
    return POLICIES[row["mode"]].route != ROUTED


def record_rows(rows: list[dict], runner_for: Callable, problems: list, folder: Path,
                only_missing: bool = False) -> list[Path]:
    """Record each row's mode on ``problems`` into its trace file (``runner_for(temperature, slm)``: an eval
    Runner of the row's edge model at that temperature, the table's channel and seed)."""
    from simulate.testbed.record import record_policy

    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for row in rows:
        path = trace_path(folder, row)
        if (only_missing and path.is_file()) or not replayable(row):
            continue
        policy = POLICIES[row["mode"]]
        record_policy(runner_for(row["temperature"], policy.slm), policy, row_threshold(row), problems, path)
        written.append(path)
    return written


def replay(path: Path, uplink_bps: float = POINT["uplink_bps"], rtt_s: float = POINT["rtt_s"],
           downlink_bps: float = POINT["downlink_bps"], devices: int = POINT["devices"]) -> dict:
    """One trace replayed whole on each of ``devices`` devices; the simulator's metrics."""
    trace = load_trace(path)
    config = SimConfig(traces={"p": str(path)}, policy="p", devices=devices, tokens_per_device=trace.tokens,
                       rtt_s=rtt_s, uplink=LinkConfig(rate_bps=uplink_bps), downlink=LinkConfig(rate_bps=downlink_bps))
    metrics = simulate(config, trace).metrics
    metrics["trace_tokens_per_s"] = trace.tokens / sum(g.seconds for g in trace.generations)
    metrics["trace_generations"] = len(trace.generations)
    return metrics


def fill_rows(section: dict, folder: Path) -> dict:
    """Write ``sim_tokens_per_s`` into every row whose trace is in ``folder`` (the others keep theirs) and the
    point into ``section["sim"]``; returns the section."""
    for row in section["rows"]:
        path = trace_path(folder, row)
        if not path.is_file():
            continue
        metrics = replay(path)
        row["sim_tokens_per_s"] = metrics["tokens_per_s"]
        row["sim_trace_tokens_per_s"] = metrics["trace_tokens_per_s"]
        row["sim_problems"] = metrics["trace_generations"]
    section["sim"] = {**POINT, "traces": str(folder), "service": "trace",
                      "note": "each row's mode recorded on the first problems (same seeds) and replayed whole"}
    return section


def fill_modes(section: dict, runner_for: Callable, problems: list, folder: Path = DEFAULT_TRACES) -> dict:
    """Record every row's trace on ``problems`` and fill the section (bench's ``modes`` section)."""
    record_rows(section["rows"], runner_for, problems, folder)
    fill_rows(section, folder)
    section["sim"]["problems"] = len(problems)
    return section


def format_table(section: dict) -> str:
    head = f"{'mode':<18} {'T':>3} {'tok/s (table)':>13} {'tok/s (trace)':>13} {'sim tok/s':>10}"
    lines = [head, "-" * len(head)]
    for r in section["rows"]:
        def f(x):
            return "-" if x is None else f"{x:.1f}"
        lines.append(f"{r['mode']:<18} {r['temperature']:>3g} {f(r.get('tokens_per_s')):>13} "
                     f"{f(r.get('sim_trace_tokens_per_s')):>13} {f(r.get('sim_tokens_per_s')):>10}")
    p = section.get("sim", {})
    lines.append(f"sim: {p.get('uplink_bps', 0) / 1e6:g} Mbit/s up, {p.get('rtt_s', 0) * 1e3:g} ms RTT, "
                 f"{p.get('devices')} device; 'trace': the recorded problems' own tokens/s on loopback")
    return "\n".join(lines)
