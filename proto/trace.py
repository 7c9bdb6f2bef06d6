"""The trace format: the contract between the recorders (the real edge, the cloud-only recorder) and the
simulator that replays them. One JSON object per line; one generation is an ``open`` line, its ``token``
lines and a ``close`` line, optionally followed by a ``task`` line with the answer's correctness.

Three modes of generation, told apart by the ``open`` line:

- ``hybrid`` (``"verifier": true``): the edge loop with a verifier; per token the edge's compute time,
  whether a Verify was sent, its wire bytes, the pending ids it carried, the Verdict's wire bytes and the
  verifier's own time. A pipelined run (``lookahead`` > 0 on the open line) also writes the drafts a
  rejection discarded, as token lines with ``"rolled_back": true`` just before the line of the token that
  finally took their position; readers that count tokens skip them.
- ``local`` (``"verifier": false``): the same loop without a verifier (SLM-only).
- ``stream`` (``"mode": "stream"``): the cloud-only baseline, the verifier's Generate stream; per token
  ``chunk_s`` (time since the previous chunk, or since the request for the first) and the chunk's bytes.

The row definitions and writers live here; ``simulate/trace.py`` reads and validates against the field
lists below, so a field cannot be renamed on one side only. Bytes are gRPC-level wire sizes (serialized
protobuf + the 5-byte length prefix). Infinite thresholds and uncertainties are written as strings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TextIO

KINDS = ("open", "token", "close", "task")
MODES = ("hybrid", "local", "stream")
OPEN_FIELDS = ("prompt_tokens", "uplink_bytes", "downlink_bytes")  # every open line (mode-specific extras too)
TOKEN_FIELDS = ("position", "token", "sent", "bytes", "slm_step_s")  # hybrid/local token lines
SENT_TOKEN_FIELDS = ("pending", "down_bytes", "server_s", "wait_s", "accepted", "returned")  # when sent
STREAM_TOKEN_FIELDS = ("position", "token", "chunk_s", "down_bytes")
CLOSE_FIELDS = ("tokens", "uplink_bytes", "downlink_bytes", "seconds")
TASK_FIELDS = ("correct",)


def json_float(x: float | None) -> float | str | None:
    """A float as JSON allows it: inf/-inf/nan become strings (read back with ``float()``)."""
    return x if x is None or math.isfinite(x) else str(x)


@dataclass
class TokenRecord:
    """One generated position of the edge loop, as written to a ``token`` line."""

    position: int  # index in the full sequence (prompt included)
    token: int  # the token kept at this position
    draft: int
    u: float
    sent: bool
    bytes: int  # uplink wire bytes of this position's Verify (0 when skipped)
    accepted: bool | None  # None when not sent
    returned: int | None  # the verifier's token when sent
    slm_step_s: float  # SLM forward + sampling + compression + uncertainty for this position
    wait_s: float  # waiting for the verdict (0 when skipped)
    draft_prob: float = 0.0  # p~(draft)
    target_prob: float | None = None  # q(draft), when the verifier reports it (calibration runs)
    u_all: dict | None = None  # every estimator's u at this position (calibration runs)
    pending: int = 0  # kept tokens this Verify carried up (prefilled by the verifier with this position)
    down_bytes: int = 0  # downlink wire bytes of this position's Verdict
    server_s: float = 0.0  # the verifier's own time for this Verify (its share of wait_s)
    unverified: bool = False  # should have been verified, but no verifier was reachable (cloud lost, local)
    encode_s: float = 0.0  # encoding p~ and submitting the Verify (between slm_step_s and the wait)
    blocked_s: float = 0.0  # the loop's own wait for this verdict (pipelined: less than wait_s, often 0)
    rolled_back: bool = False  # drafted, then discarded by a rejection at an earlier position
    queue_s: float = 0.0  # the verifier's wait for its model within server_s (contention with other sessions)

    @classmethod
    def kept(cls, position: int, draft: int, u: float, draft_prob: float, slm_step_s: float) -> TokenRecord:
        """A position whose draft is kept without asking the verifier (so far: ``verified`` may follow)."""
        return cls(position=position, token=draft, draft=draft, u=u, sent=False, bytes=0, accepted=None,
                   returned=None, slm_step_s=slm_step_s, wait_s=0.0, draft_prob=draft_prob)

    def verified(self, verdict, pending: int, report_target_prob: bool) -> None:
        """Record the verifier's answer for this position (``verdict``: the client's ``VerdictResult``)."""
        self.sent, self.bytes, self.pending = True, verdict.uplink_bytes, pending
        self.accepted, self.returned, self.token = verdict.accepted, verdict.token, verdict.token
        self.wait_s, self.server_s, self.down_bytes = verdict.wait_seconds, verdict.server_seconds, verdict.downlink_bytes
        self.queue_s = verdict.queue_seconds
        self.target_prob = verdict.target_prob if report_target_prob else None


def _write(out: TextIO, row: dict) -> None:
    out.write(json.dumps(row) + "\n")


def write_open(out: TextIO, prompt_tokens: int, estimator: str, codec: dict | None, threshold: float | None,
               temperature: float, verifier: bool, uplink_bytes: int, downlink_bytes: int,
               mode: str | None = None, lookahead: int = 0, open_s: float = 0.0) -> None:
    """The first line of a generation: its configuration, the Open (or request) size, and ``open_s``, the time
    to connect and send Open (overlapped with the SLM's prefill)."""
    row = {"kind": "open", "prompt_tokens": prompt_tokens, "estimator": estimator, "codec": codec,
           "threshold": json_float(threshold), "temperature": temperature, "verifier": verifier,
           "uplink_bytes": uplink_bytes, "downlink_bytes": downlink_bytes, "lookahead": lookahead,
           "open_s": open_s}
    if mode is not None:
        row = {"kind": "open", "mode": mode, **{k: v for k, v in row.items() if k != "kind"}}
    _write(out, row)


def write_token(out: TextIO, record: TokenRecord) -> None:
    row = {"kind": "token", **asdict(record)}
    row["u"] = json_float(row["u"])
    _write(out, row)


def write_stream_token(out: TextIO, position: int, token: int, chunk_s: float, down_bytes: int) -> None:
    """A cloud-only token: when its chunk arrived and the chunk's wire bytes."""
    _write(out, {"kind": "token", "position": position, "token": token, "chunk_s": chunk_s, "down_bytes": down_bytes})


def write_close(out: TextIO, tokens: int, uplink_bytes: int, downlink_bytes: int, seconds: float, text: str,
                rolled_back: int = 0, stale_verifies: int = 0, stale_uplink_bytes: int = 0) -> None:
    """The last line of a generation: totals (all messages, Open and Close included), wall time, and what
    pipelining wasted: rolled-back drafts and stale Verifies with their uplink bytes."""
    _write(out, {"kind": "close", "tokens": tokens, "uplink_bytes": uplink_bytes, "downlink_bytes": downlink_bytes,
                 "seconds": seconds, "text": text, "rolled_back": rolled_back, "stale_verifies": stale_verifies,
                 "stale_uplink_bytes": stale_uplink_bytes})


def write_task(out: TextIO, correct: bool) -> None:
    """After a close line: whether the generation answered its task correctly."""
    _write(out, {"kind": "task", "correct": bool(correct)})
