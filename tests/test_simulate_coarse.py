"""The simulator on coarse traces (spans and judged steps, ``edge/coarse.py``): the lines written by
``proto/trace.py`` load back; span, step and block round trips replay to hand-computed times (the verifier's
forwards: a span of k tokens is k forwards); the recorded replay accounts for the wall time; the loader names
what is wrong with a line; the trace-fitted service model recovers a per-forward cost."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from proto import trace as tr
from proto.trace import RoundTripRecord, TokenRecord
from simulate.compute import ServiceModel, fit_service, rpc_overhead
from simulate.config import parse_config
from simulate.engine import Simulation
from simulate.framing import Framing
from simulate.trace import TraceError, coarse_forwards, load_trace

PROMPT, OPEN_UP, CLOSE_UP = 9, 70, 7
FAST = 1e12  # bit/s: serialization negligible
FREE = ServiceModel(0.0, 0.0, 1, None)


def draft(position: int, step_s: float = 0.001, sent: bool = False, dropped: bool = False, step: int | None = None):
    record = TokenRecord.kept(position, 5, 0.5, 0.5, step_s)
    record.sent, record.rolled_back = sent, dropped
    return record, step


def rt(kind: str, position: int, pending: int, span: int = 0, up: int = 300, down: int = 40, server: float = 0.0,
       wait: float = 0.05, encode: float = 0.0, prefill: float = 0.0, **kw) -> RoundTripRecord:
    return RoundTripRecord(kind, position, pending, up, down, server, 0.0, wait, encode, prefill, span, **kw)


def generation(events: list, tokens: int, open_s: float = 0.0, untimed: float = 0.0, correct: bool | None = True) -> str:
    """One coarse generation's lines from (TokenRecord, step) and RoundTripRecord events, written with the
    project's own writers; ``seconds`` = everything timed + ``untimed``."""
    out = io.StringIO()
    rounds = [e for e in events if isinstance(e, RoundTripRecord)]
    drafts = [e for e in events if not isinstance(e, RoundTripRecord)]
    seconds = (open_s + untimed + sum(r.slm_step_s for r, _ in drafts)
               + sum(r.encode_s + r.wait_s + r.prefill_s for r in rounds))
    up = OPEN_UP + sum(r.bytes for r in rounds) + (CLOSE_UP if rounds else 0)
    tr.write_open(out, PROMPT, "max-prob", {"name": "adaptive"}, 0.1, 1.0, True, OPEN_UP, 0, mode="coarse",
                  open_s=open_s, collab="test")
    for e in events:
        if isinstance(e, RoundTripRecord):
            tr.write_round_trip(out, e)
        else:
            tr.write_coarse_token(out, *e)
    tr.write_close(out, tokens, up, 60 + sum(r.down_bytes for r in rounds), seconds, "text")
    if correct is not None:
        tr.write_task(out, correct)
    return out.getvalue()


def span_generation(step_s: float = 0.001, **kw) -> str:
    """Span mode: 3 drafts kept, the 4th triggers a span of 4 LLM tokens (pending 3), 2 drafts kept: 9 tokens."""
    p = PROMPT
    events = [draft(p, step_s), draft(p + 1, step_s), draft(p + 2, step_s), draft(p + 3, step_s, sent=True, dropped=True),
              rt("span", p + 3, 3, span=4, **kw), draft(p + 7, step_s), draft(p + 8, step_s)]
    return generation(events, 9)


def step_generation() -> str:
    """Step judging: step 0 (3 ids) judged and kept; step 1 (2 drafts) not sent (gated); step 2 (2 ids) judged,
    rejected and regenerated as 3 LLM tokens: 3 + 2 + 3 = 8 tokens."""
    p = PROMPT
    events = [draft(p, sent=True, step=0), draft(p + 1, sent=True, step=0), draft(p + 2, sent=True, step=0),
              rt("step", p, 0, step_tokens=3, accepted=True, step_index=0),
              draft(p + 3, step=1), draft(p + 4, step=1),
              draft(p + 5, sent=True, dropped=True, step=2), draft(p + 6, sent=True, dropped=True, step=2),
              rt("step", p + 5, 2, span=3, step_tokens=2, accepted=False, step_index=2)]
    return generation(events, 8)


def block_generation() -> str:
    """Exact step verification: step 0 drafts 4, its first uncertain position is the 2nd: 1 pending, a block of 3,
    1 accepted, the LLM's token at the 2nd (3 tokens); step 1: a block of 2, both accepted (5 tokens)."""
    p = PROMPT
    events = [draft(p, step=0), draft(p + 1, sent=True, step=0), draft(p + 2, sent=True, dropped=True, step=0),
              draft(p + 3, sent=True, dropped=True, step=0),
              rt("block", p + 1, 1, block_tokens=3, accepted_count=1, accepted=False, step_index=0),
              draft(p + 3, sent=True, step=1), draft(p + 4, sent=True, step=1),
              rt("block", p + 3, 0, block_tokens=2, accepted_count=2, accepted=True, step_index=1)]
    return generation(events, 5)


