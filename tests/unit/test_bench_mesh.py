"""Pure parts of the gossip/mesh bench (bench/mesh.py, bench/serf.py): no sockets, no processes."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.common import TARGETS, evaluate
from bench.mesh import (
    PUBLISHED,
    build_p10_entry,
    bytes_per_node_kbps,
    first_per_observer,
    format_p10_table,
    needed_observers,
    plan_processes,
    quantile,
    reach_time,
    saturated,
    summarize_runs,
    throughput_summary,
)
from bench.mesh import _only_from_bench_run as only_from_bench_run
from bench.serf import parse_agent_line, parse_statsd


def test_plan_processes_balances_and_covers_every_node_once() -> None:
    groups = plan_processes(50, per_proc=8)
    assert len(groups) == 7
    assert sorted(i for g in groups for i in g) == list(range(50))
    assert max(len(g) for g in groups) - min(len(g) for g in groups) <= 1
    assert plan_processes(3, per_proc=8) == [[0, 1, 2]]
    assert plan_processes(0) == []


@pytest.mark.parametrize(("others", "need"), [(1, 1), (2, 2), (29, 29), (49, 49), (10000, 9999), (20000, 19998)])
def test_needed_observers_is_all_of_them_below_ten_thousand(others: int, need: int) -> None:
    assert needed_observers(others) == need


def test_reach_time_takes_the_kth_observer_and_none_when_short() -> None:
    t0 = 100.0
    times = [100.5, 100.1, 100.3]
    assert reach_time(t0, times, 3) == pytest.approx(0.5)
    assert reach_time(t0, times, 3, fraction=0.5) == pytest.approx(0.3)
    assert reach_time(t0, times, 4) is None  # one observer never saw it
    assert reach_time(t0, [], 0) == 0.0


def test_reach_time_clamps_clock_noise_to_zero() -> None:
    assert reach_time(10.0, [9.9999], 1) == 0.0


def test_first_per_observer_keeps_earliest_and_drops_the_subject() -> None:
    obs = [("a", 2.0), ("b", 1.5), ("a", 1.0), ("s", 0.5)]
    assert first_per_observer(obs, exclude="s") == {"a": 1.0, "b": 1.5}


def test_quantile_nearest_rank() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    assert quantile([], 0.5) is None


def test_bytes_per_node_kbps_per_node_per_second_in_kilobytes() -> None:
    before = {"a": {"bytes_sent": 0, "bytes_received": 0}, "b": {"bytes_sent": 1000, "bytes_received": 1000}}
    after = {"a": {"bytes_sent": 10000, "bytes_received": 30000}, "b": {"bytes_sent": 11000, "bytes_received": 31000}}
    rates = bytes_per_node_kbps(before, after, 10.0)
    # (10k+30k + 10k+30k) bytes / 2 nodes / 10 s = 4000 B/s = 4 KB/s
    assert rates["total_kbps"] == pytest.approx(4.0)
    assert rates["sent_kbps"] == pytest.approx(1.0)
    assert math.isnan(bytes_per_node_kbps({}, after, 10.0)["total_kbps"])


def test_summarize_runs_counts_incomplete_runs() -> None:
    s = summarize_runs([0.4, None, 0.2, 0.3])
    assert s["median"] == 0.3 and s["min"] == 0.2 and s["max"] == 0.4 and s["incomplete"] == 1
    assert summarize_runs([0.2, 0.4])["median"] == pytest.approx(0.3)
    assert summarize_runs([None])["median"] is None


def test_saturated_threshold() -> None:
    assert saturated(95.0) and not saturated(40.0) and not saturated(None)


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("    2026/11/23 23:25:36 [INFO] serf: EventMemberUpdate: s7\n", ("update", "s7")),
        ("    2026/11/23 23:25:36 [INFO] serf: EventMemberFailed: s7 127.0.2.8\n", ("failed", "s7")),
        ("    2026/11/23 23:25:34 [INFO] serf: EventMemberJoin: s2 127.0.2.3", ("join", "s2")),
        ("    2026/11/23 [INFO] memberlist: Suspect s3 has failed, no acks received", ("suspect", "s3")),
        ("    2026/11/23 [INFO] agent: Received event: member-update", None),
        ("", None),
    ],
)
def test_parse_agent_line(line: str, parsed: tuple[str, str] | None) -> None:
    assert parse_agent_line(line) == parsed


def test_parse_statsd_sums_memberlist_byte_counters_only() -> None:
    payload = (
        "serf-agent.memberlist.udp.sent:120.000000|c\n"
        "serf-agent.memberlist.udp.sent:30.000000|c\n"
        "serf-agent.memberlist.udp.received:99|c\n"
        "serf-agent.memberlist.tcp.sent:1000.5|c\n"
        "serf-agent.memberlist.gossip:0.2|ms\n"
        "serf-agent.runtime.alloc_bytes:123.000000|g\n"
    )
    assert parse_statsd(payload) == {"udp.sent": 150.0, "udp.received": 99.0, "tcp.sent": 1000.5}


def _run(n: int, conv: float | None, fail: float | None, kbps: float | None, sat: bool = False) -> dict[str, Any]:
    return {
        "n": n,
        "convergence_s": {"median": conv},
        "failure_detect_s": fail,
        "bytes_per_node_kbps": kbps,
        "machine_saturated": sat,
    }


def test_p10_entry_uses_n30_and_measured_serf_as_reference() -> None:
    table = [
        {"n": 3, "ours": _run(3, 0.2, 5.6, 0.3), "serf": _run(3, 0.1, 6.0, 0.5)},
        {"n": 30, "ours": _run(30, 0.9, 5.9, 2.0, sat=True), "serf": _run(30, 0.6, 6.1, 2.5)},
        {"n": 50, "ours": _run(50, 1.1, 6.5, 3.0), "serf": {"skipped": "why"}},
    ]
    e = build_p10_entry(table, serf_version="serf 0.9.4", serf_note=None)
    assert e["value"] == 0.9 and e["reference"] == 0.6 and e["ratio"] == pytest.approx(1.5)
    assert e["failure_detect_s"] == 5.9 and e["bytes_per_node_kbps"] == 2.0
    assert "real Serf" in e["reference_source"]
    assert e["details"]["headline_n"] == 30
    assert "CPU queueing" in e["details"]["cpu_note"]
    met, rows = evaluate(e, TARGETS["P10"].checks)
    assert met is True and len(rows) == 3
    text = format_p10_table(e)
    assert "  30 |" in text and "  50 |" in text


def test_p10_entry_falls_back_to_published_reference_and_largest_n() -> None:
    table = [{"n": 10, "ours": _run(10, 0.5, 7.0, 1.0), "serf": {"skipped": "serf is not installed"}}]
    e = build_p10_entry(table, serf_version=None, serf_note="serf is not installed")
    assert e["reference"] == PUBLISHED["convergence_s"]
    assert e["reference_source"] == PUBLISHED["source"]
    assert e["details"]["headline_n"] == 10
    met, _ = evaluate(e, TARGETS["P10"].checks)
    assert met is False  # 7 s failure detection misses the 6 s target


def test_p10_entry_skipped_when_nothing_was_measured() -> None:
    e = build_p10_entry([{"n": 30, "ours": {"skipped": "cannot bind"}}], serf_version=None, serf_note="x")
    assert e["value"] is None and "cannot bind" in e["skipped"]


def test_throughput_summary_rates_and_ratio() -> None:
    one = {"completed": 30, "errors": 0, "elapsed_s": 30.0}
    three = {"completed": 45, "errors": 1, "elapsed_s": 30.0}
    s = throughput_summary(one, three)
    assert s["single_rps"] == pytest.approx(1.0) and s["mesh_rps"] == pytest.approx(1.5)
    assert s["ratio"] == pytest.approx(1.5)
    assert throughput_summary({"completed": 0, "errors": 3, "elapsed_s": 30.0}, three)["ratio"] is None


def test_only_ids_are_read_from_bench_run_argv_only() -> None:
    assert only_from_bench_run(["/work/main/bench/run.py", "--only", "P10,p1"]) == {"P10", "P1"}
    assert only_from_bench_run(["/work/main/bench/run.py", "--only=P11"]) == {"P11"}
    assert only_from_bench_run(["/work/main/bench/run.py"]) is None
    assert only_from_bench_run(["-m", "--only", "P10"]) is None
    assert only_from_bench_run([]) is None
