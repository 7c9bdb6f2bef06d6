"""Load and validate the JSON-lines traces the real edge records; one ``Generation`` per open…close block.

The format is the contract in ``proto/trace.py`` (row definitions, writers and the field lists checked
here): ``hybrid`` generations (the edge loop with a verifier), ``local`` ones (SLM-only) and ``stream``
ones (the cloud-only Generate baseline), each optionally followed by a ``task`` line with the answer's
correctness, so a run can report the trace's accuracy. Other line kinds are refused: a trace is a
contract, not free text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from proto.trace import (CLOSE_FIELDS, KINDS, MODES, OPEN_FIELDS, SENT_TOKEN_FIELDS, STREAM_TOKEN_FIELDS,
                         TOKEN_FIELDS)


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, line and field."""


@dataclass
class Generation:
    """One generation of a trace, as arrays over its tokens (T = tokens generated)."""

    mode: str  # "hybrid" | "local" | "stream"
    prompt_tokens: int
    open_up: int  # Open (or GenerateRequest) wire bytes, gRPC-level (protobuf + 5-byte prefix)
    open_down: int  # Opened wire bytes
    close_up: int  # Close wire bytes (0 when the session never verified)
    step_s: np.ndarray  # [T] edge compute per token (hybrid/local); chunk inter-arrival (stream)
    sent: np.ndarray  # [T] bool, a Verify was sent at this token
    up_bytes: np.ndarray  # [T] Verify wire bytes (0 when skipped)
    down_bytes: np.ndarray  # [T] Verdict / GenerateChunk wire bytes
    pending: np.ndarray  # [T] kept ids a Verify carried up
    server_s: np.ndarray  # [T] the verifier's own time for a Verify
    wait_s: np.ndarray  # [T] measured Verify -> Verdict round trip
    seconds: float  # measured wall time of the generation (without the Open handshake)
    correct: bool | None = None

    @property
    def tokens(self) -> int:
        return len(self.step_s)

    @property
    def untimed_s(self) -> float:
        """Edge time the per-token fields miss: the generation's wall time minus its tokens' compute and
        Verify waits. It is the loop's own work between those timers (encoding p~ into the Verify payload,
        building the message, writing the trace line), measured by the trace itself."""
        if self.mode == "stream":
            return 0.0
        return max(0.0, self.seconds - float(self.step_s.sum() + self.wait_s.sum()))

    def prefilled(self) -> np.ndarray:
        """[T] tokens the verifier's forward pass covers per Verify: the prompt and the pending ids on the
        first Verify (Open does no forward pass), afterwards the previous verdict's token plus pending."""
        out = self.pending + 1
        first = np.flatnonzero(self.sent)
        if len(first):
            out = out.copy()
            out[first[0]] = self.prompt_tokens + self.pending[first[0]]
        return out


@dataclass
class Trace:
    """All generations of one trace file (one policy at one threshold)."""

    name: str
    path: str
    mode: str
    estimator: str
    codec: str
    threshold: float | None
    generations: list[Generation]

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.generations)

    @property
    def accuracy(self) -> float | None:
        marks = [g.correct for g in self.generations if g.correct is not None]
        return sum(marks) / len(marks) if marks and len(marks) == len(self.generations) else None

    @property
    def transmission_rate(self) -> float:
        return sum(int(g.sent.sum()) for g in self.generations) / max(self.tokens, 1)

    @property
    def grpc_up_bytes(self) -> int:
        return sum(g.open_up + g.close_up + int(g.up_bytes.sum()) for g in self.generations)


