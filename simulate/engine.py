"""The SimPy model: N devices replaying one policy's trace over a shared uplink, a downlink and a verifier.

- Devices run generations back to back (closed loop, no think time), each starting at a random
  generation of the trace, until ``tokens_per_device`` tokens (the last generation is cut there).
- Hybrid generation: Open up, Opened down (the verifier answers Open without a forward pass), then per
  Verify: the edge compute since the last committed token, the Verify up the shared uplink, a verifier
  job, the Verdict down; Close goes up without waiting. Cloud-only: the request goes up, the verifier
  produces one job per token back to back (it does not wait for the edge), each chunk goes down.
- Uplink and downlink: processor sharing or TDMA (``simulate/links.py``), each message = its trace size
  plus framing (``simulate/framing.py``), delivered RTT/2 (+ jitter, + loss resends) after its last bit.
- Verifier: K workers, FIFO queue, up to ``max_batch`` queued requests served together at the fitted
  cost a + b·(tokens summed) divided by ``speed``. Each Verify round trip also pays the gRPC stacks'
  software latency (``compute.rpc_overhead``), a pure delay that occupies neither link nor worker.

Per-token latency = time between a token's commit and the previous one's on the same device (the first
token of a generation counts from the start of its handshake).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import simpy

from simulate.channel import FixedRate, LinkModel, Propagation, TraceRate, Wireless, read_capacity_csv
from simulate.compute import ServiceModel, edge_step_times, fit_service, rpc_overhead
from simulate.config import LinkConfig, SimConfig
from simulate.links import PSLink, TDMALinks
from simulate.script import Script, build_script
from simulate.trace import Trace, load_trace


class Verifier:
    """K workers over a FIFO queue; a worker takes up to ``max_batch`` waiting requests at once."""

    def __init__(self, env: simpy.Environment, model: ServiceModel, workers: int, max_batch: int, speed: float):
        self.env, self.model, self.max_batch, self.speed = env, model, max_batch, speed
        self.free, self.workers = workers, workers
        self.queue: deque = deque()
        self.busy_s = 0.0
        self.jobs = 0

    def submit(self, tokens: int) -> simpy.Event:
        done = self.env.event()
        self.queue.append((tokens, done))
        self._dispatch()
        return done

    def _dispatch(self) -> None:
        while self.free and self.queue:
            batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
            seconds = self.model.time(sum(t for t, _ in batch)) / self.speed
            self.free -= 1
            self.busy_s += seconds
            self.jobs += len(batch)
            self.env.timeout(seconds).callbacks.append(lambda _ev, b=batch: self._finish(b))

    def _finish(self, batch: list) -> None:
        self.free += 1
        for _, done in batch:
            done.succeed()
        self._dispatch()


def make_link_model(link: LinkConfig, devices: int, rng: np.random.Generator) -> LinkModel:
    if link.model == "fixed":
        return FixedRate(link.rate_bps)
    if link.model == "trace":
        return TraceRate(read_capacity_csv(link.csv))
    lo, hi = link.distance_m
    return Wireless(link.bandwidth_hz, link.snr_db, rng.uniform(lo, hi, size=devices), link.path_loss_exponent,
                    link.reference_m, link.fading, link.coherence_s, link.min_rate_bps)


@dataclass
class _Direction:
    """One direction of the network: a link model, its shared link(s), propagation and loss."""

    model: LinkModel
    link: PSLink | TDMALinks
    path: Propagation
    framing_packet: int  # link bytes of a full packet (for resent bytes)
    rng: np.random.Generator
    messages: int = 0
    message_bytes: int = 0  # link bytes of the messages themselves (resends excluded)
    delivered_bytes: int = 0

    def send(self, env: simpy.Environment, device: int, nbytes: int, extra_s: float = 0.0) -> simpy.Event:
        packets = -(-nbytes // self.framing_packet)
        resent, extra_delay = self.path.losses(packets, self.rng)
        total = nbytes + resent * min(self.framing_packet, nbytes)
        self.messages += 1
        self.message_bytes += nbytes
        work = self.model.work(device, total * 8.0, env.now, self.rng)
        done = self.link.send(work, total, self.path.delay(self.rng) + extra_delay + extra_s, device)
        done.callbacks.append(lambda _ev: self._delivered(total))
        return done

    def _delivered(self, nbytes: int) -> None:
        self.delivered_bytes += nbytes


@dataclass
class DeviceLog:
    start: float = 0.0
    finish: float = 0.0
    tokens: int = 0


@dataclass
class RunResult:
    metrics: dict
    latencies: np.ndarray  # [tokens] per-token latency, seconds
    devices: list[DeviceLog] = field(default_factory=list)


class Simulation:
    """One run of one configuration; ``run()`` returns the metrics."""

    def __init__(self, config: SimConfig, trace: Trace, service: ServiceModel | None = None):
        self.config, self.trace = config, trace
        self.rng = np.random.default_rng(config.seed)
        self.env = simpy.Environment()
        if service is None and config.service_trace:
            service = fit_service(load_trace(config.traces[config.service_trace], config.service_trace))
        self.service = service or fit_service(trace)
        self.rpc_s = rpc_overhead(trace) if config.rpc_overhead_s is None else config.rpc_overhead_s
        compute = [c / config.edge_speed for c in edge_step_times(trace, config.edge_compute)] \
            if trace.mode != "stream" else [g.step_s for g in trace.generations]
        self.compute = compute
        self.scripts = [build_script(g, c, config.framing) for g, c in zip(trace.generations, compute)]
        self._cut: dict[tuple[int, int], Script] = {}
        n = config.devices
        self.up = self._direction(config.uplink, config.rtt_s / 2)
        self.down = self._direction(config.downlink, config.rtt_s / 2)
        self.verifier = Verifier(self.env, self.service, config.workers, config.max_batch, config.verifier_speed)
        self.devices = [DeviceLog() for _ in range(n)]
        self.dynamic_latency: list[float] = []
        self.static_latency: list[np.ndarray] = []
        self.up_grpc = 0
        self.tokens_sent = 0

    def _direction(self, link: LinkConfig, one_way: float) -> _Direction:
        c, f = self.config, self.config.framing
        model = make_link_model(link, c.devices, self.rng)
        shared = TDMALinks(self.env, model.capacity, c.devices) if link.sharing == "tdma" \
            else PSLink(self.env, model.capacity)
        return _Direction(model, shared, Propagation(one_way, c.jitter_s, c.loss, c.retransmit_s),
                          f.mss + f.tcpip_bytes + f.l2_bytes, self.rng)

    def _script(self, index: int, tokens: int) -> Script:
        script = self.scripts[index]
        if tokens >= script.tokens:
            return script
        key = (index, tokens)
        if key not in self._cut:
            self._cut[key] = build_script(self.trace.generations[index], self.compute[index], self.config.framing,
                                          tokens)
        return self._cut[key]

    def _device(self, d: int, start: float, first: int):
        env, log = self.env, self.devices[d]
        yield env.timeout(start)
        log.start = env.now
        index, left = first, self.config.tokens_per_device
        while left > 0:
            script = self._script(index, left)
            yield from self._replay(d, script)
            left -= script.tokens
            log.tokens += script.tokens
            index = (index + 1) % len(self.scripts)
        log.finish = env.now

    def _replay(self, d: int, s: Script):
        if s.mode == "local":
            self.static_latency.append(s.skipped_latency)
            yield self.env.timeout(s.tail_s)
        elif s.mode == "stream":
            yield from self._stream(d, s)
        else:
            yield from self._hybrid(d, s)

    def _hybrid(self, d: int, s: Script):
        env, lat = self.env, self.dynamic_latency
        t_commit = env.now  # the handshake counts towards the first token
        self.up_grpc += s.open_up[1] + s.close_up[1]
        yield self.up.send(env, d, s.open_up[0])
        yield self.down.send(env, d, s.open_down)
        self.static_latency.append(s.skipped_latency)
        if s.first_skipped_s is not None:
            lat.append(env.now - t_commit + s.first_skipped_s)
        for step in s.steps:
            yield env.timeout(step.compute_s)
            if step.index:  # token 0's latency keeps the handshake; later ones start at their own compute
                t_commit = env.now - step.own_s
            yield self.up.send(env, d, step.up_wire)
            yield self.verifier.submit(step.tokens)
            yield self.down.send(env, d, step.down_wire, self.rpc_s)  # + the gRPC stacks' own latency
            lat.append(env.now - t_commit)
            self.up_grpc += step.up_grpc
            self.tokens_sent += 1
        if s.tail_s:
            yield env.timeout(s.tail_s)
        if s.close_up[0]:
            self.up.send(env, d, s.close_up[0])  # Close, after the last token; nobody waits for it

    def _stream(self, d: int, s: Script):
        env = self.env
        t_commit = env.now
        self.up_grpc += s.open_up[1]
        yield self.up.send(env, d, s.open_up[0])
        arrivals: list[float] = []
        chunks = []
        for tokens, down in zip(s.chunk_tokens, s.chunk_down):
            yield self.verifier.submit(tokens)  # the verifier decodes on without waiting for the edge
            chunks.append(self.down.send(env, d, down))
            chunks[-1].callbacks.append(lambda _ev: arrivals.append(env.now))
        yield env.all_of(chunks)  # with jitter, the last chunk sent need not arrive last
        self.tokens_sent += s.tokens  # cloud-only: every token comes from the verifier
        times = np.sort(np.array(arrivals))
        self.static_latency.append(np.diff(times, prepend=t_commit))

    def run(self) -> RunResult:
        c = self.config
        starts = self.rng.uniform(0, c.start_spread_s, size=c.devices) if c.start_spread_s > 0 else np.zeros(c.devices)
        firsts = self.rng.integers(len(self.scripts), size=c.devices)
        for d in range(c.devices):
            self.env.process(self._device(d, float(starts[d]), int(firsts[d])))
        wall = time.perf_counter()
        self.env.run()
        wall = time.perf_counter() - wall
        events = _events_scheduled(self.env)
        return RunResult(self.metrics(wall, events), self.latencies(), self.devices)

    def latencies(self) -> np.ndarray:
        parts = self.static_latency + [np.array(self.dynamic_latency)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def metrics(self, wall: float, events: int) -> dict:
        from simulate.metrics import summarize

        return summarize(self, wall, events)


def _events_scheduled(env: simpy.Environment) -> int:
    """Events SimPy has scheduled so far (its internal id counter; reading it costs one id)."""
    eid = getattr(env, "_eid", None)
    return next(eid) if isinstance(eid, count) else 0


def simulate(config: SimConfig, trace: Trace, service: ServiceModel | None = None) -> RunResult:
    return Simulation(config, trace, service).run()
