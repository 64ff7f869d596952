"""The running marker counts runs that ended without a clean stop, and only those."""

from __future__ import annotations

from pathlib import Path

from mongarsd.runmarker import RunMarker, read_count


def test_clean_stops_count_nothing_and_crashes_accumulate(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    first = RunMarker(state)
    assert first.begin() == 0 and first.marker.exists()
    first.end()
    first.end()  # idempotent
    assert not first.marker.exists()
    assert RunMarker(state).begin() == 0  # the previous run stopped cleanly
    assert RunMarker(state).begin() == 1  # ... this one did not end()
    assert RunMarker(state).begin() == 2
    assert read_count(state / "unclean_exits") == 2
    assert not list(state.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_a_damaged_counter_reads_as_zero(tmp_path: Path) -> None:
    (tmp_path / "unclean_exits").write_text("garbage")
    (tmp_path / "running").write_text("123\n")
    assert RunMarker(tmp_path).begin() == 1
