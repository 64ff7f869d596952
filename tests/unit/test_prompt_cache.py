"""The prompt cache's pure bookkeeping: lookup, supersession, the byte budget."""

from __future__ import annotations

import mmap

import pytest

from mongarsd.inference.prompt_cache import PromptCache
from mongarsd.inference.slots import MIN_SHARED_PREFIX


def data(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)


def test_the_longest_shared_prefix_is_restored_and_only_when_it_beats_the_slot() -> None:
    cache = PromptCache(1 << 20)
    a = list(range(100))
    b = list(range(50)) + [999] * 50
    assert cache.add(a, "a", data(1000)) and cache.add(b, None, data(1000))
    prompt = [*range(80), 7, 7]
    entry, n = cache.best(prompt)
    assert entry is not None and entry.tokens == a and n == 80
    assert cache.worth_restoring(prompt, slot_prefix=10) is entry
    assert cache.worth_restoring(prompt, slot_prefix=80) is None  # the slot holds as much already
    short = [*range(MIN_SHARED_PREFIX - 1), 5000]
    assert cache.worth_restoring(short, slot_prefix=0) is None  # decoding it again is cheaper
    assert cache.worth_restoring([5000, 1, 2], slot_prefix=0) is None
    cache.used(entry)
    assert cache.restored_total == 1


def test_a_longer_save_supersedes_its_prefixes_and_a_covered_one_is_not_saved_again() -> None:
    cache = PromptCache(1 << 20)
    first = data(1000)
    assert cache.add(list(range(40)), "c", first)
    assert cache.add(list(range(60)), "c", data(1500))  # the conversation went on
    assert first.closed  # its memory went back
    assert [len(e.tokens) for e in cache.entries] == [60]
    assert cache.bytes == 1500
    assert cache.covers(list(range(60))) and cache.covers(list(range(30)))
    assert not cache.covers(list(range(61)))
    assert not cache.covers([1, 2, 3])
    assert cache.saved_total == 2


def test_the_budget_drops_least_recently_used_first_and_refuses_what_never_fits() -> None:
    cache = PromptCache(3000)
    olds = [data(1000) for _ in range(3)]
    for i, d in enumerate(olds):
        assert cache.add([i] * 20, None, d)
    assert cache.bytes == 3000
    cache.used(cache.entries[0])  # conversation 0 came back: 1 is now the oldest
    assert cache.add([9] * 20, None, data(1000))
    assert sorted(e.tokens[0] for e in cache.entries) == [0, 2, 9]
    assert olds[1].closed and not olds[0].closed
    too_big = data(3001)
    assert not cache.add([8] * 20, None, too_big)
    assert too_big.closed and cache.bytes == 3000
    cache.clear()
    assert cache.entries == [] and cache.bytes == 0
    assert all(d.closed for d in olds)


def test_a_pinned_conversation_is_never_dropped_to_make_room() -> None:
    cache = PromptCache(2000)
    assert cache.add([1] * 20, None, data(1500))
    pinned = cache.entries[0]
    refused = data(1000)
    assert not cache.add([2] * 20, None, refused, pinned=pinned)  # only dropping the pinned one would make room
    assert refused.closed and cache.entries == [pinned] and not pinned.data.closed
    assert cache.add([3] * 20, None, data(500), pinned=pinned)
    assert cache.bytes == 2000
    assert cache.add([4] * 20, None, data(400), pinned=pinned)  # the older unpinned one goes instead
    assert sorted(e.tokens[0] for e in cache.entries) == [1, 4]


@pytest.mark.parametrize("budget", [0, -5])
def test_no_budget_means_disabled(budget: int) -> None:
    cache = PromptCache(budget)
    assert not cache.enabled
    assert not cache.add([1] * 20, None, data(10))
