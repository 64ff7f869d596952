"""Idle conversations' KV cells kept in host memory while other conversations decode.

In a shared (unified) KV pool every decode step's attention walks every used cell of the pool,
idle slots' cached conversations included: flash attention skips their rows but still reads
their mask entries, per head and per layer (measured with the default model: three cached
conversations of 170 tokens cost decoding 3.3 %, three of 400 tokens 6.4 %). llama-server's
answer, used here too, is `--cache-idle-slots`: when a new request starts, the idle slots' cells
are copied to host memory and dropped from the pool, and a later request that shares a longer
prefix with a saved conversation than with any slot gets those cells copied back instead of
decoding its prompt again. Copying a 400-token conversation of the default model (9 MB) takes
a few milliseconds; decoding it again takes more than a second on a small board.

This module is the pure bookkeeping: which saved conversation a prompt should come back from,
what a new one supersedes, what goes when the byte budget is full. The batcher does the
copying (LlamaContext.save_seq / load_seq).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

from mongarsd.inference.slots import MIN_SHARED_PREFIX, common_prefix_len


def _starts_with(tokens: Sequence[int], prefix: Sequence[int]) -> bool:
    return len(prefix) <= len(tokens) and common_prefix_len(tokens, prefix) == len(prefix)


@dataclass(slots=True, eq=False)  # identity: two saves of the same tokens are two entries
class SavedPrompt:
    """One conversation's cells in host memory: the tokens they hold and their bytes."""

    tokens: list[int]
    cache_key: str | None
    data: mmap.mmap  # an anonymous mapping: closing it gives the memory back
    last_used: int


class PromptCache:
    """Saved conversations under a byte budget, least recently used going first (inference thread)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(budget_bytes, 0)
        self.entries: list[SavedPrompt] = []
        self.bytes = 0
        self.saved_total = 0
        self.restored_total = 0
        self._clock = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def covers(self, tokens: Sequence[int]) -> bool:
        """Return True when a saved conversation already holds `tokens` (as itself or a prefix)."""
        for e in self.entries:
            if _starts_with(e.tokens, tokens):
                e.last_used = self._tick()
                return True
        return False

    def best(self, prompt: Sequence[int]) -> tuple[SavedPrompt | None, int]:
        """Return the saved conversation sharing the longest prefix with `prompt`, and that length."""
        best: SavedPrompt | None = None
        best_n = 0
        for e in self.entries:
            n = common_prefix_len(e.tokens, prompt)
            if n > best_n:
                best, best_n = e, n
        return best, best_n

    def worth_restoring(self, prompt: Sequence[int], slot_prefix: int) -> SavedPrompt | None:
        """Return the saved conversation to copy back for `prompt`, or None when the slot's own cells do as well."""
        entry, n = self.best(prompt)
        if entry is None or n < MIN_SHARED_PREFIX or n <= slot_prefix:
            return None
        return entry

    def add(self, tokens: list[int], cache_key: str | None, data: mmap.mmap, *, pinned: SavedPrompt | None = None) -> bool:
        """Keep `data` for `tokens`; False (and `data` closed) when it cannot fit the budget.

        Saved conversations that are a prefix of `tokens` are superseded and go; then the least
        recently used ones go until the new one fits. `pinned` (a conversation about to be copied
        back) never goes: when only dropping it would make room, the new one is refused.
        """
        size = len(data)
        room = self.budget_bytes - (len(pinned.data) if pinned is not None else 0)
        if size > room:
            data.close()
            return False
        for e in [e for e in self.entries if e is not pinned and _starts_with(tokens, e.tokens)]:
            self._drop(e)
        while self.bytes + size > self.budget_bytes:
            self._drop(min((e for e in self.entries if e is not pinned), key=lambda e: e.last_used))
        self.entries.append(SavedPrompt(list(tokens), cache_key, data, self._tick()))
        self.bytes += size
        self.saved_total += 1
        return True

    def used(self, entry: SavedPrompt) -> None:
        """Count a restore of `entry` and make it the most recently used."""
        entry.last_used = self._tick()
        self.restored_total += 1

    def clear(self) -> None:
        """Forget every saved conversation and give their memory back."""
        for e in list(self.entries):
            self._drop(e)

    def _drop(self, entry: SavedPrompt) -> None:
        self.entries.remove(entry)
        self.bytes -= len(entry.data)
        entry.data.close()
