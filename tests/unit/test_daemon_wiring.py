"""The composition root: start order, the edge after the API, a context built once and frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mongarsd.board import detect_board
from mongarsd.config import load_config
from mongarsd.daemon import Daemon, HttpService, MdnsService
from mongarsd.metrics import Metrics
from mongarsd.supervisor import ServiceStack, TaskSupervisor, members


def build(tmp_path: Path) -> tuple[list[str], object, Daemon]:
    (tmp_path / "none.toml").write_text("")
    loaded = load_config(profile="generic", config_path=tmp_path / "none.toml", cli={"server": {"state_dir": tmp_path}})
    daemon = Daemon(loaded=loaded, board=detect_board())
    services, ctx = daemon.build_services(Metrics(), ServiceStack(), TaskSupervisor())
    return [s.name for s in members(services)], ctx, daemon


def test_start_order_puts_the_store_first_and_mdns_after_the_api(tmp_path: Path) -> None:
    names, _, daemon = build(tmp_path)
    assert names[0] == "store"
    assert names.index("inference") < names.index("pipeline") < names.index("mesh") < names.index("api")
    assert names[-1] == "mdns"  # advertised only once the API answers; stopped (reverse order) before it drains
    # the preload reads the settings Evolution adopted: it starts before the group that loads the LLM
    assert names.index("evolution") < min(names.index("energy"), names.index("embed"), names.index("inference"))
    assert isinstance(daemon.http, HttpService)


def test_context_is_built_once_and_frozen(tmp_path: Path) -> None:
    _, ctx, _ = build(tmp_path)
    assert ctx.llm is not None and ctx.pipeline is not None and ctx.mesh is not None and ctx.embedder is not None  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.llm = None  # type: ignore[attr-defined]
    ctx.state.inflight += 1  # type: ignore[attr-defined]  # the one mutable part: request bookkeeping
    assert ctx.state.inflight == 1  # type: ignore[attr-defined]


async def test_stop_through_stops_the_edge_then_the_api_and_leaves_the_rest() -> None:
    order: list[str] = []

    class Svc:
        start_timeout_s = 1.0
        stop_timeout_s = 1.0

        def __init__(self, name: str) -> None:
            self.name = name

        async def async_start(self) -> None:
            order.append("start " + self.name)

        async def async_stop(self) -> None:
            order.append("stop " + self.name)

    store, api, edge = Svc("store"), Svc("api"), Svc("mdns")
    stack = ServiceStack()
    await stack.async_start([store, api, edge])
    assert await stack.async_stop_through(api) == []
    assert order[-2:] == ["stop mdns", "stop api"]
    assert stack.started == ["store"]
    await stack.async_stop()
    assert order[-1] == "stop store"
    assert MdnsService.stop_timeout_s <= 2.0
