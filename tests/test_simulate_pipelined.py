"""The simulator on protocol-v2 traces (``open_s``, ``encode_s``, ``blocked_s``; pipelined ones with rolled-back
drafts): the edge loop's replay against hand-computed timelines, the recorded replay against the trace's own
wall time, and the loader's checks of the new lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulate.compute import MIN_MESSAGE_LIMIT, ServiceModel
from simulate.config import parse_config
from simulate.engine import Simulation, simulate
from simulate.framing import Framing
from simulate.trace import STALE_VERDICT_BYTES, TraceError, _assign_chains, load_trace

PROMPT, UP, DOWN, OPEN_UP, CLOSE_UP = 9, 300, 25, 70, 7
FREE = ServiceModel(0.0, 0.0, 1, None)  # a verifier that takes no time: round trip = the network's
FAST = 1e12  # bit/s: serialization negligible (< 1e-8 s per message)


def generation(tokens: int, sent=(), rejected=(), chains=None, step=0.001, lookahead=0, open_s=0.0, encode=0.0,
               wait=0.05, server=0.0, seconds=0.0, stale_up=UP, up=UP) -> list[dict]:
    """One v2 generation's lines. ``chains``: {rejected index: [(slm_step_s, sent), ...]} rolled-back drafts
    at r+1, r+2, ... (written, as the edge does, just before the line of the token that took the position)."""
    chains = chains or {}
    rows = [{"kind": "open", "prompt_tokens": PROMPT, "estimator": "max-prob", "codec": {"name": "adaptive"},
             "threshold": 0.1, "temperature": 1.0, "verifier": True, "uplink_bytes": OPEN_UP, "downlink_bytes": 0,
             "lookahead": lookahead, "open_s": open_s}]
    rolled = {}  # index -> lines, in drafting order (chains of earlier rejections first)
    for r in sorted(chains):
        for k, (s, was_sent) in enumerate(chains[r]):
            rolled.setdefault(r + 1 + k, []).append(
                {"kind": "token", "position": PROMPT + r + 1 + k, "token": 7, "draft": 7, "u": 0.5, "sent": False,
                 "bytes": 0, "accepted": None, "returned": None, "slm_step_s": s, "wait_s": 0.0,
                 "encode_s": encode if was_sent else 0.0, "blocked_s": 0.0, "rolled_back": True})
    pending, total_up, total_down = 0, OPEN_UP, 60
    stale = sum(1 for c in chains.values() for _, was_sent in c if was_sent)
    for i in range(max([tokens - 1, *rolled]) + 1):
        rows += rolled.get(i, [])
        if i >= tokens:
            continue
        is_sent = i in sent
        rows.append({"kind": "token", "position": PROMPT + i, "token": 5, "draft": 5, "u": 0.5, "sent": is_sent,
                     "bytes": up if is_sent else 0, "accepted": (i not in rejected) if is_sent else None,
                     "returned": 5 if is_sent else None, "slm_step_s": step, "wait_s": wait if is_sent else 0.0,
                     "pending": pending if is_sent else 0, "down_bytes": DOWN if is_sent else 0,
                     "server_s": server if is_sent else 0.0, "encode_s": encode if is_sent else 0.0,
                     "blocked_s": 0.0, "rolled_back": False})
        if is_sent:
            total_up, total_down, pending = total_up + up, total_down + DOWN, 0
        else:
            pending += 1
        if i in rejected:
            pending = 0
    total_up += stale * stale_up + CLOSE_UP
    rows.append({"kind": "close", "tokens": tokens, "uplink_bytes": total_up,
                 "downlink_bytes": total_down + stale * STALE_VERDICT_BYTES, "seconds": seconds, "text": "",
                 "rolled_back": sum(len(c) for c in chains.values()), "stale_verifies": stale,
                 "stale_uplink_bytes": stale * stale_up})
    return rows


def write(path, *generations) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for g in generations for row in g))
    return str(path)


def run(path, rtt=0.1, rate=FAST, service=FREE, recorded=False, tokens=None, **over):
    trace = load_trace(path)
    raw = {"traces": {"default": str(path)}, "devices": 1, "tokens_per_device": tokens or trace.tokens,
           "verifier": {"rpc_overhead_s": 0.0},
           "network": {"rtt_s": rtt, "uplink": {"rate_bps": rate}, "downlink": {"rate_bps": FAST}}, **over}
    return Simulation(parse_config(raw), trace, service, recorded=recorded).run()


def test_stop_and_wait_v2_closed_form(tmp_path):
    """Lookahead 0: per-token latency = compute (+ encode) + serialization up + RTT + service + down; the
    Open leaves after open_s and nobody waits for Opened; the first token counts from the generation's start."""
    path = write(tmp_path / "t.jsonl", generation(12, sent={3, 7, 11}, open_s=0.004, encode=0.0005))
    service = ServiceModel(0.003, 0.0001, 1, None)
    result = run(path, rtt=0.04, rate=1e6, service=service)
    f = Framing()
    up = f.wire(UP) * 8 / 1e6
    verified = [0.0015 + up + 0.04 + service.time(n) for n in (PROMPT + 3, 4, 4)]
    expected = sorted([0.001 + 0.004] + [0.001] * 8 + verified)  # token 0 pays the head (open_s)
    assert sorted(result.latencies) == pytest.approx(expected, abs=1e-8)
    assert result.metrics["makespan_s"] == pytest.approx(sum(expected), abs=1e-8)
    assert result.metrics["transmission_rate"] == pytest.approx(3 / 12)


