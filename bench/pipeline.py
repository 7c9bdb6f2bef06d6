"""The ``pipeline`` section of reports/bench.json: protocol v2's pipelined edge (``--lookahead N``) against
stop-and-wait (lookahead 0) over a real shaped link, the default policy.

Testbed (``simulate/testbed``, as the simulator's validation): the real edge (``simulate/testbed/edge_run.py``)
and the verifier (``python -m cloud serve --threads 1``) in two network namespaces joined by a veth whose
edge egress (the uplink) is shaped by ``tc tbf`` to 10 Mbit/s; the RTT comes from the userspace relay
(``simulate/testbed/relay.py``: every byte held RTT/2 each way), 20, 50 and 100 ms. Both processes share the
machine's cores, so thread counts are explicit: ORT 1 thread on the edge, torch 1 thread on the verifier.

Per RTT, one edge process runs the same held-out problems (``models.task.held_out_problems``, problem i with
seed i) under every variant: the default policy (``eval/policies.py``) at ``edge.hybrid.DEFAULT_THRESHOLD``
with lookahead 0 (stop-and-wait) and each of LOOKAHEADS, and SLM-only (policy ``slm-only``: no verifier).
Each problem runs under all variants in turn, the order rotating from problem to problem (``edge_run
--lookahead 0,4,16,64 --with-slm-only``), so that a load change on the shared machine hits every variant
alike (measured: SLM-only alone ran at 1,052 and at 260 tokens/s one minute apart on this machine when each
variant had its own process). One unrecorded warm-up generation per variant. Per variant:

- tokens/s = all tokens / the summed wall time of the ``generate_hybrid`` calls (Open handshake included);
  ``median_problem_speedup``: the median over problems of stop-and-wait's wall / this variant's (paired);
- round trips per token (Verifies sent, stale ones included), rolled-back drafts per token, stale Verifies'
  uplink bytes per token;
- identical: every problem's token ids equal stop-and-wait's.

The row's pipelined variant is the lookahead with the most tokens/s (named in ``lookahead``; every variant's
figures are under ``by_lookahead``); the row's ``identical`` is true only if every lookahead measured at that
RTT gave stop-and-wait's tokens on every problem. ``fraction_of_slm_50ms`` = the 50 ms row's pipelined
tokens/s / SLM-only's in the same process. ``ideal`` (per row): what a perfect pipeline could reach on these
problems (see ``ideal_pipeline``).

Where network namespaces cannot be made (not root, no iproute2) the section is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from edge.hybrid import DEFAULT_THRESHOLD

RTTS_MS = (20, 50, 100)
LOOKAHEADS = (4, 16, 64)
UPLINK_BPS = 10e6
PROBLEMS = 200  # held-out problems per RTT, each run under every variant (the identity check covers them all)
EDGE_THREADS = 1  # ORT intra-op threads of the edge
VERIFIER_THREADS = 1  # torch threads of the verifier
POLICY = "default"
HEADLINE_RTT_MS = 50
GOAL_SPEEDUP = 2.0  # pipelined / stop-and-wait tokens/s at 50 ms, with identical tokens
OUT = Path("reports/bench_pipeline")
SLM_ONLY = "slm-only"


# ---------------------------------------------------------------- rows from edge_run's timing files and traces


def generations(trace_lines) -> list[list[dict]]:
    """A trace's token lines (dicts), one list per generation."""
    out: list[list[dict]] = []
    for line in trace_lines:
        row = json.loads(line) if isinstance(line, str) else line
        if row["kind"] == "open":
            out.append([])
        elif row["kind"] == "token":
            out[-1].append(row)
    return out


