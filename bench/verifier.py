"""The ``verifier`` section of reports/bench.json: one verifier's capacity with the continuously batched
engine (``--batching on``) against the one-at-a-time engine (``--batching off``), in the same run.

Load: recorded Verify streams (``bench/verifier_streams.py``: what the real edge sent under the ``default``
policy, stop-and-wait, on held-out problems) replayed at full speed by N concurrent sessions (N in
``SESSIONS``) from one asyncio client over loopback, each session on its own channel (its own connection,
like a device). A session replays a recorded stream (its Open, with the recorded seed, so verdicts are
deterministic: randomness is keyed by (seed, position)), sending each Verify when the previous Verdict has
arrived (stop-and-wait, as the edge did; the first Verify goes out right after Open, as the edge's does),
then Close, then the next stream (session k takes streams k, k + N, ...; N above the number of streams
reuses them). Both verifiers (``python -m cloud serve``, child processes, ``--threads`` torch threads) are
up together and the two modes run alternately at each N, so a load change on a shared machine hits both.

Per point (mode, N): every session sends Verifies for ``WARMUP_S + DURATION_S``; those whose Verdict arrived
in the last ``DURATION_S`` are counted (their latencies are the percentiles). Row fields (``verifier.rows``,
one per N and mode):

- ``n_sessions``, ``mode`` ("batched" / "one-at-a-time");
- ``verifies_per_s``: counted Verifies / ``DURATION_S``, all sessions together;
- ``tokens_per_s``: tokens the verifier committed (pending ids + decided drafts, incl. the resample) / s;
- ``p50_ms``, ``p99_ms``: Verify latency at the client (write of the Verify to read of its Verdict);
- ``server_mean_ms``: the verifier's own mean time per Verify over the point (its Prometheus histogram);
- ``mean_batch_rows``: session forwards per model forward during the replay (``verifier_forward_rows_total`` /
  ``verifier_forwards_total``; 1 one-at-a-time), ``generate_mean_batch_rows`` the same during Generate;
- ``verdict_mismatches``: replayed Verdicts that differ from the recorded one (all of them, warm-up included;
  should be 0), ``verdicts_checked``, ``errors`` (sessions that ended with a gRPC error);
- ``generate_tokens_per_s``: cloud-only ``Generate``, N concurrent calls of ``GENERATE_TOKENS`` tokens each
  (no stop ids), rounds repeated for at least ``GENERATE_MIN_S``; tokens / wall time.

Section keys: ``rows``; ``batched_speedup_64`` (batched / one-at-a-time Verifies/s at 64 sessions) and
``p50_ratio_1`` (batched / one-at-a-time p50 at 1 session), null when that N was not run; ``goal``;
``streams`` (how many, Verifies and tokens per stream); ``threads``, ``command``, ``load_average`` (before,
after each N, after), ``machine``.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from bench import verifier_streams as vs
from proto import hybrid_pb2 as pb

SESSIONS = (1, 4, 16, 64)
MODES = (("one-at-a-time", "off"), ("batched", "on"))
THREADS = 1  # torch threads of the verifier: the other core is the client's
PROBLEMS = 64  # held-out problems recorded (those that sent no Verify are dropped)
WARMUP_S = 1.0
DURATION_S = 4.0
GENERATE_TOKENS = 64
GENERATE_MIN_S = 2.0
GOAL_SPEEDUP_64 = 5.0
GOAL_P50_RATIO_1 = 1.2
SESSION_METHOD = "/hybrid.v1.Verifier/Session"
GENERATE_METHOD = "/hybrid.v1.Verifier/Generate"
# Every session its own connection (the default global subchannel pool would share one between channels).
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def _raw(b: bytes) -> bytes:
    return b


# ---------------------------------------------------------------- the load generator


class Point:
    """What one (mode, N) replay measured."""

    def __init__(self, t_from: float, t_to: float):
        self.t_from, self.t_to = t_from, t_to
        self.latencies: list[float] = []  # counted Verifies only
        self.tokens = 0
        self.checked = self.mismatches = self.errors = 0

    def add(self, t0: float, t1: float, tokens: int) -> None:
        # Counted by when the Verdict arrived: counting only Verifies also sent inside the window would drop
        # about one latency's worth of them (a second and more at 64 one-at-a-time sessions).
        if self.t_from <= t1 <= self.t_to:
            self.latencies.append(t1 - t0)
            self.tokens += tokens


async def _replay_stream(channel, stream: vs.Stream, point: Point) -> None:
    """One recorded stream on one Session call, stop-and-wait, until done or the point's end."""
    call = channel.stream_stream(SESSION_METHOD, request_serializer=_raw,
                                 response_deserializer=pb.CloudMessage.FromString)()
    await call.write(stream.open)
    opened = False
    finished = True
    for verify, expected, tokens in zip(stream.verifies, stream.verdicts, stream.tokens):
        if time.perf_counter() >= point.t_to:
            finished = False
            break
        t0 = time.perf_counter()
        await call.write(verify)
        if not opened:  # the edge sends its first Verify without waiting for Opened; so does the replay
            msg = await call.read()
            if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "opened":
                raise RuntimeError(f"expected Opened, got {msg!r}")
            opened = True
        msg = await call.read()
        t1 = time.perf_counter()
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "verdict":
            raise RuntimeError(f"expected a Verdict, got {msg!r}")
        point.checked += 1
        point.mismatches += vs.verdict_key(msg.verdict) != tuple(expected)
        point.add(t0, t1, tokens)
    if finished:
        await call.write(stream.close)
    await call.done_writing()  # cut short: a half-close ends the session just the same
    while await call.read() is not grpc.aio.EOF:  # an Opened never read (cut before the first Verify)
        pass
    if await call.code() != grpc.StatusCode.OK:
        raise RuntimeError(f"session ended with {await call.code()}: {await call.details()}")


