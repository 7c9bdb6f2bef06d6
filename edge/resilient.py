"""A verifier session that survives lost connections, dead replicas and evictions, losing no text.

The edge holds the authoritative token history (prompt + every agreed token). When a call fails with a
transient status (the replica died, the stream broke, the verifier evicted the session or is draining),
``ResilientSession`` reconnects with exponential backoff and full jitter, trying the configured verifier
addresses in turn, reopens a session whose prompt is the whole agreed history (the replay) in the epoch the
edge had reached, and resends every Verify still unresolved (with pipelining there may be several). The verifier's randomness at a position depends only on (seed, position), so with
the same seeds the final text equals an uninterrupted run's.

When no verifier answers for ``loss_after_s``, the ``on_cloud_loss`` policy decides:
``fail`` raises ``CloudLost``; ``wait`` keeps trying (with backoff, without limit); ``local`` stops
verifying: ``verify`` returns None from then on, and the caller keeps its drafts, marking them unverified.
Refusals that a retry cannot fix (bad input, wrong fingerprint, bad credentials) are raised at once.

Prompt conditioning (``conditioning_layer``): the Open asks for the LLM's prompt states until they have been
received once (a session that fails before its Opened arrives is reopened asking again); the edge prefills its
prompt once, with those, so a later replay does not ask again: its Open, whose prompt is the whole history,
would make the verifier send states no one uses (and for a long history, more than a message may hold).
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass

import grpc
import numpy as np

from edge.client import PLAINTEXT, VerdictResult, VerifierError, VerifierSession, connect
from core.sampling import SamplingSettings
from edge.transport import Transport
from proto.distribution import CodecSpec

CLOUD_LOSS_POLICIES = ("fail", "wait", "local")
# A retry (on this replica or another) can fix these; everything else is the client's to fix.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.INTERNAL, None}  # None: no status at all (timeout, stream gone)


class CloudLost(VerifierError):
    """No verifier reachable within the configured time (policy ``fail``)."""


@dataclass(frozen=True)
class Failover:
    addresses: tuple[str, ...]
    on_cloud_loss: str = "fail"
    loss_after_s: float = 10.0  # no verifier for this long = the cloud is lost
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    connect_timeout_s: float = 2.0  # per attempt

    def __post_init__(self):
        if not self.addresses:
            raise ValueError("give at least one verifier address")
        if self.on_cloud_loss not in CLOUD_LOSS_POLICIES:
            raise ValueError(f"on_cloud_loss must be one of {', '.join(CLOUD_LOSS_POLICIES)}, got {self.on_cloud_loss!r}")
        if not (0 < self.backoff_initial_s <= self.backoff_max_s and self.loss_after_s > 0
                and self.connect_timeout_s > 0):
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s, loss_after_s > 0, connect_timeout_s > 0")


def is_retryable(exc: VerifierError) -> bool:
    return exc.code in RETRYABLE


class ResilientSession:
    """Same interface as ``VerifierSession`` (``verify``, ``close``, byte counters), plus failover."""

    def __init__(self, failover: Failover, fingerprint: dict, prompt_ids: list[int], settings: SamplingSettings,
                 codec: CodecSpec, seed: int | None = None, report_target_prob: bool = False,
                 timeout: float = 30.0, transport: Transport = PLAINTEXT, conditioning_layer: int | None = None,
                 span_stop_ids: list[int] | tuple[int, ...] = (), span_stop_chars: str = ""):
        self.failover, self.transport = failover, transport
        self._open_args = dict(fingerprint=fingerprint, settings=settings, codec=codec, seed=seed,
                               report_target_prob=report_target_prob, timeout=timeout,
                               span_stop_ids=tuple(span_stop_ids), span_stop_chars=span_stop_chars)
        self.report_target_prob = report_target_prob
        self.history = list(prompt_ids)  # prompt + every agreed token: what a reopened session replays
        self.epoch = 0  # the verifier's epoch as of the last Verdict taken: a reopened session starts there
        self._unresolved: deque = deque()  # (pending, position, epoch, block) of each Verify not yet answered
        self.reconnects = 0  # sessions reopened after a failure
        self.lost = False  # policy local, no verifier: nothing is verified from here on
        self.errors: list[str] = []  # what went wrong, in order, for the user's records
        self._session: VerifierSession | None = None
        self._channel: grpc.Channel | None = None
        self._index = 0  # which address is in use
        self._rng = random.Random()  # jitter only: never touches the generation's random streams
        self._bytes_done = [0, 0]  # up, down of sessions already ended
        self._trouble_since: float | None = None
        self.conditioning_layer = conditioning_layer
        self._conditioning: np.ndarray | None = None  # the prompt states, once received
        self._connect(first=True)

    # -- the VerifierSession interface ----------------------------------------------------------------
    @property
    def uplink_bytes(self) -> int:
        return self._bytes_done[0] + (self._session.uplink_bytes if self._session else 0)

    @property
    def downlink_bytes(self) -> int:
        return self._bytes_done[1] + (self._session.downlink_bytes if self._session else 0)

    @property
    def in_flight(self) -> int:
        """Verifies submitted whose Verdict has not been taken yet (resent after a failover)."""
        return len(self._unresolved)

    def submit(self, pending: list[int], position: int, epoch: int, block: list[tuple[int, bytes]]) -> int:
        """Send a Verify (``VerifierSession.submit``); kept until its Verdict is taken, so that a reopened
        session can resend it. Returns its wire bytes (0 once the cloud is lost)."""
        self._unresolved.append((list(pending), position, epoch, list(block)))
        if self.lost or (self._session is None and not self._connect(first=False)):
            return 0
        try:
            return self._session.submit(pending, position, epoch, block)
        except VerifierError as exc:
            self._fail(exc)  # the next next_verdict reconnects and resends everything unresolved
            return 0

    def next_verdict(self, wait: bool = True) -> VerdictResult | None:
        """The oldest unresolved Verify's Verdict, after as many reconnects as needed (each resends every
        unresolved Verify); None when ``wait`` is False and it has not arrived, or once the cloud is lost
        (policy local: ``lost`` is then True)."""
        while not self.lost:
            if self._session is None and not self._connect(first=False):
                return None
            try:
                verdict = self._session.next_verdict(wait)
            except VerifierError as exc:
                self._fail(exc)
                continue
            if verdict is None:
                return None
            self._trouble_since = None
            pending, _, _, block = self._unresolved.popleft()
            if not verdict.stale:
                drafts = [token for token, _ in block]
                self.history += [*pending, *drafts[:verdict.accepted_count]] + ([] if verdict.accepted else
                                                                               [verdict.token])
                self.epoch = verdict.epoch
            return verdict
        return None

    def conditioning(self) -> np.ndarray | None:
        """The LLM's prompt states (``VerifierSession.conditioning``), reopening as often as needed to get them;
        None once the cloud is lost (policy local: the SLM goes on without them)."""
        while self._conditioning is None and not self.lost:
            if self._session is None and not self._connect(first=False):
                return None
            try:
                self._conditioning = self._session.conditioning()
            except VerifierError as exc:
                self._fail(exc)
        return self._conditioning

    def verify(self, pending: list[int], draft: int, distribution: bytes) -> VerdictResult | None:
        """Stop-and-wait shorthand: one drafted position after ``pending`` at the agreed position and epoch."""
        self.submit(pending, len(self.history), self.epoch, [(draft, distribution)])
        return self.next_verdict()

    def _fail(self, exc: VerifierError) -> None:
        """A failed call: raise what no retry can fix, else drop the session (and declare the cloud lost when
        replicas keep opening sessions but failing them for too long)."""
        if not is_retryable(exc):
            raise exc
        self._drop(exc)
        waited = time.monotonic() - self._trouble_since
        if self.failover.on_cloud_loss != "wait" and waited >= self.failover.loss_after_s:
            self._declare_lost(waited)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        if self._channel is not None:
            self._channel.close()

    # -- failover ------------------------------------------------------------------------------------
    def _drop(self, exc: VerifierError) -> None:
        """Forget the broken session (keeping its byte counts) and move on to the next address."""
        self.errors.append(f"{self.failover.addresses[self._index]}: {exc}")
        if self._session is not None:
            self._bytes_done[0] += self._session.uplink_bytes
            self._bytes_done[1] += self._session.downlink_bytes
        if self._channel is not None:
            self._channel.close()
        self._session = self._channel = None
        self._index = (self._index + 1) % len(self.failover.addresses)
        if self._trouble_since is None:
            self._trouble_since = time.monotonic()

    def _try_open(self, address: str) -> None:
        """Open a session replaying the history, and resend every unresolved Verify in order (those of an
        ended epoch are answered stale, as they would have been)."""
        channel = connect(address, timeout=self.failover.connect_timeout_s, transport=self.transport)
        layer = self.conditioning_layer if self._conditioning is None else None  # received once: kept
        try:
            session = VerifierSession(channel, prompt_ids=list(self.history), epoch=self.epoch,
                                      conditioning_layer=layer, **self._open_args)
            for pending, position, epoch, block in self._unresolved:
                session.submit(pending, position, epoch, block)
        except VerifierError:
            channel.close()
            raise
        self._session, self._channel = session, channel

    def _connect(self, first: bool) -> bool:
        """Open a session on some replica, replaying the history; False when the cloud is declared lost
        (policy local). Backs off between rounds over all addresses; bounded unless the policy is wait."""
        f = self.failover
        if self._trouble_since is None:
            self._trouble_since = time.monotonic()
        delay = f.backoff_initial_s
        while True:
            for _ in f.addresses:
                try:
                    self._try_open(f.addresses[self._index])
                except VerifierError as exc:
                    if not is_retryable(exc):
                        raise
                    self.errors.append(f"{f.addresses[self._index]}: {exc}")
                    self._index = (self._index + 1) % len(f.addresses)
                    continue
                self.reconnects += not first
                return True
            waited = time.monotonic() - self._trouble_since
            if f.on_cloud_loss != "wait" and waited >= f.loss_after_s:
                return self._declare_lost(waited)
            time.sleep(self._rng.uniform(0, delay))  # full jitter: replicas are not hit in lockstep
            delay = min(2 * delay, f.backoff_max_s)

    def _declare_lost(self, waited: float) -> bool:
        message = (f"no verifier reachable at {', '.join(self.failover.addresses)} for {waited:.1f} s "
                   f"(last error: {self.errors[-1] if self.errors else 'none'})")
        if self.failover.on_cloud_loss == "fail":
            raise CloudLost(message)
        self.errors.append(message)
        self.lost = True
        return False
