"""The capacity study: the batched service model's fit, the simulator's batching rule (the engine's), and the
devices-per-replica search, on synthetic data and tiny traces (no timing is asserted)."""

from __future__ import annotations

import json
from collections import deque
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import simpy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from simulate.batched import FEATURES, BatchedServiceModel, batch_features, fit_batched, load_batched
from simulate.capacity import devices_per_replica, largest_meeting, replica_config, study_config
from simulate.compute import ServiceModel, nonneg_lstsq
from simulate.config import ConfigError, parse_config
from simulate.engine import Verifier
from tests.test_simulate import write_trace

# uniform shapes and mixed ones, as bench/verifier_service.py measures them
SHAPES = [(t,) * r for r in (1, 2, 4, 8, 16, 32) for t in (1, 2, 4, 8)] + [(1, 4) * r for r in (2, 4, 8)] \
    + [(1, 2, 4, 8, 16) * r for r in (1, 3, 6)]
# a forward's overhead so large that every request taken goes into as few forwards as the budget allows
MODEL = BatchedServiceModel({"batch": 0.004, "multi_row": 0.003, "rows": 2e-4, "padded_tokens": 5e-5}, 40, 1.0, 0.0,
                            max_batch_tokens=64, max_rows=32, overhead_tokens=10**6)


def model_file(path, model: BatchedServiceModel = MODEL):
    path.write_text(json.dumps({"model": model.as_dict(), "points": []}))
    return str(path)


def test_batch_features_count_what_the_engine_computes():
    """Every row padded to the longest tail; padded caches once there is more than one row."""
    assert batch_features((1,)) == {"batch": 1, "multi_row": 0, "rows": 1, "padded_tokens": 1, "rows_sq": 1}
    assert batch_features((3,))["multi_row"] == 0 and batch_features((1, 1))["multi_row"] == 1
    assert batch_features((1, 4, 4)) == {"batch": 1, "multi_row": 1, "rows": 3, "padded_tokens": 12, "rows_sq": 9}


@settings(deadline=None, max_examples=30)
@given(coef=st.lists(st.floats(0.0, 0.01), min_size=len(FEATURES), max_size=len(FEATURES)))
def test_fit_recovers_an_exact_model(coef):
    """Times made by any non-negative model over the features are reproduced exactly."""
    coef[0] = max(coef[0], 1e-4)  # every forward costs something
    truth = dict(zip(FEATURES, coef))
    seconds = [sum(truth[n] * v for n, v in batch_features(s).items()) for s in SHAPES]
    model = fit_batched(SHAPES, seconds, 4096, 128)
    assert [model.batch_time(s) for s in SHAPES] == pytest.approx(seconds, rel=1e-6)
    assert model.max_rel_error < 1e-6 and model.max_rows == 32


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.0, 0.5), falling=st.floats(0.0, 1.0))
def test_fit_costs_are_never_negative(seed, noise, falling):
    """Noisy measurements, even of a cost that falls as batches grow, never give a negative coefficient."""
    rng = np.random.default_rng(seed)
    seconds = [MODEL.batch_time(s) * float(rng.uniform(1 - noise, 1 + noise)) / len(s) ** falling for s in SHAPES]
    model = fit_batched(SHAPES, seconds, 4096, 128)
    assert min(model.coefficients.values()) >= 0 and min(model.batch_time(s) for s in SHAPES) > 0


def test_nonneg_least_squares_drops_a_negative_term():
    """A cost falling with x: least squares would give it a negative slope; the slope is dropped instead."""
    x = np.column_stack([np.ones(3), [1.0, 2.0, 3.0]])
    assert nonneg_lstsq(x, np.array([3.0, 2.0, 1.0])) == pytest.approx([2.0, 0.0])
    assert nonneg_lstsq(x, np.array([1.0, 2.0, 3.0])) == pytest.approx([0.0, 1.0])


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 10_000))
def test_noisy_measurements_fit_within_their_noise(seed):
    """Times measured with +-2% noise: the model stays within a few % of the noise-free times everywhere."""
    rng = np.random.default_rng(seed)
    seconds = [MODEL.batch_time(s) * rng.uniform(0.98, 1.02) for s in SHAPES]
    model = fit_batched(SHAPES, seconds, 4096, 128)
    assert [model.batch_time(s) for s in SHAPES] == pytest.approx([MODEL.batch_time(s) for s in SHAPES], rel=0.04)
    assert model.r2 > 0.99


