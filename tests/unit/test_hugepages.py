"""The address arithmetic that picks which memory a model load gets huge pages for (pure)."""

from __future__ import annotations

from mongarsd.inference.hugepages import aligned_interior, parse_anon_ranges, subtract

MB = 1 << 20

MAPS = """\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0006000000 rw-p 00000000 00:00 0
7f0006000000-7f0006200000 ---p 00000000 00:00 0
7f0006200000-7f0006400000 rw-p 00000000 00:00 0                          [anon:glibc malloc]
7f0006400000-7f0006500000 r--p 00000000 fd:01 1234                       /models/m.gguf
7f0006500000-7f0006600000 rw-p 00001000 fd:01 99                         /usr/lib/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
garbage line
"""


def test_only_private_writable_anonymous_mappings_are_taken() -> None:
    assert parse_anon_ranges(MAPS) == [
        (0x7F0000000000, 0x7F0006000000),
        (0x7F0006200000, 0x7F0006400000),
    ]


def test_a_mapping_that_grew_by_merging_counts_only_its_new_part() -> None:
    before = [(100 * MB, 110 * MB), (200 * MB, 201 * MB)]
    # the allocator's new 92 MB landed just below an existing mapping, and the kernel merged them
    after = [(8 * MB, 110 * MB), (200 * MB, 201 * MB), (300 * MB, 301 * MB)]
    assert subtract(after, before) == [(8 * MB, 100 * MB), (300 * MB, 301 * MB)]


def test_subtract_splits_around_and_drops_covered_ranges() -> None:
    assert subtract([(0, 100)], [(10, 20), (30, 40)]) == [(0, 10), (20, 30), (40, 100)]
    assert subtract([(10, 20)], [(0, 100)]) == []
    assert subtract([(10, 20)], []) == [(10, 20)]
    assert subtract([], [(0, 5)]) == []


def test_only_whole_huge_pages_inside_a_mapping_are_advised() -> None:
    page = 2 * MB
    assert aligned_interior(1 * MB, 10 * MB, page) == (2 * MB, 10 * MB)
    assert aligned_interior(2 * MB, 9 * MB, page) == (2 * MB, 8 * MB)
    assert aligned_interior(3 * MB, 5 * MB, page) is None  # no whole page inside
    assert aligned_interior(4 * MB, 6 * MB, page) == (4 * MB, 6 * MB)
