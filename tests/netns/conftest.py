"""Fixtures for network-namespace tests: skip without root/iproute2, clean stale labs, always tear down."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.netns.harness import NetnsLab, cleanup_stale, unavailable_reason


@pytest.fixture(scope="session")
def netns_ready() -> None:
    """Skip when namespaces cannot be built; remove labs left by crashed runs."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cleanup_stale()


@pytest.fixture
def netns_lab(netns_ready: None) -> Iterator[Callable[[int], NetnsLab]]:
    """Return a factory `make(n) -> NetnsLab` (set up); every lab is torn down, also on failure."""
    labs: list[NetnsLab] = []

    def make(n: int) -> NetnsLab:
        lab = NetnsLab(n)
        labs.append(lab)
        lab.setup()
        return lab

    yield make
    errors: list[BaseException] = []
    for lab in reversed(labs):
        try:
            lab.teardown()
        except Exception as err:  # keep tearing the others down, report after
            errors.append(err)
    if errors:
        raise errors[0]