def _num(row: dict, key: str, where: str, minimum: float = 0.0) -> float:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise TraceError(f"{where}: field '{key}' must be a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def _int(row: dict, key: str, where: str) -> int:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TraceError(f"{where}: field '{key}' must be an integer >= 0, got {value!r}")
    return value


def _threshold(value) -> float | None:
    if value is None:
        return None
    return float(value)  # "inf" / "-inf" are written as strings by the edge


def _require(row: dict, fields: tuple[str, ...], where: str) -> None:
    """TraceError naming the first contract field (``proto/trace.py``) that ``row`` lacks."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise TraceError(f"{where}: field '{missing[0]}' is missing (a {row.get('kind')} line needs {', '.join(fields)})")


class _Builder:
    """Accumulates the lines of one generation, then checks and freezes them into a Generation."""

    def __init__(self, head: dict, where: str):
        self.mode = head.get("mode") or ("hybrid" if head.get("verifier") else "local")
        if self.mode not in MODES:
            raise TraceError(f"{where}: field 'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        _require(head, OPEN_FIELDS, where)
        if head.get("lookahead", 0):  # the replay models one Verify at a time: it would misstate a pipelined run
            raise TraceError(f"{where}: a pipelined generation (lookahead {head['lookahead']}); the simulator "
                             "replays stop-and-wait traces only (record with lookahead 0)")
        self.prompt_tokens = _int(head, "prompt_tokens", where)
        self.open_up = _int(head, "uplink_bytes", where)
        self.open_down = _int(head, "downlink_bytes", where)
        self.rows: list[tuple] = []

    def token(self, row: dict, where: str) -> None:
        if self.mode == "stream":
            _require(row, STREAM_TOKEN_FIELDS, where)
            self.rows.append((_num(row, "chunk_s", where), False, 0, _int(row, "down_bytes", where), 0, 0.0, 0.0))
            return
        _require(row, TOKEN_FIELDS, where)
        sent = row.get("sent")
        if sent is True:
            _require(row, SENT_TOKEN_FIELDS, where)
        if not isinstance(sent, bool):
            raise TraceError(f"{where}: field 'sent' must be true or false, got {sent!r}")
        if sent and self.mode == "local":
            raise TraceError(f"{where}: a token was sent in a generation without a verifier")
        up = _int(row, "bytes", where)
        if sent and up == 0:
            raise TraceError(f"{where}: field 'bytes' is 0 for a sent token")
        self.rows.append((_num(row, "slm_step_s", where), sent, up, _int(row, "down_bytes", where) if sent else 0,
                          _int(row, "pending", where) if sent else 0, _num(row, "server_s", where) if sent else 0.0,
                          _num(row, "wait_s", where) if sent else 0.0))

    def close(self, row: dict, where: str) -> Generation:
        _require(row, CLOSE_FIELDS, where)
        if _int(row, "tokens", where) != len(self.rows):
            raise TraceError(f"{where}: field 'tokens' says {row['tokens']}, the generation has {len(self.rows)}")
        if not self.rows:
            raise TraceError(f"{where}: a generation with no tokens")
        step, sent, up, down, pend, server, wait = (np.array(c) for c in zip(*self.rows))
        total_up = _int(row, "uplink_bytes", where)
        close_up = total_up - self.open_up - int(up.sum())
        if self.mode == "hybrid" and close_up < 0:
            raise TraceError(f"{where}: field 'uplink_bytes' ({total_up}) is less than Open + Verify bytes")
        return Generation(self.mode, self.prompt_tokens, self.open_up, self.open_down,
                          max(close_up, 0) if self.mode == "hybrid" else 0, step.astype(float), sent.astype(bool),
                          up.astype(np.int64), down.astype(np.int64), pend.astype(np.int64), server.astype(float),
                          wait.astype(float), _num(row, "seconds", where))


def _parse_line(text: str, where: str) -> dict:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(row, dict) or row.get("kind") not in KINDS:
        raise TraceError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}")
    return row


def load_trace(path: str | Path, name: str | None = None) -> Trace:
    """Read one trace file; raises TraceError naming the file, the line and the field on any problem."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None
    generations: list[Generation] = []
    head: dict | None = None
    builder: _Builder | None = None
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        row = _parse_line(text, where)
        kind = row["kind"]
        if kind == "open":
            if builder is not None:
                raise TraceError(f"{where}: an open line inside an unclosed generation")
            builder, head = _Builder(row, where), head or row
        elif kind == "task":
            if not generations or builder is not None or not isinstance(row.get("correct"), bool):
                raise TraceError(f"{where}: a task line must follow a close line and carry 'correct': bool")
            generations[-1].correct = row["correct"]
        elif builder is None:
            raise TraceError(f"{where}: a {kind} line outside a generation (no open line before it)")
        elif kind == "token":
            builder.token(row, where)
        else:
            generations.append(builder.close(row, where))
            builder = None
    if builder is not None:
        raise TraceError(f"{path}: the last generation has no close line (truncated trace?)")
    if not generations:
        raise TraceError(f"{path}: no generations in the trace")
    modes = {g.mode for g in generations}
    if len(modes) > 1:
        raise TraceError(f"{path}: mixes generation modes {sorted(modes)}; record one policy per file")
    codec = head.get("codec")
    return Trace(name or path.stem, str(path), modes.pop(), str(head.get("estimator", "")),
                 codec.get("name", "") if isinstance(codec, dict) else str(codec or ""),
                 _threshold(head.get("threshold")), generations)
