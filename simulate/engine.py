"""The SimPy model: N devices replaying one policy's trace over a shared uplink, a downlink and a verifier.

- Devices run generations back to back (closed loop, no think time), each starting at a random
  generation of the trace, until ``tokens_per_device`` tokens (the last generation is cut there).
- Hybrid generation: Open up, Opened down (the verifier answers Open without a forward pass, but for a
  prompt-conditioned SLM's Open: a forward over the prompt, and that edge waits for Opened), then per
  Verify: the edge compute since the last committed token, the Verify up the shared uplink, a verifier
  job, the Verdict down; Close goes up without waiting. Cloud-only: the request goes up, the verifier
  produces one job per token back to back (it does not wait for the edge), each chunk goes down.
- Uplink and downlink: processor sharing or TDMA (``simulate/links.py``), each message = its trace size
  plus framing (``simulate/framing.py``), delivered RTT/2 (+ jitter, + loss resends) after its last bit.
- Verifier: K workers, FIFO queue, up to ``max_batch`` queued requests served together (continuous
  batching: whatever is queued when a worker frees up) at the model's cost divided by ``speed``: the
  trace-fitted a + b·(tokens summed), or the batched engine's measured cost (``simulate/batched.py``:
  taken within its token budget, split into forwards by tail length as the engine does). Each Verify round trip also pays the gRPC stacks'
  software latency (``compute.rpc_overhead``), a pure delay that occupies neither link nor worker.

Protocol-v2 traces (``open_s`` on the open line; stop-and-wait or pipelined) replay the edge loop itself
(``simulate/loop.py``): Open leaves ``open_s`` into the generation without waiting for Opened, the edge
drafts after its head (``Generation.head_s``), keeps drafting while Verifies travel up to the lookahead,
rolls back at a rejection (the doomed drafts' compute is spent, their Verifies go up and come back stale:
uplink and downlink bytes, no forward pass), and blocks when the lookahead is exhausted and at the end.
A device's messages leave in order (one TCP connection: a message starts when the previous one's last
bit has left) and the verifier serves a session's Verifies in order (one stream). Older traces (no
``open_s``) replay as before: the Open handshake first, one Verify at a time.

Coarse traces (spans and judged steps, ``edge/coarse.py``; ``simulate/coarse.py``) replay the span/step loop,
stop-and-wait, with the same Open: the edge's work up to each round trip is one delay, the Verify goes up,
the verifier runs its forwards one after the other (a span of k tokens is k forwards, each a job that queues
and batches with other sessions'), the Verdict comes down, and the edge prefills what it settled before it
drafts on.

Per-token latency = from the start of a token's draft to its commit (v2 traces; the first token of a
generation from the start of the generation). For older traces: time between a token's commit and the
previous one's on the same device (the first token from the start of its handshake); with one Verify at
a time the two definitions agree.

``recorded=True`` replays the trace at its own round trips: each Verify's verdict is taken ``wait_s``
after it was sent, no link and no verifier (a stale Verify, whose round trip is not recorded, gets the
trace's median wait - server time): the measured side of the validation, with the same definitions.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import numpy as np
import simpy

from simulate.batched import BatchedServiceModel, load_batched
from simulate.channel import FixedRate, LinkModel, Propagation, TraceRate, Wireless, read_capacity_csv
from simulate.coarse import CoarseScript, build_coarse_script
from simulate.compute import ServiceModel, edge_step_times, fit_service, rolled_back_times, rpc_overhead
from simulate.config import LinkConfig, SimConfig
from simulate.links import PSLink, TDMALinks
from simulate.loop import LoopScript, Verify, build_loop_script
from simulate.script import Script, build_script
from simulate.trace import Generation, Trace, load_trace

Service = ServiceModel | BatchedServiceModel  # the verifier's cost: trace-fitted, or the batched engine's measured


class Verifier:
    """K workers over a FIFO queue. A free worker takes the oldest request and, after it, every queued one
    while the batch stays within ``max_batch`` requests and their new tokens within the model's budget, has
    the model split that into forwards (``model.plan``) and runs them one after the other, each costing
    ``model.batch_time(its tails)``: ``cloud/batching.py``'s rule for the measured batched model; one forward
    and no token budget for the trace-fitted one."""

    def __init__(self, env: simpy.Environment, model: Service, workers: int, max_batch: int, speed: float):
        self.env, self.model, self.max_batch, self.speed = env, model, max_batch, speed
        self.budget = model.max_batch_tokens
        self.free, self.workers = workers, workers
        self.queue: deque = deque()
        self.busy_s = 0.0
        self.jobs = 0
        self.batches = 0  # forwards

    def submit(self, tokens: int) -> simpy.Event:
        done = self.env.event()
        self.queue.append((tokens, done))
        self._dispatch()
        return done

    def _take(self) -> list:
        batch, skipped = [self.queue.popleft()], []
        total = batch[0][0]
        while self.queue and len(batch) < self.max_batch:
            job = self.queue.popleft()
            if total + job[0] <= self.budget:
                batch.append(job)
                total += job[0]
            else:  # too long to join: it keeps its place for the next take
                skipped.append(job)
        self.queue.extendleft(reversed(skipped))
        return batch

    def _dispatch(self) -> None:
        while self.free and self.queue:
            taken = self._take()
            self.free -= 1
            self.jobs += len(taken)
            groups = self.model.plan([t for t, _ in taken])
            end = 0.0
            for k, group in enumerate(groups):
                forward = [taken[i] for i in group]
                end += self.model.batch_time([t for t, _ in forward]) / self.speed
                last = k == len(groups) - 1  # the worker frees when its last forward ends
                self.env.timeout(end).callbacks.append(lambda _ev, f=forward, last=last: self._finish(f, last))
            self.batches += len(groups)
            self.busy_s += end

    def _finish(self, forward: list, last: bool) -> None:
        for _, done in forward:
            done.succeed()
        if last:
            self.free += 1
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
    queues: dict = field(default_factory=dict)  # device -> messages waiting for its message on the link

    def send(self, env: simpy.Environment, device: int, nbytes: int, extra_s: float = 0.0) -> simpy.Event:
        """An event that fires when the message is delivered. A device's messages leave in order (one TCP
        connection): a message starts when the device's previous one has left the link."""
        self.messages += 1
        self.message_bytes += nbytes
        queue = self.queues.get(device)
        if queue is None:  # the device has nothing on the link: start now
            self.queues[device] = []
            return self._start(env, device, nbytes, extra_s, None)
        done = env.event()
        queue.append((nbytes, extra_s, done))
        return done

    def _start(self, env: simpy.Environment, device: int, nbytes: int, extra_s: float,
               done: simpy.Event | None) -> simpy.Event:
        packets = -(-nbytes // self.framing_packet)
        resent, extra_delay = self.path.losses(packets, self.rng)
        total = nbytes + resent * min(self.framing_packet, nbytes)
        work = self.model.work(device, total * 8.0, env.now, self.rng)
        delivered = self.link.send(work, total, self.path.delay(self.rng) + extra_delay + extra_s, device,
                                   on_leave=lambda: self._left(env, device))
        delivered.callbacks.append(lambda _ev: self._delivered(total))
        if done is not None:
            delivered.callbacks.append(lambda _ev: done.succeed())
        return delivered

    def _left(self, env: simpy.Environment, device: int) -> None:
        """The device's message on the link has left: its next queued one starts."""
        queue = self.queues[device]
        if queue:
            self._start(env, device, *queue.pop(0))
        else:
            del self.queues[device]

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


class _Session:
    """A replayed v2 session's order on the verifier: the event its latest message is served at."""

    __slots__ = ("served", "opened")

    def __init__(self, served: simpy.Event | None, opened: simpy.Event | None):
        self.served, self.opened = served, opened


class _Flight:
    """A Verify whose verdict the replayed edge has not taken: its draft's index, whether it is live (not
    of a doomed branch), whether its verdict rejects, and the event of the verdict's arrival."""

    __slots__ = ("index", "live", "rejects", "arrived")

    def __init__(self, index: int, live: bool, rejects: bool, arrived: simpy.Event):
        self.index, self.live, self.rejects, self.arrived = index, live, rejects, arrived


class _LoopReplay:
    """The protocol-v2 edge loop (``simulate/loop.py``) on a SimPy clock. ``Simulation`` adds the links and
    the verifier; alone (``recorded=True``) it replays a generation at its recorded round trips."""

    def __init__(self, env: simpy.Environment, recorded: bool):
        self.env, self.recorded = env, recorded
        self.dynamic_latency: list[float] = []
        self.static_latency: list[np.ndarray] = []
        self.up_grpc = 0
        self.tokens_sent = 0
        self.stale_sent = 0  # stale Verifies sent (doomed drafts')
        self.rolled_back = 0  # drafts discarded by a rollback

    def _loop(self, d: int, s: LoopScript):
        env, lat = self.env, self.dynamic_latency
        t0 = env.now
        self.up_grpc += s.open_up[1] + s.close_up[1]
        if s.open_s:
            yield env.timeout(s.open_s)
        session = yield from self._open_session(d, s)
        if s.head_s > s.open_s:
            yield env.timeout(s.head_s - s.open_s)
        flights: deque[_Flight] = deque()
        starts: dict[int, float] = {}  # draft start per tentative index not committed yet
        tent = committed = 0  # tentative tokens drafted; tokens committed
        doomed = -1  # the rejected index whose verdict is still travelling: drafting after it is doomed

        def commit(now: float) -> None:
            """Tokens before the oldest live Verify in flight are final: their latency ends now."""
            nonlocal committed
            upto = next((f.index for f in flights if f.live), tent) if flights else tent
            for i in range(committed, upto):
                lat.append(now - starts.pop(i))
            committed = max(committed, upto)

        def take(f: _Flight) -> None:
            nonlocal tent, doomed
            if f.live and f.rejects:  # roll back: the drafts after it are discarded, their Verifies are stale
                self.rolled_back += tent - f.index - 1
                for i in range(f.index + 1, tent):
                    del starts[i]
                tent, doomed = f.index + 1, -1
            commit(env.now)

        def finished() -> bool:
            return tent >= s.tokens if doomed < 0 else s.chain_draft(doomed, tent) is None

        def must_wait() -> bool:
            if not flights:
                return False
            if finished():
                return True  # every verdict, stale ones too, is taken before Close
            live = next((f for f in flights if f.live), None)
            return live is not None and tent - live.index - 1 >= s.lookahead

        ahead = 0.0  # compute of skipped drafts folded into the next draft's delay
        while True:
            if flights:
                while flights and flights[0].arrived.processed:
                    take(flights.popleft())
                if must_wait():
                    f = flights.popleft()
                    yield f.arrived
                    take(f)
                    continue
            if not flights:
                if tent >= s.tokens:
                    break
                # nothing in flight: the skipped drafts up to the next Verify commit as they are drafted (their
                # latency is their compute), so they and that Verify's draft are one delay
                run = s.runs.get(tent)
                if run is None and s.next_sent[tent] > tent:
                    run = s.run(tent)
                if run is not None:
                    j, ahead, own = run
                    if tent == 0:
                        own = own.copy()
                        own[0] += env.now - t0  # the first token counts from the start of the generation
                    self.static_latency.append(own)
                    tent = committed = j
                    if tent >= s.tokens:
                        yield env.timeout(ahead)
                        break
            elif finished():
                break
            draft = s.final[tent] if doomed < 0 else s.chain_draft(doomed, tent)
            start = env.now + ahead if tent else t0
            yield env.timeout(ahead + draft.compute_s)
            ahead = 0.0
            starts[tent] = start
            index, tent = tent, tent + 1
            v = draft.verify
            if v is not None:
                if v.waits_opened and session.opened is not None and not session.opened.processed:
                    yield session.opened  # submit() reads the verifier's message limit from Opened first
                live = doomed < 0
                rejects = live and index in s.rejected
                self.up_grpc += v.up_grpc
                if live:
                    self.tokens_sent += 1
                else:
                    self.stale_sent += 1
                if not s.lookahead and not self.recorded:  # stop-and-wait: the round trip inline (fewer events)
                    yield self.up.send(env, d, v.up_wire)
                    if session.served is not None and not session.served.processed:
                        yield session.served  # the Open before it
                    session.served = None
                    if v.tokens:
                        yield self.verifier.submit(v.tokens)
                    yield self.down.send(env, d, v.down_wire, self.rpc_s)
                    commit(env.now)  # a rejection rolls back nothing: nothing was drafted past it
                    continue
                flights.append(_Flight(index, live, rejects, self._round_trip(d, session, v)))
                if rejects:
                    doomed = index
            commit(env.now)  # final once no live Verify precedes it (stale ones in flight change nothing)
        if s.close_up[0] and not self.recorded:
            self.up.send(env, d, s.close_up[0])  # Close, after the last verdict; nobody waits for it

    def _open_session(self, d: int, s: LoopScript | CoarseScript):
        """v2 edge: Open goes up (now, ``open_s`` into the generation); nobody waits for Opened but a Verify too
        large to go before it, and a conditioned SLM's edge, whose Opened carries the prompt's states: the
        verifier sends it after a forward over the prompt, and the edge prefills only then."""
        if self.recorded:
            if s.open_wait_s:
                yield self.env.timeout(s.open_wait_s)
            return _Session(None, None)
        arrived = self.up.send(self.env, d, s.open_up[0])
        opened = self.env.event() if s.waits_opened or s.conditioned_prompt else None
        if s.conditioned_prompt:
            arrived.callbacks.append(lambda _ev: self.env.process(self._opened_after_prefill(d, s, opened)))
        else:
            arrived.callbacks.append(lambda _ev: self._opened(d, s.open_down, opened))
        session = _Session(arrived, opened)
        if s.conditioned_prompt:
            yield opened
        return session

    def _opened_after_prefill(self, d: int, s: LoopScript | CoarseScript, opened: simpy.Event):
        """A conditioned Open: the verifier's forward over the prompt, then Opened (with the states) down."""
        yield self.verifier.submit(s.conditioned_prompt)
        yield self.down.send(self.env, d, s.open_down, self.rpc_s)
        opened.succeed()

    def _coarse(self, d: int, s: CoarseScript):
        """A coarse generation (``simulate/coarse.py``): per segment the edge's work as one delay, then its
        round trip, stop-and-wait; the verifier's forwards one after the other."""
        env = self.env
        t0 = env.now
        self.up_grpc += s.open_up[1] + s.close_up[1]
        if s.open_s:
            yield env.timeout(s.open_s)
        session = yield from self._open_session(d, s)
        if s.head_s > s.open_s:
            yield env.timeout(s.head_s - s.open_s)
        left = s.tokens  # latencies still to record (a cut or truncated generation records no more)

        def record(latency: np.ndarray) -> None:
            nonlocal left
            taken = latency[:left]
            left -= len(taken)
            self.static_latency.append(taken)

        for k, seg in enumerate(s.segments):
            t_seg = env.now
            if seg.busy_s:
                yield env.timeout(seg.busy_s)
            latency = seg.static_latency
            if k == 0 and seg.first_static >= 0:  # the first token counts from the start of the generation
                latency = latency.copy()
                latency[seg.first_static] += t_seg - t0
            record(latency)
            r = seg.round
            if r is None:
                continue
            if r.waits_opened and session.opened is not None and not session.opened.processed:
                yield session.opened  # submit() reads the verifier's message limit from Opened first
            self.up_grpc += r.up_grpc
            self.tokens_sent += r.sent
            if self.recorded:
                yield env.timeout(r.wait_s)
            else:
                yield self.up.send(env, d, r.up_wire)
                if session.served is not None and not session.served.processed:
                    yield session.served  # the Open before it
                session.served = None
                for tail in r.tails:  # each forward queues and batches on its own, as the engine's do
                    yield self.verifier.submit(tail)
                yield self.down.send(env, d, r.down_wire, self.rpc_s)
            if len(seg.verdict_start):
                starts = t_seg + seg.verdict_start
                if k == 0:
                    starts[seg.verdict_start == 0] = t0
                record(env.now - starts)
        if s.close_up[0] and not self.recorded:
            self.up.send(env, d, s.close_up[0])  # Close, after the last verdict; nobody waits for it

    def _opened(self, d: int, nbytes: int, opened: simpy.Event | None) -> None:
        """The verifier answers Open as it arrives (no forward pass): Opened down."""
        done = self.down.send(self.env, d, nbytes, self.rpc_s)
        if opened is not None:
            done.callbacks.append(lambda _ev: opened.succeed())

    def _round_trip(self, d: int, session: _Session, v: Verify) -> simpy.Event:
        if self.recorded:
            return self.env.timeout(v.wait_s)
        return self.env.process(self._verify(d, session, v))

    def _verify(self, d: int, session: _Session, v: Verify):
        """Verify up, served after the session's earlier messages (one stream, in order), Verdict down. A stale
        Verify is answered without a forward pass: no verifier time."""
        env = self.env
        before, served = session.served, env.event()
        session.served = served
        yield self.up.send(env, d, v.up_wire)
        if before is not None:
            yield before
        if v.tokens:
            yield self.verifier.submit(v.tokens)
        served.succeed()
        yield self.down.send(env, d, v.down_wire, self.rpc_s)  # + the gRPC stacks' own latency


def recorded_loop_seconds(g: Generation, framing, stale_rtt_s: float) -> float:
    """A v2 hybrid generation's loop time (first draft to the last verdict) replayed at its recorded timers
    and round trips: the wall time it accounts for, stale verdicts' waits (which the trace does not time)
    included."""
    script = build_loop_script(g, g.step_s + g.encode_s, g.rb_step_s + g.rb_encode_s, 0.0, framing, stale_rtt_s)
    probe = _LoopReplay(simpy.Environment(), recorded=True)
    probe.env.process(probe._loop(0, script))
    probe.env.run()
    return probe.env.now - script.open_s  # the replay starts with the Open


class Simulation(_LoopReplay):
    """One run of one configuration; ``run()`` returns the metrics. ``recorded=True``: the trace at its own
    round trips (see the module docstring); links and verifier are then unused."""

    def __init__(self, config: SimConfig, trace: Trace, service: Service | None = None, recorded: bool = False):
        self.config, self.trace, self.recorded = config, trace, recorded
        if recorded and (trace.mode == "stream" or any(g.mode == "hybrid" and g.open_s is None
                                                       for g in trace.generations)):
            raise ValueError("the recorded replay needs protocol-v2 edge traces (open_s, encode_s, blocked_s)")
        super().__init__(simpy.Environment(), recorded)
        self.rng = np.random.default_rng(config.seed)
        if service is None and config.service_file:
            service = load_batched(config.service_file)
        if service is None and config.service_trace:
            service = fit_service(load_trace(config.traces[config.service_trace], config.service_trace))
        self.service = service or fit_service(trace)
        self.rpc_s = rpc_overhead(trace) if config.rpc_overhead_s is None else config.rpc_overhead_s
        speed = 1.0 if recorded else config.edge_speed
        if trace.mode == "stream":
            compute, rolled = [g.step_s for g in trace.generations], [None] * len(trace.generations)
        elif recorded:  # the edge's own timers, as recorded
            compute = [g.step_s + g.encode_s for g in trace.generations]
            rolled = [g.rb_step_s + g.rb_encode_s for g in trace.generations]
        else:
            compute = [c / speed for c in edge_step_times(trace, config.edge_compute)]
            rolled = [c / speed for c in rolled_back_times(trace, config.edge_compute)]
        self.compute, self.rolled = compute, rolled
        sent = [g.wait_s[g.sent] - g.server_s[g.sent] for g in trace.generations if g.mode == "hybrid"]
        self.stale_rtt_s = max(0.0, float(np.median(np.concatenate(sent)))) if sent and sum(map(len, sent)) else 0.0
        self.speed = speed
        self.heads = [self._head(g, speed) for g in trace.generations]
        self.scripts = [self._build(i) for i in range(len(trace.generations))]
        self._cut: dict[tuple[int, int], Script | LoopScript] = {}
        n = config.devices
        self.up = self._direction(config.uplink, config.rtt_s / 2)
        self.down = self._direction(config.downlink, config.rtt_s / 2)
        self.verifier = Verifier(self.env, self.service, config.workers, config.max_batch, config.verifier_speed)
        self.devices = [DeviceLog() for _ in range(n)]

    def _head(self, g: Generation, speed: float) -> float | None:
        """v2 traces: the edge's time before its first draft, ``open_s`` + the untimed per-generation work (which
        scales with the edge). A pipelined generation's untimed work is what its wall time has beyond its loop
        replayed at the recorded round trips (the trace does not time waits for stale verdicts)."""
        if g.head_s is None:
            return None
        untimed = g.untimed_s
        if g.mode == "hybrid" and g.lookahead:
            untimed = max(0.0, g.seconds - g.open_s - recorded_loop_seconds(g, self.config.framing, self.stale_rtt_s))
        return g.open_s + untimed / speed

    def _build(self, index: int, tokens: int | None = None) -> Script | LoopScript | CoarseScript:
        g = self.trace.generations[index]
        if g.mode == "coarse":
            return build_coarse_script(g, self.compute[index], self.heads[index], self.config.framing, self.speed,
                                       tokens)
        if g.mode == "hybrid" and g.open_s is not None:
            return build_loop_script(g, self.compute[index], self.rolled[index], self.heads[index], self.config.framing,
                                     self.stale_rtt_s, tokens)
        return build_script(g, self.compute[index], self.config.framing, tokens)

    def _direction(self, link: LinkConfig, one_way: float) -> _Direction:
        c, f = self.config, self.config.framing
        model = make_link_model(link, c.devices, self.rng)
        shared = TDMALinks(self.env, model.capacity, c.devices) if link.sharing == "tdma" \
            else PSLink(self.env, model.capacity)
        return _Direction(model, shared, Propagation(one_way, c.jitter_s, c.loss, c.retransmit_s),
                          f.mss + f.tcpip_bytes + f.l2_bytes, self.rng)

    def _script(self, index: int, tokens: int) -> Script | LoopScript:
        script = self.scripts[index]
        if tokens >= script.tokens:
            return script
        key = (index, tokens)
        if key not in self._cut:
            self._cut[key] = self._build(index, tokens)
        return self._cut[key]

    def _device(self, d: int, start: float, first: int):
        env, log = self.env, self.devices[d]
        yield env.timeout(start)
        log.start = env.now
        index, left = first, self.config.tokens_per_device
        while left > 0:
            script = self._script(index, left)
            yield from self._replay(d, script, index)
            left -= script.tokens
            log.tokens += script.tokens
            index = (index + 1) % len(self.scripts)
        log.finish = env.now

    def _replay(self, d: int, s: Script | LoopScript, index: int):
        if s.mode == "local":
            head = self.heads[index]
            if head is None:
                self.static_latency.append(s.skipped_latency)
                yield self.env.timeout(s.tail_s)
            else:  # v2: the prefill (untimed) before the first token, which counts it
                latency = s.skipped_latency.copy()
                latency[0] += head
                self.static_latency.append(latency)
                yield self.env.timeout(head + s.tail_s)
        elif s.mode == "stream":
            yield from self._stream(d, s)
        elif s.mode == "loop":
            yield from self._loop(d, s)
        elif s.mode == "coarse":
            yield from self._coarse(d, s)
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

        metrics = summarize(self, wall, events)
        tokens = metrics["tokens"]
        metrics["stale_verifies_per_token"] = self.stale_sent / tokens if tokens else None
        metrics["rolled_back_per_token"] = self.rolled_back / tokens if tokens else None
        return metrics


def _events_scheduled(env: simpy.Environment) -> int:
    """Events SimPy has scheduled so far (its internal id counter; reading it costs one id)."""
    eid = getattr(env, "_eid", None)
    return next(eid) if isinstance(eid, count) else 0


def simulate(config: SimConfig, trace: Trace, service: Service | None = None) -> RunResult:
    return Simulation(config, trace, service).run()
