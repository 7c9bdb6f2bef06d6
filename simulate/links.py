"""Shared links on the SimPy clock: processor sharing by virtual time, and TDMA as fixed per-device shares.

Processor sharing (PS): the n messages in transfer each progress at speed(t)/n, the fluid model of TCP
flows sharing one bottleneck fairly. Instead of ticking bytes, the link keeps a virtual time V with
dV/dt = speed(t)/n(t); a message that arrives when V = v with work w leaves when V reaches v + w, so
messages sit in a heap by finish tag and the link schedules exactly one wake-up: the next finish or the
next capacity change. A wake-up made stale by a later arrival is recognised by a generation counter and
ignored (SimPy cannot cancel a timeout). Cost per message: O(log n) plus a constant number of events.

TDMA: every device owns 1/N of the link whether it sends or not (ideal fine-grained slots), i.e. its own
PS link of speed(t)/N. Cheaper for nobody, fairer for nobody: it wastes idle devices' slots.
"""

from __future__ import annotations

import heapq
import math

import simpy

from simulate.channel import Capacity

_EPS = 1e-12


class _ScaledCapacity(Capacity):
    def __init__(self, base: Capacity, factor: float):
        self.base, self.factor = base, factor

    def speed(self, t: float) -> float:
        return self.base.speed(t) * self.factor

    def next_change(self, t: float) -> float:
        return self.base.next_change(t)


class PSLink:
    """One processor-sharing link; ``send`` returns an event that fires when the message is delivered."""

    def __init__(self, env: simpy.Environment, capacity: Capacity):
        self.env, self.capacity = env, capacity
        self.v = 0.0  # virtual time: work each active message has received
        self.last = 0.0  # when ``v`` was last brought up to date
        self.heap: list[tuple] = []  # (finish tag, seq, delay, event, on_leave)
        self.seq = 0
        self.wake_token = 0
        self.busy_s = 0.0  # time with at least one message in transfer
        self.bytes = 0  # link bytes accepted (messages + resent packets)
        self.messages = 0

    def _advance(self) -> None:
        now = self.env.now
        n = len(self.heap)
        if n and now > self.last:
            # speed is constant since ``last``: a wake-up is scheduled at every capacity change while busy
            self.v += self.capacity.speed(self.last) * (now - self.last) / n
            self.busy_s += now - self.last
        self.last = now

    def send(self, work: float, nbytes: int, delay: float, device: int = 0, on_leave=None) -> simpy.Event:
        """Start a transfer of ``work`` units (``nbytes`` link bytes); the event fires ``delay`` after its
        last bit has left (propagation). ``on_leave()``, if given, is called when the last bit leaves."""
        self._advance()
        done = self.env.event()
        self.seq += 1
        heapq.heappush(self.heap, (self.v + work, self.seq, delay, done, on_leave))
        self.bytes += nbytes
        self.messages += 1
        self._schedule()
        return done

    def _schedule(self) -> None:
        if not self.heap:
            return
        now = self.env.now
        speed = self.capacity.speed(now)
        dt = (self.heap[0][0] - self.v) * len(self.heap) / speed if speed > 0 else math.inf
        dt = max(min(dt, self.capacity.next_change(now) - now), 0.0)
        self.wake_token += 1
        token = self.wake_token
        self.env.timeout(dt).callbacks.append(lambda _ev: self._wake(token))

    def _wake(self, token: int) -> None:
        if token != self.wake_token:
            return  # superseded by a later arrival or departure
        self._advance()
        while self.heap and self._finished(self.heap[0][0]):
            _, _, delay, done, on_leave = heapq.heappop(self.heap)
            if on_leave is not None:
                on_leave()
            if delay > 0:
                self.env.timeout(delay).callbacks.append(lambda _ev, d=done: d.succeed())
            else:
                done.succeed()
        self._schedule()

    def _finished(self, tag: float) -> bool:
        """Done when no work is left, or when what is left would end within the clock's resolution
        (rounding in V must never leave a wake-up that cannot move the clock)."""
        left = tag - self.v
        if left <= _EPS * max(1.0, abs(self.v)):
            return True
        speed = self.capacity.speed(self.env.now)
        return speed > 0 and self.env.now + left * len(self.heap) / speed <= self.env.now


class TDMALinks:
    """N devices, each with a dedicated 1/N share of the capacity (its own PS link)."""

    def __init__(self, env: simpy.Environment, capacity: Capacity, devices: int):
        share = _ScaledCapacity(capacity, 1.0 / devices)
        self.links = [PSLink(env, share) for _ in range(devices)]

    def send(self, work: float, nbytes: int, delay: float, device: int = 0, on_leave=None) -> simpy.Event:
        return self.links[device].send(work, nbytes, delay, on_leave=on_leave)

    @property
    def busy_s(self) -> float:
        return sum(link.busy_s for link in self.links) / len(self.links)

    @property
    def bytes(self) -> int:
        return sum(link.bytes for link in self.links)

    @property
    def messages(self) -> int:
        return sum(link.messages for link in self.links)
