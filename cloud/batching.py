"""Continuous batching: the forwards of every session that are ready together run as one forward.

Session handler threads submit a ``ForwardJob`` (the ids its cache must cover, how many last rows of
logits it needs) and wait; one model thread takes what is queued whenever the model frees up, oldest
first, up to ``max_batch_tokens`` padded tokens (rows x longest new tail), and runs them together.

Why padding and not a paged cache: each session keeps its own cache (``cloud.kvstore.SessionKV``); a
batch copies the cached positions into one zero-padded tensor, left-aligned to end where the new tokens
start, and the new tokens (right-padded) follow. A 2-D attention mask hides the padding, explicit
position ids keep each row's own positions, and only the new positions are copied back. The copy is
what transformers' own ``DynamicCache`` already does every step (it concatenates the whole cache), it
needs no custom attention kernel, and it works for any full-attention transformers model on any device.
transformers' paged continuous-batching manager is built around its own generate loop and sampling;
verifying a block needs logits at chosen positions and our own (seed, position)-keyed decisions.

Padding changes no row's result beyond float rounding: padded keys get zero attention weight, and a row's
positions, cache and logits are its own. Rows of one batch never see each other.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from cloud.kvstore import HFSessionKV, KVBudget, SessionKV

_PAD_ID = 0  # any valid id: padded inputs are masked out of every real row


@dataclass
class ForwardJob:
    kv: SessionKV | HFSessionKV
    ids: list[int]  # every id the cache must cover after the forward: the tail past kv.length is fed
    rows: int  # logits of the last ``rows`` fed positions are returned
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)

    def tail(self) -> list[int]:
        return self.ids[self.kv.length :]


class _PaddedLayer(DynamicLayer):
    """One layer's keys and values of a batch: the cached positions are already in place (``past`` of them,
    padded), the forward writes the new ones after them, without reallocating."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: int):
        super().__init__()
        self.keys, self.values, self.past = keys, values, past
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states, value_states, cache_kwargs=None):
        end = self.past + key_states.shape[-2]
        self.keys[:, :, self.past : end] = key_states
        self.values[:, :, self.past : end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.past


@dataclass(frozen=True)
class BatchStats:
    forwards: int
    rows: int
    max_rows: int
    kv_drops: int


class BatchingWorker:
    """The one model thread. ``batching=False`` runs every job alone (the one-at-a-time engine, kept to
    measure against); models without a batched cache layout always run alone."""

    def __init__(self, model, id_space: int, device: str, max_batch_tokens: int = 4096, batching: bool = True,
                 budget: KVBudget | None = None):
        self.model, self.id_space, self.device = model, id_space, device
        self.max_batch_tokens = max_batch_tokens if batching else 0
        self.budget = budget or KVBudget()
        self._queue: deque[ForwardJob] = deque()
        self._wake = threading.Condition()
        self._forwards = self._rows = self._max_rows = 0
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def stats(self) -> BatchStats:
        return BatchStats(self._forwards, self._rows, self._max_rows, self.budget.drops)

    def logits(self, kv, ids: list[int], rows: int) -> tuple[np.ndarray, float]:
        """(logits [rows, N] of the last ``rows`` positions of ``ids``, seconds queued before the forward)."""
        job = ForwardJob(kv, ids, rows)
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        return job.future.result()

    # -- the model thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                batch = self._take()
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    results = self.forward_batch(batch) if batch[0].kv.batched else [self._forward_alone(batch[0])]
            except BaseException as exc:  # noqa: BLE001 - every waiting session must hear of it
                for job in batch:
                    job.future.set_exception(exc)
                continue
            self._count(batch)
            for job, logits in zip(batch, results):
                job.future.set_result((logits, started - job.submitted))

    def _take(self) -> list[ForwardJob]:
        """The oldest queued job, and after it every queued job that fits the padded-token budget with it."""
        first = self._queue.popleft()
        batch, longest = [first], len(first.tail())
        if not first.kv.batched or not self.max_batch_tokens:
            return batch
        for job in list(self._queue):
            if not job.kv.batched:
                continue
            n = max(longest, len(job.tail()))
            if (len(batch) + 1) * n <= self.max_batch_tokens:
                batch.append(job)
                longest = n
                self._queue.remove(job)
        return batch

    def _count(self, batch: list[ForwardJob]) -> None:
        """Count the forward, then hold the caches to the budget: those of queued jobs and of the batch just
        run stay (the batch's sessions are about to be used again)."""
        self._forwards += 1
        self._rows += len(batch)
        self._max_rows = max(self._max_rows, len(batch))
        with self._wake, self.budget.lock:
            busy = {id(job.kv) for job in (*self._queue, *batch)}
            self.budget.enforce(busy)

    def _forward_alone(self, job: ForwardJob) -> np.ndarray:
        ids = torch.tensor([job.tail()], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=job.kv.cache, use_cache=True, logits_to_keep=job.rows)
        job.kv.last_used = time.monotonic()
        return out.logits[0, -job.rows :, : self.id_space].float().cpu().numpy()

    def forward_batch(self, batch: list[ForwardJob]) -> list[np.ndarray]:
        """One padded forward of ``batch`` (batched caches), on the calling thread; each job's logits rows.
        Called by the model thread; public so that a benchmark can time batches of a chosen shape."""
        tails = [job.tail() for job in batch]
        past = [job.kv.length for job in batch]
        width, longest = max(past), max(len(t) for t in tails)
        rows = len(batch)
        ids = torch.full((rows, longest), _PAD_ID, dtype=torch.long)
        positions = torch.zeros((rows, longest), dtype=torch.long)
        mask = torch.zeros((rows, width + longest), dtype=torch.long)
        for b, (tail, p) in enumerate(zip(tails, past)):
            ids[b, : len(tail)] = torch.tensor(tail)
            positions[b] = torch.arange(p, p + longest)
            mask[b, width - p : width + len(tail)] = 1
        kv = self._batch_cache(batch, width, longest)
        # Logits only at the rows some job needs: a prefill's other positions never reach the output layer.
        keep = sorted({i for t, job in zip(tails, batch) for i in range(len(t) - job.rows, len(t))})
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, logits_to_keep=torch.tensor(keep),
                         past_key_values=Cache(layers=[_PaddedLayer(kv[i, 0], kv[i, 1], width) for i in range(len(kv))]))
        logits = out.logits[..., : self.id_space].float().cpu().numpy()  # [rows, len(keep), N]
        where = {i: k for k, i in enumerate(keep)}
        for b, (job, tail) in enumerate(zip(batch, tails)):
            job.kv.append(kv[:, :, b, :, width : width + len(tail)])
        return [logits[b, [where[i] for i in range(len(t) - job.rows, len(t))]] for b, (job, t) in
                enumerate(zip(batch, tails))]

    def _batch_cache(self, batch: list[ForwardJob], width: int, longest: int) -> torch.Tensor:
        """``[layers, 2, rows, kv_heads, width + longest, head_dim]``: each row's cached positions end at ``width``."""
        layers, heads, dim, dtype = self.kv_shape
        kv = torch.zeros((layers, 2, len(batch), heads, width + longest, dim), dtype=dtype, device=self.device)
        for b, job in enumerate(batch):
            if job.kv.length:
                kv[:, :, b, :, width - job.kv.length : width] = job.kv.past()
        return kv

    kv_shape: tuple[int, int, int, torch.dtype]  # set by the engine from a probe forward