def test_model_file_round_trip_and_errors(tmp_path):
    assert load_batched(model_file(tmp_path / "m.json")) == MODEL
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"coefficients": {"rows": -1.0}}}))
    with pytest.raises(ValueError, match="holds no batched service model"):
        load_batched(tmp_path / "bad.json")


def _served(model, tails: list[int], max_batch: int) -> list[float]:
    """When each request submitted at t = 0 is served by one worker."""
    env = simpy.Environment()
    verifier = Verifier(env, model, workers=1, max_batch=max_batch, speed=1.0)
    done = [verifier.submit(t) for t in tails]
    times = [None] * len(tails)
    for i, event in enumerate(done):
        event.callbacks.append(lambda _ev, i=i: times.__setitem__(i, env.now))
    env.run()
    return times


def test_a_batch_costs_the_models_time_once():
    """k requests waiting together are one forward: all done at the model's time for their tails."""
    tails = [1, 3, 2, 1]  # queued behind a first request, which an idle model serves at once, alone
    busy = MODEL.time(5)
    assert _served(MODEL, [5] + tails, max_batch=8) == pytest.approx([busy] + [busy + MODEL.batch_time(tails)] * 4)
    # the row cap: the worker takes what it may, the rest wait for the next take
    second = busy + MODEL.batch_time(tails[:3])
    assert _served(MODEL, [5] + tails, max_batch=3)[1:] == pytest.approx([second] * 3 + [second + MODEL.time(1)])
    # a request whose tokens do not fit keeps its place before those behind it; a take whose padding would
    # exceed the budget (2 x 60 > 64) is split into forwards run one after the other, shortest tails first
    t1 = busy + MODEL.batch_time([10, 1])  # 60 cannot join 10 (70 new tokens > 64), 1 can
    t2 = t1 + MODEL.time(3)  # then 60 and 3 are taken (63 tokens): two forwards, 3 first
    t3 = t2 + MODEL.time(60)
    assert _served(MODEL, [5, 10, 60, 1, 3, 2], max_batch=2)[1:] == pytest.approx([t1, t3, t1, t2, t3 + MODEL.time(2)])
    # the trace-fitted model keeps its extrapolation: a + b * tokens summed, no token budget, one forward
    trace_model = ServiceModel(0.01, 0.001, 1, None)
    assert _served(trace_model, [1, 400, 400], max_batch=2)[1:] == pytest.approx([0.011 + 0.01 + 0.8] * 2)


@settings(deadline=None, max_examples=40)
@given(tails=st.lists(st.integers(1, 40), min_size=1, max_size=30), budget=st.integers(1, 200))
@example(tails=[2, 2], budget=4).via("a forward exactly at the budget")
@example(tails=[10, 60, 1, 3, 2], budget=64).via("a skipped request keeps its place")
def test_forwards_are_the_engines(tails, budget):
    """The simulator's take and split are cloud/batching.py's: the same queue gives the same forwards, in order."""
    from cloud.batching import BatchingWorker, ForwardJob
    from core.batch_plan import FORWARD_OVERHEAD_TOKENS, plan_forwards
    from cloud.kvstore import SessionKV

    worker = SimpleNamespace(_queue=deque(ForwardJob(SessionKV(), [0] * t, 1) for t in tails), max_batch_tokens=budget)
    engine = []
    while worker._queue:
        taken = [len(job.tail()) for job in BatchingWorker._take(worker)]
        engine += [[taken[i] for i in group] for group in plan_forwards(taken, budget)]
    model = replace(MODEL, max_batch_tokens=budget, overhead_tokens=FORWARD_OVERHEAD_TOKENS)
    verifier = Verifier(simpy.Environment(), model, workers=1, max_batch=10**9, speed=1.0)
    verifier.queue.extend((t, None) for t in tails)
    ours = []
    while verifier.queue:
        taken = [t for t, _ in verifier._take()]
        ours += [[taken[i] for i in group] for group in model.plan(taken)]
    assert ours == engine


