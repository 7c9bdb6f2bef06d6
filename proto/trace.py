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
- ``coarse`` (``"mode": "coarse"``, ``"collab"``: the span or step mode): the span/step loop
  (``edge/coarse.py``, stop-and-wait). Its lines come in the order things happened: a ``token`` line per
  SLM draft (``COARSE_TOKEN_FIELDS``: ``rolled_back`` when the draft did not end up in the text, ``sent``
  when it went up in the next message, ``step_index`` the drafted step it belongs to, null in span modes),
  and one line per round trip, of kind ``span`` (a bare span request: the LLM continues with its own
  tokens), ``step`` (a judged step: ``step_tokens`` ids, ``accepted`` or regenerated as ``span_tokens``
  LLM tokens) or ``block`` (``block_tokens`` drafted positions with their p~, ``accepted_count`` of them
  accepted, the LLM's token at the first rejection): ``RoundTripRecord``, fields ``ROUND_TRIP_FIELDS``
  plus ``STEP_FIELDS`` / ``BLOCK_FIELDS``. The text is the kept drafts and the LLM's tokens in that order.

The row definitions and writers live here; ``simulate/trace.py`` reads and validates against the field
lists below, so a field cannot be renamed on one side only. Bytes are gRPC-level wire sizes (serialized
protobuf + the 5-byte length prefix). Infinite thresholds and uncertainties are written as strings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import TextIO

ROUND_TRIP_KINDS = ("span", "step", "block")  # coarse generations: one line per Verify/Verdict round trip
KINDS = ("open", "token", "close", "task", *ROUND_TRIP_KINDS)
MODES = ("hybrid", "local", "stream", "coarse")
OPEN_FIELDS = ("prompt_tokens", "uplink_bytes", "downlink_bytes")  # every open line (mode-specific extras too)
TOKEN_FIELDS = ("position", "token", "sent", "bytes", "slm_step_s")  # hybrid/local token lines
SENT_TOKEN_FIELDS = ("pending", "down_bytes", "server_s", "wait_s", "accepted", "returned")  # when sent
STREAM_TOKEN_FIELDS = ("position", "token", "chunk_s", "down_bytes")
CLOSE_FIELDS = ("tokens", "uplink_bytes", "downlink_bytes", "seconds")
COARSE_TOKEN_FIELDS = (*TOKEN_FIELDS, "rolled_back", "step_index")  # a coarse generation's SLM drafts
ROUND_TRIP_FIELDS = ("position", "pending", "bytes", "down_bytes", "server_s", "queue_s", "wait_s", "encode_s",
                     "prefill_s", "span_tokens")  # every span/step/block line
STEP_FIELDS = ("step_tokens", "accepted")  # a step line also
BLOCK_FIELDS = ("block_tokens", "accepted_count", "accepted")  # a block line also
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


@dataclass
class RoundTripRecord:
    """One Verify -> Verdict round trip of the span/step loop (``edge/coarse.py``), as written to a ``span``,
    ``step`` or ``block`` line. The verifier's work follows from it (the simulator's rule): a block or a
    judged step is one forward over the uncached ids, the pending ones and the drafts; every span token one
    forward more."""

    kind: str  # "span" | "step" | "block"
    position: int  # absolute position of the first position the message decides (right after its pending ids)
    pending: int  # ids kept locally since the previous message, carried up by this one
    bytes: int  # uplink wire bytes of the Verify
    down_bytes: int  # downlink wire bytes of its Verdict
    server_s: float  # the verifier's own time for it (every forward it took, span tokens included)
    queue_s: float  # the part of server_s spent waiting for the model before its first forward
    wait_s: float  # from sending the Verify to receiving the Verdict
    encode_s: float  # building the message (a block's p~ encoded) and submitting it
    prefill_s: float  # the SLM's forward over what the verdict settled (LLM tokens, or the last kept draft), 0 if none
    span_tokens: int  # LLM tokens the Verdict carried (span_ids: a requested span, or a judged step regenerated)
    step_tokens: int = 0  # step: the drafted ids judged
    block_tokens: int = 0  # block: the drafted positions sent with their p~
    accepted: bool | None = None  # step: kept whole; block: every position accepted; span: None
    accepted_count: int = 0  # block: the longest accepted prefix
    step_index: int | None = None  # the drafted step it decides (step modes)

    @property
    def sent_positions(self) -> int:
        """Positions sent for checking (the transmission rate's numerator): a span request counts its trigger."""
        return {"span": 1, "step": self.step_tokens, "block": self.block_tokens}[self.kind]

    @property
    def llm_tokens(self) -> int:
        """Tokens of the text the LLM chose: the span's, and a block's resampled token at its rejection."""
        return self.span_tokens + int(self.kind == "block" and not self.accepted)


def _write(out: TextIO, row: dict) -> None:
    out.write(json.dumps(row) + "\n")


def write_open(out: TextIO, prompt_tokens: int, estimator: str, codec: dict | None, threshold: float | None,
               temperature: float, verifier: bool, uplink_bytes: int, downlink_bytes: int,
               mode: str | None = None, lookahead: int = 0, open_s: float = 0.0, collab: str | None = None,
               conditioning_layer: int | None = None, open_wait_s: float = 0.0) -> None:
    """The first line of a generation: its configuration, the Open (or request) size, and ``open_s``, the time
    to connect and send Open (overlapped with the SLM's prefill); ``collab``: a coarse generation's span or
    step mode. A prompt-conditioned SLM with a verifier (``conditioning_layer``: the LLM layer it asked for) waits
    for Opened before its prefill: ``open_wait_s`` is that wait (from the start of the Open), and the line's
    ``downlink_bytes`` already hold the Opened with the prompt's states."""
    row = {"kind": "open", "prompt_tokens": prompt_tokens, "estimator": estimator, "codec": codec,
           "threshold": json_float(threshold), "temperature": temperature, "verifier": verifier,
           "uplink_bytes": uplink_bytes, "downlink_bytes": downlink_bytes, "lookahead": lookahead,
           "open_s": open_s}
    if collab is not None:
        row["collab"] = collab
    if conditioning_layer is not None:  # only then: every other generation's line is what it was
        row["conditioning_layer"] = conditioning_layer
        row["open_wait_s"] = open_wait_s
    if mode is not None:
        row = {"kind": "open", "mode": mode, **{k: v for k, v in row.items() if k != "kind"}}
    _write(out, row)


def write_token(out: TextIO, record: TokenRecord) -> None:
    row = {"kind": "token", **asdict(record)}
    row["u"] = json_float(row["u"])
    _write(out, row)


def write_coarse_token(out: TextIO, record: TokenRecord, step_index: int | None) -> None:
    """A coarse generation's SLM draft (``rolled_back``: not in the text; ``sent``: went up in the next message)."""
    row = {"kind": "token", **asdict(record), "step_index": step_index}
    row["u"] = json_float(row["u"])
    _write(out, row)


def write_round_trip(out: TextIO, record: RoundTripRecord) -> None:
    """A coarse generation's round trip: a ``span``, ``step`` or ``block`` line."""
    if record.kind not in ROUND_TRIP_KINDS:
        raise ValueError(f"round trip kind must be one of {ROUND_TRIP_KINDS}, got {record.kind!r}")
    _write(out, asdict(record))


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
