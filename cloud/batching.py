"""Continuous batching: the forwards of every session that are ready together run as one forward.

Session handler threads submit a ``ForwardJob`` (the ids its cache must cover, how many last rows of
logits it needs) and wait; one model thread takes what is queued whenever the model frees up, oldest
first, up to ``max_batch_tokens`` new tokens, splits it by tail length where padding would cost more than
another forward (``plan_forwards``), and runs each part as one forward.

Why padding and not a paged cache: each session keeps its own cache (``cloud.kvstore.SessionKV``); a
batch copies the cached positions into one zero-padded tensor so that every row's cache ends at the same
column, and the new tokens (left-padded) all end at the last column. A 4-D additive attention mask hides
the padding, explicit position ids keep each row's own positions, the output layer runs only on the last
columns some row needs, and only the new positions are copied back. The copy is
what transformers' own ``DynamicCache`` already does every step (it concatenates the whole cache), it
needs no custom attention kernel, and it works for any full-attention transformers model on any device.
transformers' paged continuous-batching manager is built around its own generate loop and sampling;
verifying a block needs logits at chosen positions and our own (seed, position)-keyed decisions.

Padding changes no row's result beyond float rounding: padded keys get zero attention weight, and a row's
positions, cache and logits are its own. Rows of one batch never see each other.

A job may also ask for the hidden states of its fed positions at one layer (``layer``: prompt conditioning at
Open, ``cloud.conditioning``); they are taken from the same forward by hooks, for that job's row only.
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

from cloud.conditioning import capture_hidden_states
from cloud.kvstore import HFSessionKV, KVBudget, SessionKV
from core.batch_plan import plan_forwards

_PAD_ID = 0  # any valid id: padded inputs are masked out of every real row


@dataclass
class ForwardJob:
    kv: SessionKV | HFSessionKV
    ids: list[int]  # every id the cache must cover after the forward: the tail past kv.length is fed
    rows: int  # logits of the last ``rows`` fed positions are returned
    layer: int | None = None  # also keep hidden_states[layer] of every fed position (prompt conditioning)
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    hidden: np.ndarray | None = None  # [fed positions, hidden] float32, set by the forward when ``layer`` is set

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

    def __init__(self, model, id_space: int, device: str, kv_shape: tuple[int, int, int, torch.dtype] | None,
                 max_batch_tokens: int = 4096, batching: bool = True, budget: KVBudget | None = None):
        self.model, self.id_space, self.device = model, id_space, device
        self.kv_shape = kv_shape  # (layers, kv heads, head dim, dtype) of the batched layout; None: none
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
        return self._submit(ForwardJob(kv, ids, rows)).future.result()

    def hidden_states(self, kv, ids: list[int], layer: int) -> tuple[np.ndarray, float]:
        """(hidden_states[layer] [fed positions, hidden] float32 of the positions of ``ids`` past ``kv.length``,
        seconds queued): the same forward as ``logits`` (cached and batched alike), keeping one layer's states."""
        job = self._submit(ForwardJob(kv, ids, rows=1, layer=layer))
        _, queued = job.future.result()
        return job.hidden, queued

    def _submit(self, job: ForwardJob) -> ForwardJob:
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        return job

    # -- the model thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                taken = self._take()
            groups = ([[taken[i] for i in group] for group in plan_forwards([len(j.tail()) for j in taken],
                                                                             self.max_batch_tokens)]
                      if taken[0].kv.batched else [taken])
            for group in groups:
                self._run_group(group)

    def _run_group(self, group: list[ForwardJob]) -> None:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                results = self.forward_batch(group) if group[0].kv.batched else [self._forward_alone(group[0])]
        except BaseException as exc:  # noqa: BLE001 - every waiting session must hear of it
            for job in group:
                job.future.set_exception(exc)
            return
        self._count(group)
        for job, logits in zip(group, results):
            job.future.set_result((logits, started - job.submitted))

    def _take(self) -> list[ForwardJob]:
        """The oldest queued job, and after it every queued job while their new tokens fit the budget."""
        first = self._queue.popleft()
        taken, total = [first], len(first.tail())
        if not first.kv.batched or not self.max_batch_tokens:
            return taken
        for job in list(self._queue):
            n = len(job.tail())
            if job.kv.batched and total + n <= self.max_batch_tokens:
                taken.append(job)
                total += n
                self._queue.remove(job)
        return taken

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
        with capture_hidden_states(self.model, {job.layer} - {None}) as captured:
            out = self.model(input_ids=ids, past_key_values=job.kv.cache, use_cache=True, logits_to_keep=job.rows)
        if job.layer is not None:
            job.hidden = captured[job.layer][0].float().cpu().numpy()
        job.kv.last_used = time.monotonic()
        return out.logits[0, -job.rows :, : self.id_space].float().cpu().numpy()

    def forward_batch(self, batch: list[ForwardJob]) -> list[np.ndarray]:
        """One padded forward of ``batch`` (batched caches), on the calling thread; each job's logits rows.
        Called by the model thread; public so that a benchmark can time batches of a chosen shape.

        Every row's new tokens end at the last column (left padding), so the output layer runs only on the
        last ``max(rows)`` columns: a batch of Verifies with ragged tails costs one narrow output layer, not
        one per distinct tail end."""
        tails = [job.tail() for job in batch]
        past = [job.kv.length for job in batch]
        width, longest = max(past), max(len(t) for t in tails)
        rows = len(batch)
        ids = torch.full((rows, longest), _PAD_ID, dtype=torch.long)
        positions = torch.zeros((rows, longest), dtype=torch.long)
        for b, (tail, p) in enumerate(zip(tails, past)):
            ids[b, longest - len(tail):] = torch.tensor(tail)
            positions[b, longest - len(tail):] = torch.arange(p, p + len(tail))
        kv = self._batch_cache(batch, width, longest)
        with capture_hidden_states(self.model, {job.layer for job in batch} - {None}) as captured:
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=True,
                             attention_mask=self._mask(past, [len(t) for t in tails], width, longest, kv.dtype),
                             logits_to_keep=max(job.rows for job in batch),
                             past_key_values=Cache(layers=[_PaddedLayer(kv[i, 0], kv[i, 1], width)
                                                           for i in range(len(kv))]))
        logits = out.logits[..., : self.id_space].float().cpu().numpy()  # [rows, max(job.rows), N]
        for b, (job, tail) in enumerate(zip(batch, tails)):
            job.kv.append(kv[:, :, b, :, width + longest - len(tail) : width + longest])
            if job.layer is not None:  # the row's own fed columns (left padding: the last len(tail))
                job.hidden = captured[job.layer][b, longest - len(tail) :].float().cpu().numpy()
        return [logits[b, logits.shape[1] - job.rows :] for b, job in enumerate(batch)]

    def _mask(self, past: list[int], new: list[int], width: int, longest: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask [rows, 1, longest, width + longest]: a row's query sees its own cached keys
        (which end at ``width``) and its own new keys up to itself (which end at the last column). A padding
        query sees only itself, so no row of the softmax is empty (an empty one would be NaN)."""
        key = torch.arange(width + longest).view(1, 1, -1)
        query = torch.arange(longest).view(1, -1, 1) + width  # a query's own key column
        first_past = torch.tensor([width - p for p in past]).view(-1, 1, 1)
        first_new = torch.tensor([width + longest - n for n in new]).view(-1, 1, 1)
        seen = ((key >= first_past) & (key < width)) | ((key >= first_new) & (key <= query)) | (key == query)
        zero, hidden = torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
        return torch.where(seen, zero, hidden).unsqueeze(1).to(self.device)

    def _batch_cache(self, batch: list[ForwardJob], width: int, longest: int) -> torch.Tensor:
        """``[layers, 2, rows, kv_heads, width + longest, head_dim]``: each row's cached positions end at ``width``."""
        layers, heads, dim, dtype = self.kv_shape
        kv = torch.zeros((layers, 2, len(batch), heads, width + longest, dim), dtype=dtype, device=self.device)
        for b, job in enumerate(batch):
            if job.kv.length:
                kv[:, :, b, :, width - job.kv.length : width] = job.kv.past()
        return kv