def test_pipelined_no_rejection_timeline(tmp_path):
    """Verifies at 9, 19, 29 of 30 tokens (1 ms each), RTT 100 ms, free verifier, lookahead 5: the edge drafts 5
    tokens past each Verify, then blocks for it: 30 ms of drafting + 3 round trips - 2 x 5 ms of overlap."""
    path = write(tmp_path / "t.jsonl", generation(30, sent={9, 19, 29}, lookahead=5))
    result = run(path)
    assert result.metrics["makespan_s"] == pytest.approx(0.320, abs=1e-6)
    behind = [0.101, 0.100, 0.099, 0.098, 0.097, 0.096]  # the Verify's own token, then the 5 drafted behind it
    expected = [0.001] * 9 + behind + [0.001] * 4 + behind + [0.001] * 4 + [0.101]
    assert sorted(result.latencies) == pytest.approx(sorted(expected), abs=1e-6)
    assert result.metrics["rolled_back_per_token"] == 0 and result.metrics["stale_verifies_per_token"] == 0


@pytest.mark.parametrize("lookahead, makespan", [(0, 0.330), (1, 0.328), (5, 0.320), (10, 0.220), (1000, 0.130)])
def test_pipelined_speed_is_bounded_by_the_lookahead(tmp_path, lookahead, makespan):
    """Same trace at each lookahead (Verifies 10 tokens apart, c = 1 ms, R = 100 ms): below the spacing each
    round trip overlaps L drafts, 30 c + 3 R - 2 L c; at L = 10 the Verify at 19 goes up before the edge blocks
    for the one at 9, so their round trips overlap (10 + 100 + 10 + 100 ms); a lookahead past the generation
    leaves SLM speed plus one round trip (30 c + R). The same tokens and bytes at every lookahead."""
    path = write(tmp_path / "t.jsonl", generation(30, sent={9, 19, 29}, lookahead=lookahead))
    result = run(path)
    assert result.metrics["makespan_s"] == pytest.approx(makespan, abs=1e-6)
    assert result.metrics["tokens"] == 30 and result.metrics["transmission_rate"] == pytest.approx(0.1)


def test_rollback_costs_the_recomputation(tmp_path):
    """A rejection at 9 with lookahead 5: the 5 drafts past it (recorded as rolled back) are computed, discarded
    when the verdict arrives, and drafted again: 5 ms more than the same trace accepted."""
    accepted = write(tmp_path / "a.jsonl", generation(30, sent={9}, lookahead=5))
    rejected = write(tmp_path / "r.jsonl", generation(30, sent={9}, rejected={9}, lookahead=5,
                                                      chains={9: [(0.001, False)] * 5}))
    a, r = run(accepted), run(rejected)
    assert a.metrics["makespan_s"] == pytest.approx(0.125, abs=1e-6)  # 10 ms, the round trip, 15 ms more
    assert r.metrics["makespan_s"] == pytest.approx(0.130, abs=1e-6)  # 10 ms, the round trip, 20 ms redrafted
    assert r.metrics["rolled_back_per_token"] == pytest.approx(5 / 30)
    # the rejected token commits when its verdict arrives, the redrafted ones as they are drafted again
    assert sorted(r.latencies)[-1] == pytest.approx(0.101, abs=1e-6)


