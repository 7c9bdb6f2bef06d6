"""Channel models: how fast a device's message drains into a link, how long it travels, what loss costs.

A link carries *work*: for rate-limited models work = bits and the link's speed is its capacity in bit/s
(constant, or piecewise constant from a capacity trace); for the wireless model work = bits / the
device's Shannon rate (seconds of exclusive air time) and the link's speed is 1, so processor sharing
divides air time, each device moving at its own spectral efficiency while it holds the medium.

- ``FixedRate``: constant bit/s.
- ``CapacityTrace``: a CSV of ``time_s,bps`` rows, piecewise constant, repeated after its last row.
- ``Wireless``: rate = B·log2(1 + SNR), SNR = snr_db at ``reference_m`` minus path loss
  10·n·log10(d/reference_m), times a Rayleigh block-fading power gain ~ Exp(1) redrawn every
  ``coherence_s`` per device. The gain in force when a message starts is kept for the whole message
  (coherence time >= message air time); rates below ``min_rate_bps`` are raised to it (link adaptation
  never stops completely).

Propagation: each message arrives RTT/2 after its last bit leaves, plus an exponential jitter of mean
``jitter_s``. Loss: each packet is lost independently with probability p and resent after
``retransmit_s``; resent packets occupy the link again (extra work) and delay the message by the longest
chain of resends among its packets.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class Capacity:
    """A link's speed over time: piecewise constant, with the next change point."""

    def speed(self, t: float) -> float:
        raise NotImplementedError

    def next_change(self, t: float) -> float:
        return math.inf


@dataclass
class ConstantCapacity(Capacity):
    value: float

    def speed(self, t: float) -> float:
        return self.value


@dataclass
class TraceCapacity(Capacity):
    """Capacity trace: ``times`` ascending from 0, ``bps`` the rate from each time on; cyclic."""

    times: np.ndarray  # [R] seconds, times[0] == 0
    bps: np.ndarray  # [R] bit/s
    period: float  # the trace repeats after this many seconds

    def _index(self, t: float) -> tuple[int, float]:
        base = math.floor(t / self.period) * self.period
        return int(np.searchsorted(self.times, t - base, side="right") - 1), base

    def speed(self, t: float) -> float:
        i, _ = self._index(t)
        return float(self.bps[i])

    def next_change(self, t: float) -> float:
        i, base = self._index(t)
        nxt = base + (self.times[i + 1] if i + 1 < len(self.times) else self.period)
        return nxt if nxt > t else float(np.nextafter(t, math.inf))


def read_capacity_csv(path: str | Path) -> TraceCapacity:
    """``time_s,bps`` rows (a header row is allowed); the last row's rate lasts one median step."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].strip().startswith("#")]
    except OSError as exc:
        raise ValueError(f"cannot read capacity trace {path}: {exc.strerror}") from None
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]
    try:
        data = np.array([[float(r[0]), float(r[1])] for r in rows], dtype=float)
    except (ValueError, IndexError):
        raise ValueError(f"capacity trace {path}: every row must be 'time_s,bps'") from None
    if len(data) < 1 or data[0, 0] != 0 or np.any(np.diff(data[:, 0]) <= 0) or np.any(data[:, 1] < 0):
        raise ValueError(f"capacity trace {path}: times must start at 0 and increase; rates must be >= 0")
    if not np.any(data[:, 1] > 0):
        raise ValueError(f"capacity trace {path}: every rate is 0, nothing could ever be sent")
    step = float(np.median(np.diff(data[:, 0]))) if len(data) > 1 else 1.0
    return TraceCapacity(data[:, 0], data[:, 1], float(data[-1, 0] + step))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class LinkModel:
    """Turns a message into work on the link (see the module docstring)."""

    capacity: Capacity

    def work(self, device: int, bits: float, now: float, rng: np.random.Generator) -> float:
        return bits

    def nominal_bps(self) -> float:
        """A representative rate, for utilization and reports."""
        raise NotImplementedError


@dataclass
class FixedRate(LinkModel):
    rate_bps: float

    def __post_init__(self):
        self.capacity = ConstantCapacity(self.rate_bps)

    def nominal_bps(self) -> float:
        return self.rate_bps


@dataclass
class TraceRate(LinkModel):
    capacity: TraceCapacity

    def nominal_bps(self) -> float:
        widths = np.diff(np.append(self.capacity.times, self.capacity.period))
        return float(np.sum(widths * self.capacity.bps) / self.capacity.period)


@dataclass
class Wireless(LinkModel):
    bandwidth_hz: float
    snr_db: float  # at reference_m, before fading
    distances_m: np.ndarray  # [N] one per device
    path_loss_exponent: float = 3.0
    reference_m: float = 1.0
    fading: bool = True
    coherence_s: float = 0.01
    min_rate_bps: float = 1e3
    _blocks: dict = field(default_factory=dict)  # device -> (block index, gain)

    def __post_init__(self):
        self.capacity = ConstantCapacity(1.0)  # work is air time; the medium is shared in time

    def mean_snr(self, device: int) -> float:
        d = max(float(self.distances_m[device % len(self.distances_m)]), self.reference_m)
        return 10 ** ((self.snr_db - 10 * self.path_loss_exponent * math.log10(d / self.reference_m)) / 10)

    def rate(self, device: int, now: float, rng: np.random.Generator) -> float:
        snr = self.mean_snr(device)
        if self.fading:
            block = int(now // self.coherence_s)
            cached = self._blocks.get(device)
            if cached is None or cached[0] != block:
                cached = (block, float(rng.exponential(1.0)))
                self._blocks[device] = cached
            snr *= cached[1]
        return max(self.bandwidth_hz * math.log2(1 + snr), self.min_rate_bps)

    def work(self, device: int, bits: float, now: float, rng: np.random.Generator) -> float:
        return bits / self.rate(device, now, rng)

    def nominal_bps(self) -> float:
        return self.bandwidth_hz * math.log2(1 + self.mean_snr(0))


@dataclass(frozen=True)
class Propagation:
    """Propagation and loss of one direction (RTT/2 each way)."""

    one_way_s: float
    jitter_s: float = 0.0
    loss: float = 0.0  # per-packet loss probability
    retransmit_s: float = 0.2  # a lost packet is resent this long after it was first sent

    def delay(self, rng: np.random.Generator) -> float:
        return self.one_way_s + (rng.exponential(self.jitter_s) if self.jitter_s > 0 else 0.0)

    def losses(self, packets: int, rng: np.random.Generator) -> tuple[int, float]:
        """(packets resent, extra delay) for a message of ``packets`` packets."""
        if self.loss <= 0 or packets <= 0:
            return 0, 0.0
        resends = rng.geometric(1.0 - self.loss, size=packets) - 1  # [packets] failures before success
        return int(resends.sum()), float(resends.max()) * self.retransmit_s
