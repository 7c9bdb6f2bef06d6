"""Per-session KV caches kept outside any batch, and the memory budget over all of them.

A session's keys and values live in one tensor ``[layers, 2, kv_heads, capacity, head_dim]`` that grows by
doubling, so a decode step appends in place instead of concatenating the whole cache (what a
``DynamicCache`` does every step). The batched forward copies each session's cached positions into one
padded batch tensor and copies back only the new positions (``cloud.batching``).

Everything here is a cache: the verifier keeps every session's agreed token ids, so a dropped cache is
rebuilt by prefill at the session's next forward, and the edge never notices. ``KVBudget`` drops the
least recently used idle caches when the caches together exceed ``--kv-budget-mb``.

Models whose caches are not a plain stack of full-attention layers (sliding windows, e.g. Gemma-2) keep
transformers' own ``DynamicCache`` (``HFSessionKV``) and are forwarded one session at a time.
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import DynamicCache

_MIN_CAPACITY = 64  # positions allocated at a session's first forward (grown by doubling after that)


class SessionKV:
    """One session's cache in the batched layout: ``length`` positions of the agreed ids are cached."""

    batched = True

    def __init__(self):
        self.storage: torch.Tensor | None = None  # [layers, 2, kv_heads, capacity, head_dim]
        self.length = 0
        self.last_used = time.monotonic()

    @property
    def nbytes(self) -> int:
        return 0 if self.storage is None else self.storage.numel() * self.storage.element_size()

    def past(self) -> torch.Tensor:
        """The cached positions, ``[layers, 2, kv_heads, length, head_dim]`` (a view)."""
        return self.storage[..., : self.length, :]

    def append(self, new: torch.Tensor) -> None:
        """Cache ``new`` ([layers, 2, kv_heads, n, head_dim]) after the cached positions."""
        n = new.shape[-2]
        needed = self.length + n
        if self.storage is None or self.storage.shape[-2] < needed:
            capacity = max(_MIN_CAPACITY, needed, 2 * (0 if self.storage is None else self.storage.shape[-2]))
            grown = new.new_zeros((*new.shape[:-2], capacity, new.shape[-1]))
            if self.length:
                grown[..., : self.length, :] = self.past()
            self.storage = grown
        self.storage[..., self.length : needed, :] = new
        self.length = needed
        self.last_used = time.monotonic()

    def crop(self, length: int) -> None:
        """Forget positions from ``length`` on (drafts past a rejection); the memory stays allocated."""
        self.length = min(self.length, length)

    def drop(self) -> None:
        """Free the cache; the next forward rebuilds it by prefill from the agreed ids."""
        self.storage, self.length = None, 0


class HFSessionKV:
    """A transformers ``DynamicCache`` behind the same interface, for models the batched layout does not cover
    (sliding-window layers): forwarded one session at a time, like a plain transformers generation loop."""

    batched = False

    def __init__(self, config):
        self._config = config
        self.cache = DynamicCache(config=config)
        self.last_used = time.monotonic()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers
                   for t in (layer.keys, layer.values) if t is not None)

    def crop(self, length: int) -> None:
        """A sliding-window layer that has already dropped its oldest positions cannot be cropped: the cache is
        then dropped and rebuilt by prefill at the next forward."""
        if self.length <= length:
            return
        try:
            self.cache.crop(length)
        except ValueError:
            self.drop()

    def drop(self) -> None:
        self.cache = DynamicCache(config=self._config)


class KVBudget:
    """Every live session cache, and the least-recently-used drop that keeps them under a byte budget.

    ``lock`` serializes every change to a registered cache: the model worker's writes and drops, and a
    session's crop after its verdict."""

    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes  # 0 = no budget
        self.lock = threading.Lock()
        self._caches: dict[int, SessionKV | HFSessionKV] = {}
        self.drops = 0  # caches dropped to stay within the budget (each is rebuilt by prefill when used again)

    def register(self, kv) -> None:
        with self.lock:
            self._caches[id(kv)] = kv

    def unregister(self, kv) -> None:
        with self.lock:
            self._caches.pop(id(kv), None)
            kv.drop()

    @property
    def total_bytes(self) -> int:
        with self.lock:
            return sum(kv.nbytes for kv in self._caches.values())

    def enforce(self, busy: set[int]) -> None:
        """Drop idle caches, least recently used first, until the total fits the budget. ``busy``: ids of the
        caches a queued or running forward is about to use (never dropped). Call with ``lock`` held."""
        if not self.budget_bytes:
            return
        total = sum(kv.nbytes for kv in self._caches.values())
        idle = sorted((kv for key, kv in self._caches.items() if key not in busy and kv.nbytes),
                      key=lambda kv: kv.last_used)
        for kv in idle:
            if total <= self.budget_bytes:
                return
            total -= kv.nbytes
            kv.drop()
            self.drops += 1