def test_doomed_branch_follows_the_replay_not_the_recording(tmp_path):
    """The recording had 5 drafts on the doomed branch; the replay drafts as many as its own verdict's arrival
    allows: 3 with a 2.5 ms round trip, the lookahead's 10 with a long one (the 5 beyond the recorded ones take
    the final tokens' compute at those positions)."""
    rows = generation(30, sent={9}, rejected={9}, lookahead=10, chains={9: [(0.001, False)] * 5})
    path = write(tmp_path / "t.jsonl", rows)
    short = run(path, rtt=0.0025)
    assert short.metrics["rolled_back_per_token"] == pytest.approx(3 / 30)  # 10, 11 and 12 (polled after 12)
    long = run(path, rtt=0.1)
    assert long.metrics["rolled_back_per_token"] == pytest.approx(10 / 30)
    assert long.metrics["makespan_s"] == pytest.approx(0.010 + 0.1 + 0.020, abs=1e-6)


def test_stale_verifies_use_the_uplink_not_the_verifier(tmp_path):
    """A doomed draft that sent a Verify: its bytes go up (and a stale Verdict down), the verifier answers it
    without a forward pass."""
    base = generation(30, sent={9}, rejected={9}, lookahead=5, chains={9: [(0.001, False)] * 5})
    stale = generation(30, sent={9}, rejected={9}, lookahead=5, encode=1e-6,
                       chains={9: [(0.001, False), (0.001, True)] + [(0.001, False)] * 3})
    service = ServiceModel(0.002, 0.0, 1, None)
    plain = Simulation(parse_config({"traces": {"d": write(tmp_path / "b.jsonl", base)}, "policy": "d",
                                     "tokens_per_device": 30, "verifier": {"rpc_overhead_s": 0.0}}),
                       load_trace(tmp_path / "b.jsonl"), service)
    plain.run()
    with_stale = Simulation(parse_config({"traces": {"d": write(tmp_path / "s.jsonl", stale)}, "policy": "d",
                                          "tokens_per_device": 30, "verifier": {"rpc_overhead_s": 0.0}}),
                            load_trace(tmp_path / "s.jsonl"), service)
    metrics = with_stale.run().metrics
    f = Framing()
    assert with_stale.up.message_bytes - plain.up.message_bytes == f.wire(UP)
    assert with_stale.down.message_bytes - plain.down.message_bytes == f.wire(STALE_VERDICT_BYTES, up=False)
    assert with_stale.verifier.jobs == plain.verifier.jobs == 1
    assert with_stale.verifier.busy_s == plain.verifier.busy_s
    assert metrics["stale_verifies_per_token"] == pytest.approx(1 / 30)
    assert metrics["uplink_grpc_bytes_per_token"] * 30 == OPEN_UP + 2 * UP + CLOSE_UP


def test_recorded_replay_reproduces_the_wall_time(tmp_path):
    """The measured side of the validation: the trace at its own round trips accounts for its wall time exactly
    (what the timers miss goes before the first draft), stop-and-wait and pipelined, rollbacks included."""
    sw = generation(20, sent={5, 12}, open_s=0.003, encode=0.0004, wait=0.06, seconds=0.2)
    pipe = generation(30, sent={9, 19}, rejected={9}, lookahead=5, open_s=0.002, wait=0.05, seconds=0.25,
                      chains={9: [(0.001, False)] * 5})
    path = write(tmp_path / "t.jsonl", sw, pipe)
    result = run(path, recorded=True)
    assert result.metrics["makespan_s"] == pytest.approx(0.45, abs=1e-9)
    # stop-and-wait: a sent token's latency is its compute + encode + its recorded round trip, the others' their
    # compute; the first token's also the head (the wall time the timers miss)
    only_sw = run(write(tmp_path / "sw.jsonl", sw), recorded=True)
    head = 0.2 - 20 * 0.001 - 2 * (0.0004 + 0.06)
    assert sorted(only_sw.latencies) == pytest.approx(sorted([0.001 + head] + [0.001] * 17 + [0.0614] * 2), abs=1e-9)


def test_device_messages_leave_in_order(tmp_path):
    """Ten 1,000-byte Verifies drafted 1 ms apart on a 100 kbit/s uplink: one TCP connection sends them one after
    the other (not sharing the link among themselves), so verdict k arrives (k + 1) serializations after the Open
    has left, plus the RTT."""
    path = write(tmp_path / "t.jsonl", generation(10, sent=set(range(10)), lookahead=100, up=1000))
    result = run(path, rtt=0.02, rate=1e5)
    f = Framing()
    open_left = f.wire(OPEN_UP, first_of_call=True) * 8 / 1e5
    s = f.wire(1000) * 8 / 1e5
    commits = [open_left + (k + 1) * s + 0.02 for k in range(10)]
    expected = [c - k * 0.001 for k, c in enumerate(commits)]  # token k is drafted from k ms (token 0 from 0)
    assert sorted(result.latencies) == pytest.approx(sorted(expected), abs=1e-7)


