"""Mains Virtuelles: the safe calculator, clock, unit converter, system status, memory search and their registry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from mongarsd.cognition import hands as hands_mod
from mongarsd.cognition.hands import (
    MAX_RESULT_CHARS,
    Hand,
    HandContext,
    HandResult,
    Hands,
    asks_arithmetic,
    calculate,
    convert,
    describe_time,
    encode_content,
    read_thermal_zones,
    validate_arguments,
)
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import Hippocampus

USER = HandContext(user="alice", role="user")
PEER = HandContext(user="peer-node", role="peer")


async def run(name: str, arguments: Mapping[str, Any] | None, ctx: HandContext = USER, registry: Hands | None = None) -> HandResult:
    result = await (registry or Hands()).async_run(name, arguments, ctx)  # type: ignore[arg-type]
    assert len(result.content) <= MAX_RESULT_CHARS
    payload = json.loads(result.content)
    assert ("result" in payload) is result.ok and ("error" in payload) is not result.ok
    return result


def error_of(result: HandResult) -> str:
    assert not result.ok
    return str(json.loads(result.content)["error"])


# ------------------------------------------------------------------------------ calculator


def test_calculator_keeps_integers_exact() -> None:
    out = calculate("17*23")
    assert out == {"expression": "17 * 23", "result": 391}
    assert type(out["result"]) is int
    assert calculate("2**100")["result"] == 2**100  # exact, not a float approximation


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", 14),
        ("(2+3)*4", 20),
        ("-2**2", -4),
        ("2^10", 1024),
        ("2^3^2", 512),  # right-associative, as in mathematics
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("7/2", 3.5),
        ("6/3", 2),
        ("0.1+0.2", 0.3),  # 12 significant digits
        ("sqrt(16)", 4),
        ("sqrt(2)", 1.41421356237),
        ("log(8, 2)", 3),
        ("log10(1000)", 3),
        ("exp(0)", 1),
        ("abs(-3) + floor(2.7) + ceil(2.1)", 8),
        ("round(2.567, 2)", 2.57),
        ("max(1, 5, 3) - min(4, 2)", 3),
        ("factorial(5)", 120),
        ("2 * pi", 6.28318530718),
        ("3 × 4", 12),
        ("3x4", 12),
        ("3 x (1 + 1)", 6),
        ("8 ÷ 2", 4),
        ("10 − 4", 6),  # U+2212 minus sign
    ],
)
def test_calculator_evaluates(expression: str, expected: float) -> None:
    assert calculate(expression)["result"] == expected


def test_calculator_large_integers_continue_as_floats_within_float_range() -> None:
    assert calculate("factorial(170)")["result"] == pytest.approx(7.25741561531e306)
    with pytest.raises(OverflowError, match="too large"):
        calculate("10**299 * 10**299")


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0 ** -1", "negative power"),
        ("9**9**9", "exponent is too large"),
        ("10**1000", r"too large \(at most 10\*\*300"),
        ("__import__('os')", "unknown function '__import__'"),
        ("(1).real", "attribute access is not allowed"),
        ("().__class__", "attribute access is not allowed"),
        ("lambda: 1", "lambda is not allowed"),
        ("factorial(171)", "from 0 to 170"),
        ("factorial(2.5)", "whole number"),
        ("1,234 + 1", "',' may only separate function arguments"),
        ("sqrt(-1)", r"sqrt\(\) is not defined for -1"),
        ("log(0)", "not defined"),
        ("(-8) ** (1/3)", "not a real number"),
        ("exp(1000)", "too large"),
        ("round(1, 10**100)", "at most 300 digits"),
        ("os", "unknown name 'os'"),
        ("True + 1", "True is not a number"),
        ("'a' * 3", "is not a number"),
        ("1 < 2", "comparison is not allowed"),
        ("[1, 2]", "a list is not allowed"),
        ("0x10", "hexadecimal"),
        ("sqrt(x=4)", "keyword"),
        ("+".join(["1"] * 40), "too complex"),
        ("2 +", "cannot read the expression"),
        ("", "empty"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises((ValueError, ArithmeticError), match=message):
        calculate(expression)


def test_calculator_refuses_huge_powers_before_computing_them() -> None:
    started = time.perf_counter()
    for expression in ("9**9**9", "10**1000", "(10**299)**2", "0.001 ** -1000"):
        with pytest.raises((ValueError, OverflowError)):
            calculate(expression)
    assert time.perf_counter() - started < 0.5


async def test_calculator_through_the_registry() -> None:
    result = await run("calculator", {"expression": "17*23"})
    assert result.ok and result.data == {"expression": "17 * 23", "result": 391}
    assert json.loads(result.content) == {"result": {"expression": "17 * 23", "result": 391}}
    assert result.elapsed_ms >= 0


async def test_calculator_failures_come_back_as_results() -> None:
    assert error_of(await run("calculator", {"expression": "1/0"})) == "division by zero"
    too_long = error_of(await run("calculator", {"expression": "1+" * 100 + "1"}))
    assert "'expression' is too long" in too_long and "201" in too_long
    assert "attribute access is not allowed" in error_of(await run("calculator", {"expression": "__import__('os').system('id')"}))
    assert "own functions" in error_of(await run("calculator", {"expression": "(1)(2)"}))


# ------------------------------------------------------------------------------ explicit requests


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Use the calculator please: 12.5 * 3", "calculator"),
        ("Calculate 17*23", "calculator"),
        ("what is 17 * 23?", "calculator"),
        ("What’s 2^10", "calculator"),
        ("how much is 3 times 4", "calculator"),
        ("12 / 4 =", "calculator"),
        ("what time is it in Tokyo?", "clock"),
        ("What's the date today?", "clock"),
        ("convert 10 km to miles", "convert_units"),
        ("how much is 5 kg in lb?", "convert_units"),
        ("100 °F to C please", "convert_units"),
        ("search my memories for the cat's name", "memory_search"),
        ("Do you remember where I live?", "memory_search"),
        ("show me the system status", "system_status"),
        ("what is the CPU temperature", "system_status"),
        ("calculate 5 km to miles", "calculator"),  # the first request in the text wins
    ],
)
def test_requested_finds_explicit_asks(text: str, expected: str) -> None:
    assert Hands().requested(text, "user") == expected


@pytest.mark.parametrize(
    "text",
    [
        "hello there",
        "what is the capital of France?",
        "what is 17?",
        "I was born on 2024-05-01",
        "2024-05-01",
        "10/12/2024",
        "my computer is slow",  # "compute" only as a whole word
        "the tests were recalculated",
        "I ran 5 km in 30 min",
        "I walk 5 km to work",
        "tell me about 1984",
        "what is 2 + x?",
    ],
)
def test_requested_ignores_ordinary_text(text: str) -> None:
    assert Hands().requested(text, "user") is None


def test_requested_only_offers_what_the_role_may_use() -> None:
    hands = Hands()
    assert hands.requested("do you remember my dog?", "user") == "memory_search"
    assert hands.requested("do you remember my dog?", "peer") is None
    assert hands.requested("system status please", "admin") == "system_status"
    assert hands.requested("system status please", "peer") is None
    assert hands.requested("what is 2+2", "peer") == "calculator"
    assert Hands(enabled=["clock"]).requested("what is 2+2", "user") is None


def test_asks_arithmetic_needs_a_binary_operation_between_numbers() -> None:
    assert asks_arithmetic("what is (2+3)*4?")
    assert asks_arithmetic("combien font 6 fois 7 ?")
    assert not asks_arithmetic("-5")
    assert not asks_arithmetic("what is 2024-05-01?")


# ------------------------------------------------------------------------------ registry


def test_validate_arguments_returns_a_clean_copy() -> None:
    schema = Hands().get("memory_search")
    assert schema is not None
    assert validate_arguments(schema.parameters, {"query": "cat \ud800", "limit": 3}) == {"query": "cat \ufffd", "limit": 3}
    cleaned = validate_arguments(schema.parameters, {"query": "cat", "limit": 3.0})  # 3.0 is an integer in JSON Schema
    assert cleaned["limit"] == 3 and type(cleaned["limit"]) is int


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("calculator", {}, "missing required argument 'expression'"),
        ("calculator", {"expression": "1+1", "shell": "id"}, "unexpected argument 'shell'"),
        ("calculator", {"expression": 5}, "argument 'expression' must be string, not int"),
        ("calculator", {"expression": ""}, "argument 'expression' must have at least 1"),
        ("calculator", ["1+1"], "arguments must be a JSON object"),
        ("convert_units", {"value": "ten", "from_unit": "m", "to_unit": "km"}, "argument 'value' must be number"),
        ("convert_units", {"value": True, "from_unit": "m", "to_unit": "km"}, "argument 'value' must be number, not bool"),
        ("memory_search", {"query": "cats", "limit": 0}, "argument 'limit' must be at least 1"),
        ("memory_search", {"query": "cats", "limit": 11}, "argument 'limit' must be at most 10"),
        ("memory_search", {"query": "cats", "limit": 2.5}, "argument 'limit' must be integer"),
        ("clock", {"timezone": "x" * 65}, "argument 'timezone' is too long"),
    ],
)
async def test_invalid_arguments_name_the_argument(name: str, arguments: Any, message: str) -> None:
    registry = Hands()
    assert message in error_of(await run(name, arguments, registry=registry))
    assert registry.metrics()["invalid_total"] == 1


async def test_unknown_hand_is_a_failed_result() -> None:
    message = error_of(await run("shell", {"command": "rm -rf /"}))
    assert "unknown tool 'shell'" in message and "calculator" in message


async def test_role_denial() -> None:
    registry = Hands()
    result = await run("system_status", {}, PEER, registry)
    assert error_of(result) == "tool 'system_status' is not permitted for role peer"
    assert "not permitted for role peer" in error_of(await run("memory_search", {"query": "x"}, PEER, registry))
    assert registry.metrics()["denied_total"] == 2
    assert [h.name for h in registry.allowed("peer")] == ["calculator", "clock", "convert_units"]


async def test_slow_hand_times_out() -> None:
    async def slow(args: Mapping[str, Any], ctx: HandContext) -> Any:
        await asyncio.sleep(30)
        return "never"

    registry = Hands([Hand("slow", "Take forever.", {"type": "object", "properties": {}}, slow, timeout_s=0.05)])
    started = time.perf_counter()
    result = await run("slow", {}, registry=registry)
    assert time.perf_counter() - started < 1.0
    assert error_of(result) == "timed out after 0.05 s"
    assert registry.metrics()["timeouts_total"] == 1


async def test_broken_hands_never_raise_out_of_the_registry() -> None:
    async def refuses(args: Mapping[str, Any], ctx: HandContext) -> Any:
        raise LookupError("no such thing")

    async def crashes(args: Mapping[str, Any], ctx: HandContext) -> Any:
        raise RuntimeError("secret internal detail")

    async def not_json(args: Mapping[str, Any], ctx: HandContext) -> Any:
        return {"value": float("nan")}

    async def huge(args: Mapping[str, Any], ctx: HandContext) -> Any:
        return "\n" * 10_000

    empty: dict[str, Any] = {"type": "object", "properties": {}}
    registry = Hands(
        [Hand(n, "Test.", empty, f) for n, f in (("refuses", refuses), ("crashes", crashes), ("not_json", not_json), ("huge", huge))]
    )
    assert error_of(await run("refuses", {}, registry=registry)) == "no such thing"
    crashed = error_of(await run("crashes", {}, registry=registry))
    assert crashed == "tool 'crashes' failed with an internal error" and "secret" not in crashed
    assert error_of(await run("not_json", {}, registry=registry)) == "tool 'not_json' returned a result that is not JSON"
    result = await run("huge", {}, registry=registry)
    assert result.ok and result.data == "\n" * 10_000  # the whole value stays in data
    cut = json.loads(result.content)
    assert cut["truncated"] is True and cut["result"].startswith('"\\n\\n')
    counts = registry.metrics()
    assert counts["calls_total"] == 4 and counts["failures_total"] == 3 and counts["crashes_failures_total"] == 1


def test_encode_content_is_compact_and_bounded() -> None:
    assert encode_content("result", [1, "é"]) == '{"result":[1,"é"]}'
    cut = encode_content("result", {"quotes": '"' * 5000})
    assert len(cut) <= MAX_RESULT_CHARS
    assert json.loads(cut)["result"].startswith('{"quotes":"\\"')
    with pytest.raises(ValueError):
        encode_content("result", float("inf"))


def test_registry_construction_checks() -> None:
    assert Hands().names() == ("calculator", "clock", "convert_units", "system_status", "memory_search")
    assert Hands(enabled=["clock", "calculator"]).names() == ("calculator", "clock")
    with pytest.raises(ValueError, match="unknown hands: nope, shell"):
        Hands(enabled=["calculator", "shell", "nope"])
    calc = Hands().get("calculator")
    assert calc is not None
    with pytest.raises(ValueError, match="same name: calculator"):
        Hands([calc, calc])
    wide = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 5000}}}
    with pytest.raises(ValueError, match="maxLength over 200"):
        Hands([Hand("wide", "Too wide.", wide, calc.run)])
    with pytest.raises(ValueError, match="hand name"):
        Hands([Hand("rm -rf", "Bad name.", calc.parameters, calc.run)])


def test_specs_are_openai_tools_with_simple_schemas() -> None:
    specs = Hands().specs("user")
    assert [s["function"]["name"] for s in specs] == ["calculator", "clock", "convert_units", "system_status", "memory_search"]
    for spec in specs:
        assert spec["type"] == "function" and spec["function"]["description"]
        params = spec["function"]["parameters"]
        assert params["type"] == "object" and params["additionalProperties"] is False
        for prop in params["properties"].values():
            assert prop.get("maxLength", 0) <= 200
        assert "$ref" not in json.dumps(spec)
    assert [s["function"]["name"] for s in Hands().specs("peer")] == ["calculator", "clock", "convert_units"]
    specs[0]["function"]["parameters"]["properties"].clear()  # a copy: the registry is untouched
    assert Hands().specs("user")[0]["function"]["parameters"]["properties"]


# ------------------------------------------------------------------------------ clock


async def test_clock_in_utc() -> None:
    before = datetime.now(UTC)
    result = await run("clock", {"timezone": "UTC"})
    after = datetime.now(UTC)
    data = result.data
    assert result.ok and data["timezone"] == "UTC" and data["utc_offset"] == "+00:00"
    assert data["datetime"].endswith("+00:00")
    stamp = datetime.fromisoformat(data["datetime"])
    assert before.replace(microsecond=0) <= stamp <= after
    assert data["date"] == stamp.strftime("%Y-%m-%d") and data["time"] == stamp.strftime("%H:%M:%S")
    assert data["weekday"] == ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")[stamp.weekday()]


async def test_clock_uses_the_board_zone_by_default() -> None:
    result = await run("clock", None, HandContext(user="alice", role="user", timezone="Asia/Tokyo"))
    assert result.data["timezone"] == "Asia/Tokyo" and result.data["utc_offset"] == "+09:00"  # Japan keeps no DST
    local = await run("clock", {})
    assert local.ok and local.data["timezone"]


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "Europe"])
async def test_clock_refuses_unknown_zones(zone: str) -> None:
    message = error_of(await run("clock", {"timezone": zone}))
    assert message.startswith(f"unknown time zone '{zone}'")


def test_describe_time_does_not_follow_the_locale() -> None:
    moment = datetime(2024, 5, 6, 13, 4, 5, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
    assert describe_time(moment, "America/St_Johns") == {
        "datetime": "2024-05-06T13:04:05-03:30",
        "date": "2024-05-06",
        "time": "13:04:05",
        "weekday": "Monday",
        "timezone": "America/St_Johns",
        "utc_offset": "-03:30",
    }


# ------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("value", "src", "dst", "expected"),
    [
        (10, "km", "mi", 6.213711922),
        (100, "C", "F", 212),
        (212, "°F", "celsius", 100),
        (98.6, "fahrenheit", "°C", 37),
        (0, "K", "C", -273.15),
        (1, "GiB", "MB", 1073.741824),
        (1, "kg", "lb", 2.204622622),
        (2, "Kilometres", "meters", 2000),
        (8, "bits", "B", 1),
        (1, "mb", "kB", 1000),  # lower-case mb is a megabyte
        (60, "mph", "km/h", 96.56064),
        (1, "gal", "l", 3.785411784),
        (2, "hours", "min", 120),
        (1, "m³", "l", 1000),
    ],
)
def test_convert(value: float, src: str, dst: str, expected: float) -> None:
    assert convert(value, src, dst)["result"] == expected


async def test_convert_through_the_registry() -> None:
    result = await run("convert_units", {"value": 10, "from_unit": "km", "to_unit": "miles"})
    assert result.data == {"value": 10, "from_unit": "km", "to_unit": "mi", "result": 6.213711922}
    assert (
        error_of(await run("convert_units", {"value": 1, "from_unit": "km", "to_unit": "kg"})) == "cannot convert km (length) to kg (mass)"
    )
    assert "unknown unit 'furlong'" in error_of(await run("convert_units", {"value": 1, "from_unit": "furlong", "to_unit": "m"}))
    assert "below absolute zero" in error_of(await run("convert_units", {"value": -500, "from_unit": "C", "to_unit": "K"}))


# ------------------------------------------------------------------------------ system status


async def test_system_status_reports_numbers_and_the_board() -> None:
    result = await run("system_status", {}, HandContext(user="root", role="admin", board="pi5"))
    data = result.data
    assert result.ok and data["board"] == "pi5"
    assert isinstance(data["cpu_count"], int) and data["cpu_count"] >= 1
    assert len(data["load_avg"]) == 3 and all(x >= 0 for x in data["load_avg"])
    assert 0 < data["memory_available_mb"] <= data["memory_total_mb"]
    assert data["process_rss_mb"] > 0 and data["uptime_s"] > 0 and isinstance(data["cpu_percent"], float)
    assert data["temperature_c"] is None or -40 <= data["temperature_c"] <= 150
    assert not any("host" in key for key in data)


def test_thermal_zone_fallback_takes_the_hottest_valid_zone(tmp_path: Path) -> None:
    for zone, raw in (("thermal_zone0", "45123\n"), ("thermal_zone1", "garbage"), ("thermal_zone2", "999999"), ("thermal_zone3", "51000")):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "temp").write_text(raw)
    (tmp_path / "cooling_device0").mkdir()
    assert read_thermal_zones(str(tmp_path)) == 51.0
    assert read_thermal_zones(str(tmp_path / "absent")) is None


def _write_zone(root: Path, millidegrees: str) -> None:
    """Write one fake thermal zone (blocking; thread)."""
    (root / "thermal_zone0").mkdir()
    (root / "thermal_zone0" / "temp").write_text(millidegrees)


async def test_system_status_falls_back_to_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    await asyncio.to_thread(_write_zone, tmp_path, "47500\n")
    monkeypatch.setattr(hands_mod, "read_temperature", lambda: (None, False))
    monkeypatch.setattr(hands_mod, "THERMAL_DIR", str(tmp_path))
    result = await run("system_status", {})
    assert result.data["temperature_c"] == 47.5


# ------------------------------------------------------------------------------ memory search


@pytest_asyncio.fixture
async def hippocampus(tmp_path: Path) -> AsyncIterator[Hippocampus]:
    db = Database(path=tmp_path / "hands.db")
    await db.async_start()
    hippo = Hippocampus(db=db)  # no embedder: full-text recall only, which is all this test needs
    await hippo.async_start()
    try:
        yield hippo
    finally:
        await hippo.async_stop()
        await db.async_stop()


async def test_memory_search_sees_only_the_callers_memories(hippocampus: Hippocampus) -> None:
    await hippocampus.async_add_memory("alice", "Alice plays the violin every evening.")
    await hippocampus.async_add_memory("alice", "Alice's violin teacher is called Marc. " + "Practice notes. " * 100)
    await hippocampus.async_add_memory("bob", "Bob secretly plays the violin too.")
    ctx = HandContext(user="alice", role="user", hippocampus=hippocampus)
    result = await run("memory_search", {"query": "violin"}, ctx)
    memories = result.data["memories"]
    assert result.ok and len(memories) == 2
    assert all(m["text"].startswith("Alice") for m in memories)
    assert max(len(m["text"]) for m in memories) == 500
    assert all(datetime.fromisoformat(m["created_at"]).tzinfo is not None and m["score"] > 0 for m in memories)
    assert "full-text search only" in result.data["note"]
    limited = await run("memory_search", {"query": "violin", "limit": 1}, ctx)
    assert len(limited.data["memories"]) == 1
    bob = await run("memory_search", {"query": "violin"}, HandContext(user="bob", role="user", hippocampus=hippocampus))
    assert [m["text"] for m in bob.data["memories"]] == ["Bob secretly plays the violin too."]


async def test_memory_search_without_memory() -> None:
    assert error_of(await run("memory_search", {"query": "violin"})) == "memory is not enabled"


async def test_memory_search_passes_the_caller_through() -> None:
    class FakeRecall:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, int]] = []

        async def async_recall(self, user: str, query: str, k: int = 5) -> Any:
            self.calls.append((user, query, k))
            return type("R", (), {"hits": [], "degraded": False})()

    fake = FakeRecall()
    ctx = HandContext(user="carol", role="admin", hippocampus=fake)  # type: ignore[arg-type]
    result = await run("memory_search", {"query": "  garden  ", "limit": 3}, ctx)
    assert result.data == {"memories": []} and fake.calls == [("carol", "garden", 3)]