async def _session(channel, streams: list[vs.Stream], first: int, step: int, point: Point) -> None:
    i = first
    while time.perf_counter() < point.t_to:
        try:
            await _replay_stream(channel, streams[i % len(streams)], point)
        except (grpc.aio.AioRpcError, RuntimeError):
            point.errors += 1
            await asyncio.sleep(0.05)  # bounded: the loop still ends at t_to
        i += step


async def _channels(address: str, n: int) -> list:
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(n)]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=60)
    return channels


async def _replay(address: str, streams: list[vs.Stream], n: int, warmup_s: float,
                  duration_s: float) -> Point:
    channels = await _channels(address, n)
    try:
        start = time.perf_counter()
        point = Point(start + warmup_s, start + warmup_s + duration_s)
        await asyncio.gather(*(_session(channels[k], streams, k, n, point) for k in range(n)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return point


async def _generate(address: str, requests: list[bytes], n: int, min_s: float) -> tuple[int, float, int]:
    """Rounds of ``n`` concurrent Generate calls until ``min_s`` has passed: (tokens, seconds, errors)."""
    channels = await _channels(address, n)

    async def one(channel, request: bytes) -> int:
        call = channel.unary_stream(GENERATE_METHOD, request_serializer=_raw,
                                    response_deserializer=pb.GenerateChunk.FromString)(request)
        return sum([len(chunk.token_ids) async for chunk in call])

    tokens = errors = rounds = 0
    start = time.perf_counter()
    try:
        while rounds == 0 or time.perf_counter() - start < min_s:
            done = await asyncio.gather(*(one(channels[k], requests[(rounds * n + k) % len(requests)])
                                          for k in range(n)), return_exceptions=True)
            tokens += sum(d for d in done if isinstance(d, int))
            errors += sum(not isinstance(d, int) for d in done)
            rounds += 1
        seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return tokens, seconds, errors


def generate_requests(streams: list[vs.Stream], max_new_tokens: int) -> list[bytes]:
    """Cloud-only requests for the recorded prompts, with their settings and seeds, and no stop ids (so
    every call makes ``max_new_tokens`` tokens)."""
    out = []
    for s in streams:
        op = pb.EdgeMessage.FromString(s.open).open
        request = pb.GenerateRequest(fingerprint=op.fingerprint, sampling=op.sampling,
                                     prompt_ids=op.prompt_ids, max_new_tokens=max_new_tokens, seed=op.seed)
        out.append(request.SerializeToString())
    return out


# ---------------------------------------------------------------- one point, the section


_SERIES = ("verifier_verify_seconds_sum", "verifier_verify_seconds_count", "verifier_forwards_total",
           "verifier_forward_rows_total")


def _scrape(url: str | None) -> dict[str, float]:
    """The verifier's counters this section reads (0 for a series the server does not export)."""
    if not url:
        return dict.fromkeys(_SERIES, 0.0)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = {name: re.findall(rf"^{name} (\S+)$", text, flags=re.M) for name in _SERIES}
    return {name: float(v[0]) if v else 0.0 for name, v in found.items()}


def _per(after: dict, before: dict, num: str, den: str, scale: float = 1.0) -> float | None:
    """Δnum / Δden between two scrapes, or None when nothing was counted."""
    d = after[den] - before[den]
    return (after[num] - before[num]) / d * scale if d > 0 else None


def _ms(seconds: list[float], q: float) -> float | None:
    return float(np.percentile(seconds, q) * 1e3) if seconds else None


def measure_point(verifier, mode: str, n: int, streams: list[vs.Stream], requests: list[bytes],
                  warmup_s: float, duration_s: float, generate_min_s: float) -> dict:
    """One row: replay at N sessions, then Generate at N concurrent calls, against ``verifier``."""
    m0 = _scrape(verifier.metrics_url)
    point = asyncio.run(_replay(verifier.address, streams, n, warmup_s, duration_s))
    m1 = _scrape(verifier.metrics_url)
    gen_tokens, gen_s, gen_errors = asyncio.run(_generate(verifier.address, requests, n, generate_min_s))
    m2 = _scrape(verifier.metrics_url)
    lat = point.latencies
    rows = "verifier_forward_rows_total", "verifier_forwards_total"
    verify_s = "verifier_verify_seconds_sum", "verifier_verify_seconds_count"
    return {"n_sessions": n, "mode": mode, "verifies_per_s": len(lat) / duration_s,
            "tokens_per_s": point.tokens / duration_s, "p50_ms": _ms(lat, 50), "p99_ms": _ms(lat, 99),
            "server_mean_ms": _per(m1, m0, *verify_s, scale=1e3),
            "mean_batch_rows": _per(m1, m0, *rows), "generate_mean_batch_rows": _per(m2, m1, *rows),
            "verifies_counted": len(lat), "verdicts_checked": point.checked,
            "verdict_mismatches": point.mismatches, "errors": point.errors,
            "generate_tokens_per_s": gen_tokens / gen_s, "generate_tokens": gen_tokens,
            "generate_errors": gen_errors}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _ratio(rows: list[dict], n: int, key: str) -> float | None:
    by_mode = {r["mode"]: r for r in rows if r["n_sessions"] == n}
    a, b = by_mode.get("batched", {}).get(key), by_mode.get("one-at-a-time", {}).get(key)
    return a / b if a is not None and b else None


def ensure_streams(address: str, model: Path, llm: Path, problems: int, cache: Path,
                   progress: bool = True) -> tuple[list[vs.Stream], bool]:
    """(streams, whether they came from the cache); records against ``address`` when there are none."""
    from edge.hybrid import DEFAULT_THRESHOLD

    key = vs.cache_key(model, llm, problems, DEFAULT_THRESHOLD)
    path = Path(cache) / f"default-{problems}.json"
    streams = vs.load(path, key)
    if streams is not None:
        return streams, True
    streams = vs.record(address, model, problems, DEFAULT_THRESHOLD, progress=progress)
    if not streams:
        raise RuntimeError(f"none of {problems} recorded generations sent a Verify")
    vs.save(path, key, streams)
    return streams, False


def run(sessions: tuple[int, ...] = SESSIONS, threads: int = THREADS, problems: int = PROBLEMS,
        warmup_s: float = WARMUP_S, duration_s: float = DURATION_S, generate_tokens: int = GENERATE_TOKENS,
        generate_min_s: float = GENERATE_MIN_S, command: str | None = None, model: Path | None = None,
        cache: Path = vs.CACHE, progress: bool = True) -> dict:
    """Both verifiers up, streams recorded (or read back), then every N in both modes alternately."""
    from contextlib import ExitStack

    from core.process import VerifierProcess
    from eval.pair import LLM_DIR, ensure_export

    command = command or shlex.join(["python", "-m", "bench.verifier", *sys.argv[1:]])
    model = Path(model or ensure_export()).resolve()
    load_before = _load()
    capacity = str(max(sessions) + 8)  # the replay's sessions, and room for stragglers still closing
    rows, loads = [], {}
    with ExitStack() as stack:
        verifiers = {}
        for mode, flag in MODES:  # off first: the streams are recorded against the one-at-a-time engine
            verifiers[mode] = stack.enter_context(VerifierProcess(
                str(LLM_DIR), startup_timeout=180,
                extra_args=("--threads", str(threads), "--batching", flag, "--max-sessions", capacity,
                            "--max-pending-opens", capacity, "--metrics-port", "0")))
            if mode == MODES[0][0]:
                streams, cached = ensure_streams(verifiers[mode].address, model, LLM_DIR, problems, cache,
                                                 progress)
        requests = generate_requests(streams, generate_tokens)
        for n in sessions:
            for mode, _ in MODES:
                rows.append(measure_point(verifiers[mode], mode, n, streams, requests, warmup_s, duration_s,
                                          generate_min_s))
                if progress:
                    print(format_row(rows[-1]), flush=True)
            loads[str(n)] = _load()
    verifies = [len(s.verifies) for s in streams]
    return {
        "rows": rows,
        "batched_speedup_64": _ratio(rows, 64, "verifies_per_s"),
        "p50_ratio_1": _ratio(rows, 1, "p50_ms"),
        "verdict_mismatches": sum(r["verdict_mismatches"] for r in rows),
        "goal": {"batched_speedup_64_ge": GOAL_SPEEDUP_64, "p50_ratio_1_le": GOAL_P50_RATIO_1},
        "streams": {"count": len(streams), "from_cache": cached, "problems": problems, "policy": vs.POLICY,
                    "verifies_per_stream": statistics.mean(verifies),
                    "tokens_per_verify": sum(map(sum, (s.tokens for s in streams))) / sum(verifies)},
        "warmup_s": warmup_s, "duration_s": duration_s, "generate_tokens": generate_tokens,
        "threads": threads, "command": command,
        "load_average": {"before": load_before, "after_each_n": loads, "after": _load()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }


# ---------------------------------------------------------------- the table

HEADER = (f"  {'N':>3} {'mode':<13} {'Verifies/s':>10} {'tokens/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'server ms':>9} {'rows':>5} {'mismatch':>8} {'errors':>6} {'Generate tok/s':>14} {'rows':>5}")


def _num(x, fmt: str, width: int) -> str:
    return f"{x:>{width}{fmt}}" if x is not None else f"{'-':>{width}}"


def format_row(r: dict) -> str:
    return (f"  {r['n_sessions']:>3} {r['mode']:<13} {r['verifies_per_s']:>10.1f} {r['tokens_per_s']:>9.1f} "
            f"{_num(r['p50_ms'], '.2f', 7)} {_num(r['p99_ms'], '.2f', 7)} "
            f"{_num(r['server_mean_ms'], '.2f', 9)} {_num(r['mean_batch_rows'], '.1f', 5)} "
            f"{r['verdict_mismatches']:>8} {r['errors'] + r['generate_errors']:>6} "
            f"{r['generate_tokens_per_s']:>14.1f} {_num(r['generate_mean_batch_rows'], '.1f', 5)}")


def format_table(section: dict) -> str:
    s = section["streams"]
    lines = [f"\nverifier: recorded {s['policy']}-policy Verify streams ({s['count']} streams, "
             f"{s['verifies_per_stream']:.1f} Verifies and {s['tokens_per_verify']:.2f} tokens per Verify) "
             f"replayed by N sessions, --batching on vs off, --threads {section['threads']}",
             HEADER, "  " + "-" * (len(HEADER) - 2), *(format_row(r) for r in section["rows"])]
    speedup, ratio = section["batched_speedup_64"], section["p50_ratio_1"]
    if speedup is not None:
        met = "MET" if speedup >= GOAL_SPEEDUP_64 else "NOT MET"
        lines.append(f"  64 sessions: batched {speedup:.2f}x one-at-a-time Verifies/s "
                     f"(goal >= {GOAL_SPEEDUP_64:g}x: {met})")
    if ratio is not None:
        met = "MET" if ratio <= GOAL_P50_RATIO_1 else "NOT MET"
        lines.append(f"  1 session: batched p50 / one-at-a-time p50 = {ratio:.2f} "
                     f"(goal <= {GOAL_P50_RATIO_1:g}: {met})")
    load = section["load_average"]
    lines.append("  rows: session forwards per model forward (the replay's, then Generate's); server ms: the "
                 "verifier's own mean per Verify")
    lines.append(f"  verdict mismatches vs the recording: {section['verdict_mismatches']}; "
                 f"load average {load['before']} before, {load['after']} after")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.verifier``: this section alone, merged into reports/bench.json."""
    import argparse

    from bench import report
    from core.cli import positive_int

    parser = argparse.ArgumentParser(prog="python -m bench.verifier", description=main.__doc__)
    parser.add_argument("--sessions", default=",".join(map(str, SESSIONS)), help="N values, comma-separated")
    parser.add_argument("--threads", type=positive_int, default=THREADS, help="the verifier's torch threads")
    parser.add_argument("--duration", type=float, default=DURATION_S, help="measured seconds per point")
    parser.add_argument("--problems", type=positive_int, default=PROBLEMS, help="held-out problems recorded")
    parser.add_argument("--out", type=Path, default=report.DEFAULT_OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        sessions = tuple(positive_int(x) for x in args.sessions.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        parser.error(f"--sessions: positive integers, comma-separated, got {args.sessions!r}")
    if args.duration <= 0:
        parser.error("--duration must be > 0")
    section = run(sessions, args.threads, args.problems, duration_s=args.duration,
                  command=shlex.join(["python", "-m", "bench.verifier", *argv]))
    report.merge_report(args.out, "verifier", section)
    print(format_table(section))
    print(f"wrote {args.out} (section 'verifier')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