def test_a_large_first_verify_waits_for_opened(tmp_path):
    """A Verify above the smallest message limit a verifier may set goes up only once Opened is in (the edge
    learns the limit from it); its recorded encode_s, which holds that wait, is replaced by the typical one."""
    big = MIN_MESSAGE_LIMIT + 100
    path = write(tmp_path / "t.jsonl", generation(5, sent={0, 4}, up=big, encode=0.0002))
    rows = [json.loads(line) for line in open(path)]
    rows[1]["encode_s"] = 0.06  # the first Verify's submit waited for Opened on the recording's link
    write(tmp_path / "t.jsonl", rows)
    result = run(tmp_path / "t.jsonl", rtt=0.04)
    # token 0 (1 ms + 0.2 ms encode) waits for Opened (Open up and Opened down, 40 ms), then its round trip;
    # replaying the recorded 60 ms encode instead would give 61 + 40 ms
    assert sorted(result.latencies)[-1] == pytest.approx(0.04 + 0.04, abs=1e-6)


def test_cut_generation_and_many_devices(tmp_path):
    """Cut generations (tokens_per_device inside a generation) and devices sharing links and verifier replay
    pipelined traces to the token; bytes are conserved."""
    rows = generation(30, sent={3, 9, 19, 25}, rejected={9}, lookahead=6, encode=1e-5,
                      chains={9: [(0.001, True), (0.001, False), (0.001, False)]})
    path = write(tmp_path / "t.jsonl", rows, generation(20, sent={5, 15}, lookahead=6))
    trace = load_trace(path)
    sim = Simulation(parse_config({"traces": {"d": path}, "policy": "d", "devices": 7, "tokens_per_device": 37,
                                   "start_spread_s": 0.05, "network": {"rtt_s": 0.03, "jitter_s": 0.005,
                                                                       "uplink": {"rate_bps": 2e5}},
                                   "verifier": {"workers": 2}}), trace)
    result = sim.run()
    assert result.metrics["tokens"] == 7 * 37 and len(result.latencies) == 7 * 37
    assert sim.up.message_bytes == sim.up.link.bytes == sim.up.delivered_bytes
    assert sim.down.message_bytes == sim.down.link.bytes == sim.down.delivered_bytes


def test_v2_trace_fields_are_read(tmp_path):
    path = write(tmp_path / "t.jsonl", generation(30, sent={9, 19}, rejected={9}, lookahead=5, open_s=0.002,
                                                  encode=1e-4, chains={9: [(0.002, True)] + [(0.001, False)] * 4}))
    g = load_trace(path).generations[0]
    assert g.lookahead == 5 and g.open_s == 0.002 and g.rolled_back == 5 and g.stale_verifies == 1
    assert g.chains == {9: [0, 1, 2, 3, 4]} and g.rb_sent.tolist() == [True] + [False] * 4
    assert g.close_up == CLOSE_UP  # the stale Verify's bytes are not Close's
    assert not g.accepted[9] and g.accepted[19]
    assert load_trace(path).grpc_up_bytes == OPEN_UP + 3 * UP + CLOSE_UP


def test_chains_of_overlapping_rejections():
    """Rejections at 10 and 11; position 12 has two rolled-back drafts, 13 one: the older chain ends first."""
    chains = _assign_chains(np.array([10, 11]), np.array([11, 12, 12, 13]), 8, ["l"] * 4)
    assert chains == {10: [0, 1], 11: [2, 3]}
    # the lookahead caps a chain: the draft at 13 cannot be the first chain's fourth
    assert _assign_chains(np.array([10]), np.array([11, 12, 13]), 3, ["l"] * 3) == {10: [0, 1, 2]}
    with pytest.raises(TraceError, match="no earlier rejected draft"):
        _assign_chains(np.array([10]), np.array([11, 12, 13, 14]), 3, ["a", "b", "c", "d"])


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [{**rows[0], "lookahead": 0}] + rows[1:], "stop-and-wait generation"),
    (lambda rows: rows[:-1] + [{**rows[-1], "rolled_back": 2}], "'rolled_back' says 2"),
    (lambda rows: [r if r.get("position") != PROMPT + 9 else {**r, "accepted": True} for r in rows], "explains"),
    (lambda rows: [{**rows[0], "open_s": -1}] + rows[1:], "'open_s'"),
])
def test_invalid_v2_lines_name_the_field(tmp_path, edit, message):
    rows = generation(30, sent={9}, rejected={9}, lookahead=5, chains={9: [(0.001, False)] * 5})
    path = write(tmp_path / "bad.jsonl", edit(rows))
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_constants_match_the_protocol():
    """The simulator's copies of the edge's message limit and of a stale Verdict's size."""
    from edge.client import MIN_MESSAGE_LIMIT as EDGE_LIMIT
    from proto import hybrid_pb2 as pb
    from proto.messages import wire_size

    assert MIN_MESSAGE_LIMIT == EDGE_LIMIT
    assert wire_size(pb.CloudMessage(verdict=pb.Verdict(seq=50, stale=True, epoch=1, server_seconds=1e-5))) == \
        STALE_VERDICT_BYTES