def ideal_pipeline(gens: list[list[dict]], seconds_per_token: float) -> dict:
    """A perfect pipeline on stop-and-wait's own generations: every token costs ``seconds_per_token`` (SLM-only's
    wall time per token in the same run: what drafting costs with nothing to wait for), each Verify's round
    trip is the one stop-and-wait measured, drafting never blocks (unbounded lookahead, no CPU shared with the
    verifier), but a rejected Verify still costs its whole round trip (what was drafted meanwhile is discarded)
    and the last verdict is still waited for. ``tok_s``: the tokens over the summed replayed times."""
    seconds, tokens, sent, rejected = 0.0, 0, 0, 0
    for gen in gens:
        t, arrivals = 0.0, [0.0]
        for tok in gen:
            t += seconds_per_token
            if tok["sent"]:
                sent += 1
                arrival = t + tok["wait_s"]
                if tok["accepted"]:
                    arrivals.append(arrival)
                else:  # the verdict's token replaces the draft: drafting resumes only when it arrives
                    rejected += 1
                    t = arrival
        seconds += max(t, *arrivals)
        tokens += len(gen)
    return {"tok_s": tokens / seconds if seconds else 0.0, "verifies": sent, "rejected": rejected,
            "acceptance_rate": (sent - rejected) / sent if sent else None}


def variant_stats(timing: dict, reference: dict | None = None) -> dict:
    """One variant's figures from its edge_run timing (``reference``: stop-and-wait's, same problems)."""
    tokens, seconds = sum(timing["tokens"]), sum(timing["walls_s"])

    def per_token(key: str) -> float:
        return sum(timing.get(key, [0])) / tokens if tokens else 0.0

    stats = {"tok_s": tokens / seconds if seconds else 0.0,
             "round_trips_per_token": per_token("round_trips"), "rolled_back_per_token": per_token("rolled_back"),
             "stale_verifies_per_token": per_token("stale_verifies"),
             "stale_uplink_bytes_per_token": per_token("stale_uplink_bytes"),
             "uplink_bytes_per_token": per_token("uplink_bytes"), "tokens": tokens, "seconds": seconds}
    if reference is not None:
        stats["identical"] = timing["token_ids"] == reference["token_ids"]
        ref_tok_s = sum(reference["tokens"]) / sum(reference["walls_s"])
        stats["speedup"] = stats["tok_s"] / ref_tok_s if ref_tok_s else 0.0
        stats["median_problem_speedup"] = statistics.median(
            r / w for r, w in zip(reference["walls_s"], timing["walls_s"]))
    return stats


def build_row(rtt_ms: float, variants: dict[str, dict], stop_gens: list[list[dict]] | None = None) -> dict:
    """One RTT's row from an interleaved edge_run's timing ``variants`` (``la0``, ``la4``, ..., optionally
    ``slm-only``) and, for ``ideal``, stop-and-wait's generations (its trace)."""
    stop = variants["la0"]
    base = variant_stats(stop)
    by_lookahead = {int(label[2:]): variant_stats(t, stop) for label, t in variants.items()
                    if label.startswith("la") and label != "la0"}
    best = max(by_lookahead, key=lambda k: by_lookahead[k]["tok_s"])
    chosen = by_lookahead[best]
    slm = variants.get(SLM_ONLY)
    slm_tok_s = variant_stats(slm)["tok_s"] if slm else None
    ideal = None
    if slm and stop_gens:
        ideal = ideal_pipeline(stop_gens, sum(slm["walls_s"]) / sum(slm["tokens"]))
        ideal["speedup"] = ideal["tok_s"] / base["tok_s"]
    return {"rtt_ms": rtt_ms, "stop_and_wait_tok_s": base["tok_s"], "pipelined_tok_s": chosen["tok_s"],
            "lookahead": best, "speedup": chosen["speedup"], "median_problem_speedup": chosen["median_problem_speedup"],
            "round_trips_per_token": chosen["round_trips_per_token"],
            "rolled_back_per_token": chosen["rolled_back_per_token"],
            "stale_uplink_bytes_per_token": chosen["stale_uplink_bytes_per_token"],
            "identical": all(s["identical"] for s in by_lookahead.values()),
            "stop_and_wait_round_trips_per_token": base["round_trips_per_token"],
            "slm_only_tok_s": slm_tok_s, "fraction_of_slm": chosen["tok_s"] / slm_tok_s if slm_tok_s else None,
            "ideal": ideal, "stop_and_wait": base, "by_lookahead": {str(k): v for k, v in by_lookahead.items()}}