def write(tmp_path, *generations: str) -> str:
    path = tmp_path / "coarse.jsonl"
    path.write_text("".join(generations))
    return str(path)


def simulation(path, rtt=0.1, rate=FAST, service=FREE, recorded=False, **over) -> Simulation:
    trace = load_trace(path)
    raw = {"traces": {"c": str(path)}, "policy": "c", "devices": 1, "tokens_per_device": trace.tokens,
           "verifier": {"rpc_overhead_s": 0.0},
           "network": {"rtt_s": rtt, "uplink": {"rate_bps": rate}, "downlink": {"rate_bps": FAST}}, **over}
    return Simulation(parse_config(raw), trace, service, recorded=recorded)


def test_the_writers_lines_load_back(tmp_path):
    trace = load_trace(write(tmp_path, span_generation(), step_generation(), block_generation()))
    assert trace.mode == "coarse" and [g.tokens for g in trace.generations] == [9, 8, 5]
    span, step, block = (g.coarse for g in trace.generations)
    assert span.kind == ("span",) and span.tails == ((PROMPT + 3, 1, 1, 1),) and list(span.llm) == [4]
    assert step.kind == ("step", "step") and step.tails == ((PROMPT + 2,), (1 + 2 + 1, 1, 1, 1))
    assert block.tails == ((PROMPT + 1 + 2,), (1 + 1,)) and list(block.llm) == [1, 0]
    assert list(span.kept) == [True, True, True, False, True, True] and list(step.draft_step) == [0, 0, 0, 1, 1, 2, 2]
    # TR: a span counts its trigger, a judged step each id, a block each position
    assert trace.transmission_rate == pytest.approx((1 + 5 + 5) / (9 + 8 + 5))
    assert trace.grpc_up_bytes == 3 * OPEN_UP + 5 * 300 + 3 * CLOSE_UP
    assert trace.accuracy == 1.0 and all(g.close_up == CLOSE_UP for g in trace.generations)


def test_verifier_forwards_follow_the_engine():
    """Uncached ids carried into the next forward: the prompt at first, 1 after any forward."""
    assert coarse_forwards("span", PROMPT, 3, 0, 4) == ([PROMPT + 3, 1, 1, 1], 1)
    assert coarse_forwards("step", 1, 2, 5, 0) == ([1 + 2 + 4], 1)
    assert coarse_forwards("step", 1, 0, 2, 3) == ([2, 1, 1, 1], 1)  # rejected: judged, then regenerated
    assert coarse_forwards("block", 1, 4, 3, 0) == ([1 + 4 + 2], 1)
    assert coarse_forwards("span", 1, 2, 0, 0) == ([], 3)  # an empty span (context full): nothing fed


def test_span_round_trip_closed_form(tmp_path):
    """One device, zero compute, a 1 Mbit/s uplink, RTT 100 ms, a + b * tokens per forward: tokens/s by hand.
    The span of 4 tokens is 4 forwards (tails 12, 1, 1, 1) = 4 a + 15 b of verifier time."""
    path = write(tmp_path, span_generation(step_s=0.0))
    service = ServiceModel(0.010, 0.001, 1, None)
    sim = simulation(path, rtt=0.1, rate=1e6, service=service)
    m = sim.run().metrics
    f = Framing()
    up = (f.wire(OPEN_UP, first_of_call=True) + f.wire(300)) * 8 / 1e6  # Open, then the Verify behind it
    makespan = up + 0.1 + 4 * 0.010 + 0.001 * (PROMPT + 3 + 3)
    assert m["makespan_s"] == pytest.approx(makespan, abs=1e-7)
    assert m["tokens_per_s"] == pytest.approx(9 / makespan, rel=1e-7)
    assert sim.verifier.jobs == 4  # one verifier job per span token
    assert m["transmission_rate"] == pytest.approx(1 / 9)


def test_step_and_block_round_trips_closed_form(tmp_path):
    """Drafts at 1 ms, encode and prefill recorded, free network but the RTT: every draft, encode, prefill,
    RTT and forward adds up. Step trace: judged (1 forward), not sent, judged + regenerated (1 + 3 forwards)."""
    service = ServiceModel(0.002, 0.0005, 1, None)
    step = write(tmp_path, step_generation())
    m = simulation(step, rtt=0.05, service=service).run().metrics
    forwards = [PROMPT + 2, 4, 1, 1, 1]
    expected = 7 * 0.001 + 2 * 0.05 + sum(service.time(t) for t in forwards)
    assert m["makespan_s"] == pytest.approx(expected, abs=1e-7)
    assert m["tokens"] == 8 and m["transmission_rate"] == pytest.approx(5 / 8)

    path = tmp_path / "b.jsonl"
    rows = [json.loads(line) for line in block_generation().splitlines()]
    for row in rows:
        if row["kind"] == "block":
            row["encode_s"], row["prefill_s"] = 0.0007, 0.003
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = simulation(str(path), rtt=0.05, service=service).run().metrics
    expected = 6 * 0.001 + 2 * (0.0007 + 0.05) + service.time(PROMPT + 3) + service.time(2) + 0.003 + 0.003
    assert m["makespan_s"] == pytest.approx(expected, abs=1e-7)
    assert m["tokens_per_s"] == pytest.approx(5 / expected)