def test_v2_local_generation_pays_its_head(tmp_path):
    """An SLM-only v2 generation: the untimed prefill goes before the first token (and counts in its latency)."""
    rows = [{"kind": "open", "prompt_tokens": 4, "verifier": False, "uplink_bytes": 0, "downlink_bytes": 0,
             "lookahead": 0, "open_s": 0.0}]
    rows += [{"kind": "token", "position": 4 + i, "token": 1, "sent": False, "bytes": 0, "slm_step_s": 0.002,
              "encode_s": 0.0, "blocked_s": 0.0} for i in range(5)]
    rows.append({"kind": "close", "tokens": 5, "uplink_bytes": 0, "downlink_bytes": 0, "seconds": 0.015, "text": ""})
    path = write(tmp_path / "slm.jsonl", rows)
    result = simulate(parse_config({"traces": {"default": path}, "tokens_per_device": 5}), load_trace(path))
    assert result.metrics["makespan_s"] == pytest.approx(0.015)
    assert sorted(result.latencies) == pytest.approx([0.002] * 4 + [0.007])


def test_service_fit_leaves_the_model_queue_to_the_simulator(tmp_path):
    """server_s includes the wait for the model worker (queue_s): the fit replaces it by the trace's median
    wait (the hand-off), so contention the recording saw is not modelled twice."""
    from simulate.compute import fit_service

    rows = generation(12, sent={3, 7, 11}, server=0.004)
    # (server_s, queue_s): the last Verify waited 3 ms behind another session's forward
    timers = iter([(0.004, 0.0001), (0.004, 0.0001), (0.007, 0.0031)])
    rows = [{**r, **dict(zip(("server_s", "queue_s"), next(timers)))} if r.get("sent") else r for r in rows]
    model = fit_service(load_trace(write(tmp_path / "t.jsonl", rows)))
    assert model.intercept_s + model.per_token_s * 4 == pytest.approx(0.004, abs=1e-9)
    assert model.time(PROMPT + 3) == pytest.approx(0.004, abs=1e-9)


def test_a_conditioned_open_is_waited_for_and_prefills_the_prompt(tmp_path):
    """A prompt-conditioned SLM (``conditioning_layer`` on the open line): Open goes up, the verifier runs a
    forward over the prompt, Opened comes down, and only then does the edge prefill and draft; its first Verify
    then covers the pending ids only. The recorded wait is replaced by the simulated one; a recorded replay keeps
    the recorded wait."""
    rows = generation(12, sent={3, 7, 11}, open_s=0.004, encode=0.0005)
    rows[0].update(conditioning_layer=3, open_wait_s=0.03)
    path = write(tmp_path / "t.jsonl", rows)
    service = ServiceModel(0.003, 0.0001, 1, None)
    result = run(path, rtt=0.04, rate=1e6, service=service)
    f = Framing()
    up = f.wire(UP) * 8 / 1e6
    opened = f.wire(OPEN_UP, first_of_call=True) * 8 / 1e6 + 0.04 + service.time(PROMPT)
    verified = [0.0015 + up + 0.04 + service.time(n) for n in (4, 4, 4)]  # the prompt was prefilled at Open
    expected = sorted([0.001 + 0.004 + opened] + [0.001] * 8 + verified)
    assert sorted(result.latencies) == pytest.approx(expected, abs=1e-8)
    recorded = run(write(tmp_path / "r.jsonl", [dict(r, seconds=0.5) if r["kind"] == "close" else r for r in rows]),
                   recorded=True)
    assert recorded.metrics["makespan_s"] == pytest.approx(0.5, abs=1e-9)