def _tiny(tmp_path, **over):
    """A tiny hybrid trace, a cloud-only trace and the model file, as the capacity study's config."""
    traces = {"default": str(write_trace(tmp_path / "default.jsonl", generations=4, tokens=16, every=4)),
              "llm-only": str(write_trace(tmp_path / "llm.jsonl", mode="stream", generations=4, tokens=16))}
    return lambda policy: study_config(traces, policy, model_file(tmp_path / "m.json"), tokens_per_device=32,
                                       **over)


def test_more_devices_wait_longer(tmp_path):
    """One replica: latency never falls as devices are added (same seed), and rises once batches grow."""
    config = _tiny(tmp_path)("default")
    from simulate.engine import simulate
    from simulate.trace import load_trace

    trace = load_trace(config.traces["default"])
    p99 = [simulate(replica_config(config, n), trace).metrics["latency_p99_s"] for n in (1, 4, 16, 64, 256)]
    assert p99 == sorted(p99) and p99[-1] > p99[0]


def test_replica_config_gives_each_device_its_link(tmp_path):
    c = replica_config(_tiny(tmp_path)("default"), 7)
    assert c.devices == 7 and c.uplink.sharing == "tdma" and c.uplink.rate_bps == 7 * 10e6
    assert c.downlink.rate_bps == 7 * 100e6 and c.max_batch == MODEL.max_rows  # batching by default
    wireless = parse_config({"traces": c.traces, "network": {"uplink": {"model": "wireless"}}})
    with pytest.raises(ValueError, match="fixed-rate uplink"):
        replica_config(wireless, 2)


@settings(deadline=None, max_examples=60)
@given(threshold=st.integers(0, 5000), limit=st.integers(1, 6000), resolution=st.sampled_from([0.0, 0.02, 0.1]))
def test_the_search_finds_the_largest_count(threshold, limit, resolution):
    probed = []

    def meets(n):
        probed.append(n)
        return n <= threshold

    found, order = largest_meeting(meets, limit, resolution)
    assert order == probed and max(order) <= limit
    expected = min(threshold, limit)  # the true answer of this monotone objective
    assert found <= expected and expected - found < max(1, resolution * found)  # within the resolution below it
    assert len(order) <= 2 * np.log2(limit) + 3


def test_devices_per_replica_on_a_tiny_config(tmp_path):
    """Both policies found; the count meets the objective and a probe with one more device beyond it does not;
    a looser objective sustains at least as many devices."""
    config = _tiny(tmp_path)
    for policy in ("default", "llm-only"):
        found = devices_per_replica(config(policy), objective_s=0.08, resolution=0.0)
        n = found["devices"]
        assert n >= 1 and found["at_devices"]["latency_p99_s"] <= 0.08
        above = [p for p in found["probes"] if p["devices"] == n + 1]
        assert above and above[0]["latency_p99_s"] > 0.08
        assert devices_per_replica(config(policy), objective_s=0.16)["devices"] >= n


@pytest.mark.parametrize("verifier, field", [
    ({"service": "fast"}, "'verifier.service'"),
    ({"service": "batched:/no/such.json"}, "'verifier.service'"),
])
def test_invalid_service_names_the_field(tmp_path, verifier, field):
    trace = write_trace(tmp_path / "default.jsonl")
    with pytest.raises(ConfigError, match=field):
        parse_config({"traces": {"default": str(trace)}, "verifier": verifier})


def test_service_trace_cannot_go_with_the_batched_model(tmp_path):
    trace = str(write_trace(tmp_path / "default.jsonl"))
    with pytest.raises(ConfigError, match="'verifier.service_trace'"):
        parse_config({"traces": {"default": trace}, "verifier": {"service": f"batched:{model_file(tmp_path / 'm.json')}",
                                                                  "service_trace": "default"}})


def test_bench_capacity_section(tmp_path):
    """make bench's keys: devices per replica per policy, the ratio default / cloud-only, the model used."""
    from bench.sim import capacity

    for name, mode in (("default", "hybrid"), ("llm-only", "stream")):
        write_trace(tmp_path / f"{name}.jsonl", mode=mode, generations=4, tokens=16)
    section = capacity(tmp_path, Path(model_file(tmp_path / "m.json")), ("default", "llm-only"), tokens_per_device=32)
    found = section["devices_per_replica"]
    assert set(found) == {"default", "llm-only"} and min(found.values()) >= 1
    assert section["devices_per_replica_ratio"] == found["default"] / found["llm-only"]
    assert section["verifier_service"]["coefficients"] == MODEL.coefficients
