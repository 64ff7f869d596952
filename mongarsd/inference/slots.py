"""Pure slot decisions of the engine: prefix sharing, slot choice, retry estimate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_RETRY_AFTER_S = 1.0
MAX_RETRY_AFTER_S = 30.0  # a client told to wait longer gives up; the estimate is capped here
SLOT_SIMILARITY_MIN = 0.1  # llama-server's --slot-prompt-similarity default
# A shorter shared prefix (a chat template's header, "<|im_start|>system\nYou are a") saves too
# little prefill to take a slot that holds another conversation, or to copy one back.
MIN_SHARED_PREFIX = 16


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Return the length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n and a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on slices: C-speed compares instead of a Python loop
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class SlotCandidate:
    """What slot selection needs to know about one idle slot."""

    index: int
    cache_key: str | None
    n_cached: int
    prefix_len: int  # tokens shared with the new prompt
    last_used: int  # monotonic use counter; 0 = never used


def choose_slot(idle: Sequence[SlotCandidate], cache_key: str | None, prompt_len: int) -> int | None:
    """Pick the idle slot for a new request, like llama-server's slot selection.

    1. the slot last used by the same conversation (`cache_key`);
    2. else the slot sharing the longest prefix, if it covers at least
       SLOT_SIMILARITY_MIN of the prompt and MIN_SHARED_PREFIX tokens;
    3. else an empty slot, else the least recently used one, keeping conversation
       (cache_key) caches over anonymous ones.
    """
    if not idle:
        return None
    if cache_key is not None:
        same = [c for c in idle if c.cache_key == cache_key]
        if same:
            return max(same, key=lambda c: (c.prefix_len, c.last_used)).index
    best = max(idle, key=lambda c: (c.prefix_len, -c.last_used))
    if best.prefix_len >= max(MIN_SHARED_PREFIX, SLOT_SIMILARITY_MIN * prompt_len):
        return best.index
    # overwrite anonymous caches before a conversation's, each least recently used first
    return min(idle, key=lambda c: (c.n_cached > 0, c.cache_key is not None, c.last_used, c.index)).index


def cells_to_free(need: int, free: int, others: Sequence[SlotCandidate]) -> list[int] | None:
    """Return the idle slots whose cached prefixes must go so `need` cells fit a shared pool.

    `free` counts the pool's cells not reserved by running requests nor cached by `others` (the
    idle slots other than the one chosen). Anonymous caches go before conversations', each
    least recently used first, and only as many as needed: [] when it fits already, None when
    even an empty pool of idle caches is too small (the request waits for a running one).
    """
    if need <= free:
        return []
    out: list[int] = []
    for c in sorted(others, key=lambda c: (c.cache_key is not None, c.last_used, c.index)):
        if c.n_cached <= 0:
            continue
        out.append(c.index)
        free += c.n_cached
        if need <= free:
            return out
    return None


def retry_after_s(queued: int, slots: int, avg_request_s: float) -> float:
    """Estimate when a refused request could be admitted."""
    rounds = queued // max(slots, 1) + 1
    est = rounds * avg_request_s if avg_request_s > 0 else MIN_RETRY_AFTER_S
    return float(min(max(est, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S))