def summarize(rows: list[dict], problems: int, command: str, load_average: dict, **extra) -> dict:
    """The section: rows, the 50 ms figures, identity over every row."""
    headline = {r["rtt_ms"]: r for r in rows}.get(HEADLINE_RTT_MS)
    return {
        "rows": rows,
        "speedup_50ms": headline["speedup"] if headline else None,
        "identical": bool(rows) and all(r["identical"] for r in rows),
        "fraction_of_slm_50ms": headline["fraction_of_slm"] if headline else None,
        "slm_only_tok_s_50ms": headline["slm_only_tok_s"] if headline else None,
        "goal": {"speedup_50ms_ge": GOAL_SPEEDUP, "identical": True},
        "problems": problems, "command": command, "load_average": load_average, **extra,
    }


def skipped(reason: str, problems: int, command: str) -> dict:
    return {"rows": [], "speedup_50ms": None, "identical": None, "fraction_of_slm_50ms": None, "skipped": reason,
            "problems": problems, "command": command, "load_average": {"before": _load()}}


# ---------------------------------------------------------------- the testbed run


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _edge(bed, out: Path, model: Path, tag: str, problems: int, verifier: str, lookaheads: list[int]) -> dict:
    """One interleaved edge_run in the edge namespace; returns its timing file's contents."""
    from core.process import ROOT, project_env

    trace, timing = out / f"{tag}.jsonl", out / f"{tag}.timing.json"
    cmd = [*bed.prefix(bed.edge_ns), sys.executable, "-m", "simulate.testbed.edge_run", "--model", str(model),
           "--verifier", verifier, "--policy", POLICY, "--threshold", str(DEFAULT_THRESHOLD),
           "--problems", str(problems), "--lookahead", ",".join(map(str, lookaheads)), "--with-slm-only",
           "--threads", str(EDGE_THREADS), "--trace", str(trace), "--timing", str(timing)]
    done = subprocess.run(cmd, cwd=ROOT, env=project_env(), capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"edge run {tag} failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(timing.read_text())


def run(problems: int = PROBLEMS, rtts_ms: tuple = RTTS_MS, lookaheads: tuple = LOOKAHEADS,
        command: str | None = None, out: Path = OUT, model: Path | None = None, progress: bool = True) -> dict:
    """Measure every RTT on one testbed and one verifier; a skipped section where namespaces cannot be made."""
    from simulate.testbed.netns import CLOUD_IP, Testbed, unavailable_reason

    command = command or shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    reason = unavailable_reason()
    if reason:
        return skipped(reason, problems, command)
    from core.process import ChildProcess, VerifierProcess
    from eval.pair import LLM_DIR, ensure_export
    from simulate.testbed.relay import READY_PREFIX

    model = (model or ensure_export()).resolve()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    rows, loads = [], {}
    with Testbed() as bed:
        qdisc = bed.shape(UPLINK_BPS)
        with VerifierProcess(str(LLM_DIR), prefix=tuple(bed.prefix(bed.cloud_ns)), startup_timeout=180,
                             extra_args=("--threads", str(VERIFIER_THREADS))) as verifier:
            port = verifier.address.rpartition(":")[2]
            for rtt_ms in rtts_ms:
                relay_cmd = [*bed.prefix(bed.cloud_ns), sys.executable, "-m", "simulate.testbed.relay", "--listen",
                             f"{CLOUD_IP}:0", "--target", f"127.0.0.1:{port}", "--delay", str(rtt_ms / 2000)]
                with ChildProcess(relay_cmd, READY_PREFIX, timeout=60) as relay:
                    timing = _edge(bed, out, model, f"{rtt_ms:g}ms", problems, relay.address, [0, *lookaheads])
                variants = timing["variants"]
                stop_gens = generations(Path(variants["la0"]["trace"]).read_text().splitlines())
                rows.append(build_row(rtt_ms, variants, stop_gens))
                loads[f"{rtt_ms:g}ms"] = _load()
                if progress:
                    print(format_row(rows[-1]), flush=True)
    return summarize(rows, problems, command, {"before": load_before, "after_each_rtt": loads},
                     policy=POLICY, threshold=DEFAULT_THRESHOLD, uplink_bps=UPLINK_BPS, qdisc=qdisc,
                     lookaheads=list(lookaheads), edge_threads=EDGE_THREADS, verifier_threads=VERIFIER_THREADS,
                     cpus=os.cpu_count(), out=str(out))


# ---------------------------------------------------------------- the table

HEADER = (f"  {'RTT':>6} {'stop&wait tok/s':>15} {'pipelined tok/s':>15} {'lookahead':>9} {'speedup':>7} "
          f"{'RT/tok':>7} {'rolled/tok':>10} {'stale B/tok':>11} {'identical':>9} {'SLM tok/s':>9} {'ideal':>6}")


def format_row(r: dict) -> str:
    slm = f"{r['slm_only_tok_s']:>9.1f}" if r.get("slm_only_tok_s") else f"{'-':>9}"
    ideal = f"{r['ideal']['speedup']:>5.2f}x" if r.get("ideal") else f"{'-':>6}"
    return (f"  {r['rtt_ms']:>4g}ms {r['stop_and_wait_tok_s']:>15.1f} {r['pipelined_tok_s']:>15.1f} "
            f"{r['lookahead']:>9} {r['speedup']:>6.2f}x {r['round_trips_per_token']:>7.3f} "
            f"{r['rolled_back_per_token']:>10.3f} {r['stale_uplink_bytes_per_token']:>11.2f} "
            f"{'yes' if r['identical'] else 'NO':>9} {slm} {ideal}")


def format_table(section: dict) -> str:
    lines = ["\npipeline: protocol v2 (--lookahead) vs stop-and-wait, real netns link (10 Mbit/s up), default policy"]
    if section.get("skipped"):
        lines.append(f"  skipped ({section['skipped']})")
        return "\n".join(lines)
    lines += [HEADER, "  " + "-" * (len(HEADER) - 2), *(format_row(r) for r in section["rows"])]
    speedup, fraction = section.get("speedup_50ms"), section.get("fraction_of_slm_50ms")
    if speedup is not None:
        goal = "meets" if speedup >= GOAL_SPEEDUP and section["identical"] else "misses"
        lines.append(f"  50 ms: {speedup:.2f}x stop-and-wait ({goal} the goal >= {GOAL_SPEEDUP:g}x with identical "
                     "tokens)")
    if fraction is not None:
        lines.append(f"  50 ms: pipelined = {fraction:.1%} of SLM-only")
    lines.append("  ideal: a perfect pipeline's speedup on stop-and-wait's own generations (drafting at SLM-only's "
                 "speed; rejections and the last verdict still cost their round trip)")
    lines.append(f"  identical tokens at every RTT and lookahead: {'yes' if section['identical'] else 'NO'}; "
                 f"{section['problems']} problems per variant; load average {section['load_average']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.pipeline``: this section alone, merged into reports/bench.json."""
    import argparse

    from bench import report

    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=main.__doc__)
    parser.add_argument("--problems", type=int, default=PROBLEMS)
    parser.add_argument("--out", type=Path, default=report.DEFAULT_OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.problems < 1:
        parser.error("--problems must be >= 1")
    section = run(args.problems, command=shlex.join(["python", "-m", "bench.pipeline", *argv]))
    report.merge_report(args.out, "pipeline", section)
    print(format_table(section))
    print(f"wrote {args.out} (section 'pipeline')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
