"""The simulator's configuration file (JSON), validated field by field: one clear error naming the field.

Layout (every field but ``traces`` has a default; paths are relative to the working directory)::

    {"traces": {"default": "reports/sim/traces/default.jsonl", ...}  # name -> trace file
               # or "traces_dir": "reports/sim/traces"               # every *.jsonl there, named by stem
     "policy": "default",             # which trace a run replays
     "devices": 100, "tokens_per_device": 200, "seed": 0,
     "start_spread_s": 0.5,           # device start times uniform in [0, this)
     "network": {"rtt_s": 0.05, "jitter_s": 0.0, "loss": 0.0, "retransmit_s": 0.2,
                 "uplink":   {"model": "fixed", "rate_bps": 1e7, "sharing": "ps"},
                 "downlink": {"model": "fixed", "rate_bps": 1e8, "sharing": "ps"},
                 "framing":  {"mss": 1448, "tcpip_bytes": 52, "l2_bytes": 14, "headers_up": 120,
                              "headers_down": 100}},
     "verifier": {"workers": 1, "max_batch": 1, "speed": 1.0, "rpc_overhead_s": "trace",
                  "service": "trace",         # or "batched:PATH": the engine's measured batched cost
                  "service_trace": null},     # e.g. "hlm": service times of a busy verifier for every policy
     "edge": {"compute": "trace", "speed": 1.0},
     "sweep": {"uplink_bps": [...], "rtt_s": [...], "devices": [...], "policies": [...]}}

``verifier.service``: ``"trace"`` fits ``a + b * tokens`` to the replayed trace's verifier times (batches
extrapolated: ``simulate/compute.py``); ``"batched:PATH"`` loads the batched model that
``bench/verifier_service.py`` measured on the real engine (``simulate/batched.py``), and ``max_batch``
then defaults to the largest batch measured.

Link models: ``fixed`` (``rate_bps``), ``trace`` (``csv``: time_s,bps rows), ``wireless`` (``bandwidth_hz``,
``snr_db``, ``distance_m`` as a number or [min, max], ``path_loss_exponent``, ``reference_m``,
``fading``, ``coherence_s``, ``min_rate_bps``). ``sharing``: ``ps`` (processor sharing) or ``tdma``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from simulate.framing import Framing


class ConfigError(ValueError):
    """An unusable configuration; the message names the field."""


LINK_MODELS = ("fixed", "trace", "wireless")
SHARING = ("ps", "tdma")
EDGE_COMPUTE = ("trace", "median")


@dataclass(frozen=True)
class LinkConfig:
    model: str = "fixed"
    sharing: str = "ps"
    rate_bps: float = 10e6
    csv: str | None = None
    bandwidth_hz: float = 1e6
    snr_db: float = 20.0
    distance_m: tuple[float, float] = (1.0, 1.0)
    path_loss_exponent: float = 3.0
    reference_m: float = 1.0
    fading: bool = False
    coherence_s: float = 0.01
    min_rate_bps: float = 1e3


@dataclass(frozen=True)
class SimConfig:
    traces: dict[str, str]
    policy: str = "default"
    devices: int = 1
    tokens_per_device: int = 200
    seed: int = 0
    start_spread_s: float = 0.0
    rtt_s: float = 0.05
    jitter_s: float = 0.0
    loss: float = 0.0
    retransmit_s: float = 0.2
    uplink: LinkConfig = LinkConfig()
    downlink: LinkConfig = LinkConfig(rate_bps=100e6)
    framing: Framing = Framing()
    workers: int = 1
    max_batch: int = 1
    verifier_speed: float = 1.0
    rpc_overhead_s: float | None = None  # None = from the trace (``compute.rpc_overhead``)
    service_trace: str | None = None  # fit the verifier's service time from this trace instead of the policy's
    service_file: str | None = None  # the batched engine's measured model (``verifier.service = "batched:PATH"``)
    edge_compute: str = "trace"
    edge_speed: float = 1.0
    sweep: dict = field(default_factory=dict)

    def with_point(self, **changes) -> SimConfig:
        """A copy with ``uplink_bps``, ``rtt_s``, ``devices`` or ``policy`` replaced (sweep points)."""
        if "uplink_bps" in changes:
            changes["uplink"] = replace(self.uplink, rate_bps=float(changes.pop("uplink_bps")))
        return replace(self, **changes)


class _Fields:
    """Reads one JSON object, checking each field; ``done`` refuses fields nobody asked for."""

    def __init__(self, raw, where: str):
        if not isinstance(raw, dict):
            raise ConfigError(f"field '{where}' must be an object")
        self.raw, self.where, self.seen = raw, where, set()

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default):
        self.seen.add(key)
        return self.raw.get(key, default)

    def number(self, key: str, default: float, low: float = 0.0, strict: bool = False, high: float = math.inf):
        value = self.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strict and value == low) or value > high:
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise ConfigError(f"field '{self._name(key)}' must be a number {bound}"
                              + (f" and <= {high:g}" if high < math.inf else "") + f", got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, low: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"field '{self._name(key)}' must be an integer >= {low}, got {value!r}")
        return value

    def choice(self, key: str, default: str, options: tuple) -> str:
        value = self.get(key, default)
        if value not in options:
            raise ConfigError(f"field '{self._name(key)}' must be one of {list(options)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"field '{self._name(key)}' must be true or false, got {value!r}")
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, {}), self._name(key))

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise ConfigError(f"unknown field '{self._name(unknown[0])}'")


def _distance(f: _Fields) -> tuple[float, float]:
    value = f.get("distance_m", 1.0)
    pair = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if (not isinstance(pair, list) or len(pair) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in pair)
            or pair[0] > pair[1]):
        raise ConfigError(f"field '{f._name('distance_m')}' must be a number > 0 or [min, max], got {value!r}")
    return float(pair[0]), float(pair[1])


def _link(f: _Fields, default_rate: float) -> LinkConfig:
    model = f.choice("model", "fixed", LINK_MODELS)
    link = LinkConfig(model=model, sharing=f.choice("sharing", "ps", SHARING),
                      rate_bps=f.number("rate_bps", default_rate, strict=True))
    if model == "trace":
        csv = f.get("csv", None)
        if not isinstance(csv, str) or not Path(csv).is_file():
            raise ConfigError(f"field '{f._name('csv')}' must name an existing time_s,bps CSV file, got {csv!r}")
        link = replace(link, csv=csv)
    elif model == "wireless":
        link = replace(link, bandwidth_hz=f.number("bandwidth_hz", 1e6, strict=True),
                       snr_db=f.number("snr_db", 20.0, low=-50.0, high=100.0), distance_m=_distance(f),
                       path_loss_exponent=f.number("path_loss_exponent", 3.0, high=10.0),
                       reference_m=f.number("reference_m", 1.0, strict=True),
                       fading=f.boolean("fading", False), coherence_s=f.number("coherence_s", 0.01, strict=True),
                       min_rate_bps=f.number("min_rate_bps", 1e3, strict=True))
    f.done()
    return link


def _framing(f: _Fields) -> Framing:
    d = Framing()
    out = Framing(mss=f.integer("mss", d.mss, low=64), tcpip_bytes=f.integer("tcpip_bytes", d.tcpip_bytes, 0),
                  l2_bytes=f.integer("l2_bytes", d.l2_bytes, 0), headers_up=f.integer("headers_up", d.headers_up, 0),
                  headers_down=f.integer("headers_down", d.headers_down, 0))
    f.done()
    return out


def _rpc_overhead(f: _Fields) -> float | None:
    if f.get("rpc_overhead_s", "trace") == "trace":
        return None
    return f.number("rpc_overhead_s", 0.0)


def _service_trace(f: _Fields, traces: dict) -> str | None:
    name = f.get("service_trace", None)
    if name is not None and name not in traces:
        raise ConfigError(f"field 'verifier.service_trace' must be one of the traces {sorted(traces)}, got {name!r}")
    return name


def _service(f: _Fields) -> tuple[str | None, int | None]:
    """(batched model file or None, its largest measured batch: ``max_batch``'s default then)."""
    value = f.get("service", "trace")
    if value == "trace":
        return None, None
    if not isinstance(value, str) or not value.startswith("batched:"):
        raise ConfigError(f"field 'verifier.service' must be \"trace\" or \"batched:PATH\", got {value!r}")
    from simulate.batched import load_batched

    path = value.removeprefix("batched:")
    try:
        return path, load_batched(path).max_rows
    except ValueError as exc:
        raise ConfigError(f"field 'verifier.service': {exc}") from None


def _traces(f: _Fields) -> dict[str, str]:
    traces, folder = f.get("traces", None), f.get("traces_dir", None)
    if folder is not None:
        if not isinstance(folder, str) or not Path(folder).is_dir():
            raise ConfigError(f"field 'traces_dir' must name an existing folder, got {folder!r}")
        traces = {**{p.stem: str(p) for p in sorted(Path(folder).glob("*.jsonl"))}, **(traces or {})}
    if not isinstance(traces, dict) or not traces:
        raise ConfigError("field 'traces' must map policy names to trace files (or give 'traces_dir')")
    for name, path in traces.items():
        if not isinstance(path, str) or not Path(path).is_file():
            raise ConfigError(f"field 'traces.{name}' must name an existing trace file, got {path!r}")
    return dict(traces)


def _sweep(f: _Fields, traces: dict) -> dict:
    out = {}
    for key, low in (("uplink_bps", 0.0), ("rtt_s", 0.0), ("devices", 1)):
        values = f.get(key, None)
        if values is None:
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(f"field 'sweep.{key}' must be a non-empty list")
        for v in values:
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            if bad or v < low or (key == "uplink_bps" and v == 0) or (key == "devices" and not isinstance(v, int)):
                raise ConfigError(f"field 'sweep.{key}' has an invalid entry {v!r}")
        out[key] = values
    policies = f.get("policies", None)
    if policies is not None:
        if not isinstance(policies, list) or not policies or any(p not in traces for p in policies):
            raise ConfigError(f"field 'sweep.policies' must list names from 'traces' ({sorted(traces)}), "
                              f"got {policies!r}")
        out["policies"] = policies
    f.done()
    return out


def parse_config(raw) -> SimConfig:
    """Validate a decoded JSON object into a SimConfig (ConfigError names the first bad field)."""
    top = _Fields(raw, "")
    traces = _traces(top)
    policy = top.get("policy", "default")
    if policy not in traces:
        raise ConfigError(f"field 'policy' must be one of the traces {sorted(traces)}, got {policy!r}")
    net, ver, edge = top.sub("network"), top.sub("verifier"), top.sub("edge")
    rtt = net.number("rtt_s", 0.05)
    service_file, measured_rows = _service(ver)
    if service_file and ver.raw.get("service_trace") is not None:
        raise ConfigError("field 'verifier.service_trace' fits the trace model: it cannot go with 'verifier.service' "
                          "batched")
    config = SimConfig(
        traces=traces, policy=policy, devices=top.integer("devices", 1),
        tokens_per_device=top.integer("tokens_per_device", 200), seed=top.integer("seed", 0, low=0),
        start_spread_s=top.number("start_spread_s", 0.0), rtt_s=rtt, jitter_s=net.number("jitter_s", 0.0),
        loss=net.number("loss", 0.0, high=0.5), retransmit_s=net.number("retransmit_s", max(0.2, rtt)),
        uplink=_link(net.sub("uplink"), 10e6), downlink=_link(net.sub("downlink"), 100e6),
        framing=_framing(net.sub("framing")), workers=ver.integer("workers", 1),
        max_batch=ver.integer("max_batch", measured_rows or 1), verifier_speed=ver.number("speed", 1.0, strict=True),
        rpc_overhead_s=_rpc_overhead(ver), service_trace=_service_trace(ver, traces), service_file=service_file,
        edge_compute=edge.choice("compute", "trace", EDGE_COMPUTE), edge_speed=edge.number("speed", 1.0, strict=True),
        sweep=_sweep(top.sub("sweep"), traces))
    for part in (net, ver, edge, top):
        part.done()
    return config


def load_config(path: str | Path) -> SimConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    return parse_config(raw)