def test_latency_definitions(tmp_path):
    """Span mode: kept drafts commit as drafted (their own compute); the span's tokens commit at the verdict,
    counted from the trigger draft's start. Step mode: a judged step's drafts commit at its verdict; a step that
    did not go up at its own last draft."""
    sim = simulation(write(tmp_path, span_generation()), rtt=0.1)
    sim.run()
    trigger_to_verdict = 0.001 + 0.1  # the trigger's draft, then the round trip
    assert sorted(sim.latencies()) == pytest.approx(sorted([0.001] * 5 + [trigger_to_verdict] * 4), abs=1e-7)
    sim = simulation(write(tmp_path, step_generation()), rtt=0.1)
    sim.run()
    step0 = [0.003 + 0.1, 0.002 + 0.1, 0.001 + 0.1]  # drafted, then judged together
    step1 = [0.002, 0.001]  # not sent: final at the step's last draft
    step2 = [0.002 + 0.1] * 3  # regenerated: from the step's first draft to the verdict
    assert sorted(sim.latencies()) == pytest.approx(sorted(step0 + step1 + step2), abs=1e-7)


def test_recorded_replay_accounts_for_the_wall_time(tmp_path):
    """At its recorded round trips the replay takes the generations' own wall time (untimed work replayed once
    per generation, before the first draft)."""
    path = tmp_path / "r.jsonl"
    path.write_text(span_generation(encode=0.0004, prefill=0.002) + step_generation() + block_generation())
    trace = load_trace(path)
    m = simulation(str(path), recorded=True).run().metrics
    assert m["makespan_s"] == pytest.approx(sum(g.seconds for g in trace.generations), abs=1e-7)


def test_a_cut_generation_counts_its_tokens(tmp_path):
    """tokens_per_device cuts the last generation: a span mode's kept drafts are cut at the token."""
    path = write(tmp_path, span_generation())
    raw = {"traces": {"c": path}, "policy": "c", "devices": 1, "tokens_per_device": 11,
           "verifier": {"rpc_overhead_s": 0.0}, "network": {"rtt_s": 0.1, "downlink": {"rate_bps": FAST},
                                                            "uplink": {"rate_bps": FAST}}}
    sim = Simulation(parse_config(raw), load_trace(path), FREE)
    m = sim.run().metrics
    assert m["tokens"] == 11 and len(sim.latencies()) == 11
    # 9 tokens (6 drafts, 1 round trip) + 2 kept drafts of the next pass, before its trigger
    assert m["makespan_s"] == pytest.approx(6 * 0.001 + 0.1 + 2 * 0.001, abs=1e-7)


def test_service_fit_recovers_a_per_forward_cost(tmp_path):
    """server_s = a * forwards + b * tokens exactly: the fit finds a and b (one forward per span token)."""
    a, b = 0.004, 0.0002
    gens = []
    for k, pending in [(1, 0), (3, 2), (5, 7), (2, 1)]:
        tails, _ = coarse_forwards("span", PROMPT, pending, 0, k)
        events = [draft(PROMPT + i) for i in range(pending)] + [draft(PROMPT + pending, sent=True, dropped=True)]
        events.append(rt("span", PROMPT + pending, pending, span=k, server=a * len(tails) + b * sum(tails)))
        gens.append(generation(events, pending + k))
    trace = load_trace(write(tmp_path, *gens))
    model = fit_service(trace)
    assert model.intercept_s == pytest.approx(a) and model.per_token_s == pytest.approx(b)
    assert model.samples == 4 and model.r2 == pytest.approx(1.0)
    waits = [0.05 - float(g.coarse.server_s[0]) for g in trace.generations]
    assert rpc_overhead(trace) == pytest.approx(float(np.median(waits)))


@pytest.mark.parametrize("edit, field", [
    (lambda r: r.pop("span_tokens"), "span_tokens"),
    (lambda r: r.update(block_tokens=2), "token line"),
    (lambda r: r.update(accepted_count=4), "accepted_count"),
    (lambda r: r.update(queue_s=1.0), "queue_s"),
    (lambda r: r.update(bytes=0), "bytes"),
    (lambda r: r.update(pending=0), "pending"),
])
def test_loader_names_what_is_wrong(tmp_path, edit, field):
    rows = [json.loads(line) for line in block_generation().splitlines()]
    edit(next(r for r in rows if r["kind"] == "block"))
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match=field):
        load_trace(path)


def test_round_trip_lines_only_in_coarse_generations(tmp_path):
    rows = [json.loads(line) for line in span_generation().splitlines()]
    rows[0]["mode"] = "hybrid"
    for row in rows:
        row["sent"] = row["rolled_back"] = False  # token lines a hybrid generation would accept
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match=r"bad.jsonl:6: a span line in a hybrid generation"):
        load_trace(path)
