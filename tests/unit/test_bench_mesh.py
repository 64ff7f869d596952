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
    one = {"completed": 30, "errors": 0, "elapsed_s": 30.0, "window_tokens": 600.0}
    three = {"completed": 45, "errors": 1, "elapsed_s": 30.0, "window_tokens": 1680.0}
    s = throughput_summary(one, three)
    assert s["single_rps"] == pytest.approx(1.0) and s["mesh_rps"] == pytest.approx(1.5)
    assert s["requests_ratio"] == pytest.approx(1.5)
    # the checked ratio is the tokens decoded inside the windows, not whole answers
    assert s["single_window_tokens_per_s"] == pytest.approx(20.0) and s["ratio"] == pytest.approx(2.8)
    assert throughput_summary({"completed": 0, "errors": 3, "elapsed_s": 30.0}, three)["ratio"] is None


def test_window_share_spreads_a_decode_over_the_window_it_overlaps() -> None:
    from bench.mesh import window_share

    assert window_share(48, 10.0, 20.0, 0.0, 100.0) == 48.0  # all inside
    assert window_share(48, 10.0, 20.0, 15.0, 100.0) == pytest.approx(24.0)  # the window opened halfway
    assert window_share(48, 90.0, 110.0, 0.0, 100.0) == pytest.approx(24.0)  # finished after the window
    assert window_share(48, 0.0, 5.0, 10.0, 20.0) == 0.0  # before the window
    assert window_share(48, 12.0, 12.0, 10.0, 20.0) == 48.0 and window_share(48, 25.0, 25.0, 10.0, 20.0) == 0.0
    assert window_share(0, 10.0, 20.0, 0.0, 100.0) == 0.0 and window_share(48, 10.0, 20.0, 5.0, 5.0) == 0.0


def test_only_ids_are_read_from_bench_run_argv_only() -> None:
    assert only_from_bench_run(["/srv/mongarsd/bench/run.py", "--only", "P10,p1"]) == {"P10", "P1"}
    assert only_from_bench_run(["/srv/mongarsd/bench/run.py", "--only=P11"]) == {"P11"}
    assert only_from_bench_run(["/srv/mongarsd/bench/run.py"]) is None
    assert only_from_bench_run(["-m", "--only", "P10"]) is None
    assert only_from_bench_run([]) is None


# --------------------------------------------------------------------------- issue 11: P10 timing trade, P11


def test_p10_entry_reports_the_previous_timing_and_the_simulation() -> None:
    from bench.mesh import DEFAULT_TIMING, PREVIOUS_TIMING

    head = {"n": 30, "ours": _run(30, 0.5, 4.4, 0.5), "serf": _run(30, 0.5, 9.0, 0.5), "previous": _run(30, 0.5, 7.9, 0.26)}
    sim = {
        "rows": [{"n": 100, "timing": "lan", "convergence_s": 0.5, "detect_s": 5.0, "bytes_per_node_kbps": 0.5, "wall_s": 9.0}],
        "growth": {"lan": {"convergence_s": {"a": 0.1, "b_per_decade": 0.2, "r2": 0.9}, "detect_s": None}},
        "table_text": "   N | timing ...",
    }
    e = build_p10_entry([head], serf_version="serf", serf_note=None, simulation=sim)
    trade = e["details"]["timing_trade"]
    assert trade["previous"]["preset"] == PREVIOUS_TIMING and trade["default"]["preset"] == DEFAULT_TIMING
    assert trade["previous"]["failure_detect_s"] == 7.9 and trade["default"]["failure_detect_s"] == 4.4
    assert trade["bandwidth_ratio"] == pytest.approx(0.5 / 0.26, abs=0.01)
    assert e["previous_failure_detect_s"] == 7.9
    assert e["details"]["table"][0]["previous_failure_detect_s"] == 7.9
    assert e["details"]["simulation"] is sim
    assert set(e["details"]["min_suspicion_s"]) == {DEFAULT_TIMING, PREVIOUS_TIMING}
    text = format_p10_table(e)
    assert "timing trade at N=30" in text and "memberlist" in text and "log10(N)" in text


def test_p10_entry_without_previous_timing_has_no_trade() -> None:
    e = build_p10_entry([{"n": 30, "ours": _run(30, 0.5, 4.4, 0.5)}], serf_version=None, serf_note="x")
    assert e["details"]["timing_trade"] is None and e["details"]["simulation"] is None
    assert "timing trade" not in format_p10_table(e)


def test_lost_requests_counts_everything_but_answers_and_retried_refusals() -> None:
    from bench.mesh import lost_requests

    assert lost_requests({"statuses": {"200": 40, "429": 7, "503": 2}}) == 0
    assert lost_requests({"statuses": {"200": 40, "502": 1, "ClientOSError": 2, "stream_cut": 1}}) == 4
    assert lost_requests({}) == 0


def test_forward_log_counting_and_phase_diff() -> None:
    from bench.mesh import count_log_events, diff_counts, scheduler_choices

    lines = [
        '{"event": "mesh_forwarded", "peer": "b", "level": "info"}',
        '{"event": "mesh_forwarded", "peer": "c", "level": "info"}',
        '{"event": "mesh_forward_failed", "peer": "c", "level": "warning"}',
        '{"event": "http_request", "level": "info"}',
        "not json at all",
    ]
    before = count_log_events(lines[:1])
    after = count_log_events(lines)
    assert after["mesh_forwarded"] == 2 and after["forwarded_to"] == {"b": 1, "c": 1}
    d = diff_counts(before, after)
    assert d["mesh_forwarded"] == 1 and d["forwarded_to"] == {"c": 1} and d["mesh_forward_failed"] == 1
    per = {"daemon0": d, "daemon1": {"mesh_forwarded": 3, "forwarded_to": {"c": 3}}, "daemon2": {"mesh_forwarded": 0}}
    s = scheduler_choices(per)
    assert s["forwarded_by_entry"] == 1 and s["forwarded_twice"] == 3 and s["forward_failures"] == 1
    assert s["entry_forwarded_to"] == {"c": 1}


def test_p11_entry_ratios_failover_and_budget_method() -> None:
    from bench.mesh import build_p11_entry

    def load(done: int, **statuses: int) -> dict[str, Any]:
        return {
            "completed": done, "errors": 0, "elapsed_s": 30.0, "window_tokens": 48.0 * done,
            "statuses": {"200": done, **statuses}, "scheduler": {"x": 1},
        }  # fmt: skip

    phases = {
        "single": load(30),
        "single_stream": load(27),
        "mesh": load(84),
        "mesh_stream": load(81),
        "failover": {**load(60, ClientOSError=1), "killed": {"node": "daemon2"}},
    }
    e = build_p11_entry(phases, budget_method="cgroup v1 cpu.cfs_quota_us=50000", cgroup_version=1, daemon_warnings={})
    assert e["ratio"] == pytest.approx(2.8) and e["stream_ratio"] == pytest.approx(3.0)
    assert e["failover_lost"] == 1 and e["details"]["failover"]["killed"] == {"node": "daemon2"}
    assert "v1 CFS quota" in e["details"]["method"] and e["details"]["cgroup_version"] == 1
    met, _ = evaluate(e, TARGETS["P11"].checks)
    assert met is False  # one request lost in the failover run
    lossless = build_p11_entry({**phases, "failover": load(60)}, budget_method="cpu.max", cgroup_version=2, daemon_warnings={})
    assert lossless["failover_lost"] == 0 and isinstance(lossless["stream_ratio"], float)
    met, _ = evaluate(lossless, TARGETS["P11"].checks)
    assert met is True


def test_windows_alternate_abba_and_pool_per_side() -> None:
    from bench.mesh import build_p11_entry, pool_windows, window_order

    assert window_order(2) == ["single", "mesh", "mesh", "single"]
    assert window_order(3) == ["single", "mesh", "mesh", "single", "single", "mesh"]

    def window(done: int, served: str, **statuses: int) -> dict[str, Any]:
        return {
            "completed": done, "errors": sum(statuses.values()), "tokens": 48 * done, "window_tokens": 48.0 * done, "elapsed_s": 30.0,
            "statuses": {"200": done, **statuses}, "served_by_header": {served: done},
            "scheduler": {"forwarded_by_entry": done, "entry_forwarded_to": {"b": 2}, "forwarded_twice": 0},
        }  # fmt: skip

    # a host that slows down over the run: the lone node's first window is fast, its last slow
    lone = pool_windows([window(16, "a"), window(8, "a", **{"429": 1})])
    mesh = pool_windows([window(40, "a"), window(32, "b")])
    assert lone["completed"] == 24 and lone["elapsed_s"] == 60.0 and lone["tokens"] == lone["window_tokens"] == 24 * 48
    assert lone["statuses"] == {"200": 24, "429": 1} and lone["errors"] == 1
    assert mesh["served_by_header"] == {"a": 40, "b": 32} and mesh["per_window_completed"] == [40, 32]
    assert mesh["scheduler"] == {"forwarded_by_entry": 72, "entry_forwarded_to": {"b": 4}, "forwarded_twice": 0}
    e = build_p11_entry(
        {"single": lone, "mesh": mesh, "single_stream": lone, "mesh_stream": mesh, "failover": window(30, "a")},
        budget_method="cpu.max", cgroup_version=2, daemon_warnings={},
    )  # fmt: skip
    assert e["ratio"] == pytest.approx(3.0) and e["stream_ratio"] == pytest.approx(3.0)
    assert "single-mesh-mesh-single" in e["details"]["method"]
    assert pool_windows([])["completed"] == 0


def test_load_prompts_never_repeat_across_windows_and_keep_one_length() -> None:
    from bench.llm import count_prompt
    from bench.mesh import load_prompt_start

    starts = {load_prompt_start(seed, k, i) for seed in range(12) for k in range(21) for i in range(40)}
    assert len(starts) == 12 * 21 * 40  # no window, client or request repeats another's prompt
    assert {len(str(n)) for n in starts} == {8}
    assert len({len(count_prompt(n)) for n in starts}) == 1
    with pytest.raises(ValueError):
        load_prompt_start(90, 0, 0)


def test_engine_counters_from_metrics_and_the_work_between_snapshots() -> None:
    from bench.mesh import engine_work, parse_engine_counters

    page = "\n".join(
        [
            "# HELP llamacpp:n_decode_total decode calls",
            'llamacpp:n_decode_total{model="a"} 100',
            'llamacpp:n_decode_total{model="b"} 20',
            "llamacpp:n_busy_slots_per_decode 2.0",
            "llamacpp:tokens_predicted_total 480",
            "llamacpp:prompt_tokens_total 300",
            "llamacpp:kv_cache_tokens 12",
            "llamacpp:tokens_predicted_total not-a-number",
        ]
    )
    before = parse_engine_counters(page)
    assert before == {
        "n_decode_total": 120.0,
        "n_busy_slots_per_decode": 2.0,
        "tokens_predicted_total": 480.0,
        "prompt_tokens_total": 300.0,
    }
    after = {"n_decode_total": 220.0, "n_busy_slots_per_decode": 2.5, "tokens_predicted_total": 880.0, "prompt_tokens_total": 340.0}
    # busy slot-steps 240 -> 550 over 100 steps
    assert engine_work(before, after) == {"decode_steps": 100, "busy_slots_per_step": 3.1, "tokens_predicted": 400, "prompt_tokens": 40}
    assert engine_work(before, before)["busy_slots_per_step"] is None


def test_latency_summary_and_a_client_timeout_above_the_saturated_queue_wait() -> None:
    from bench.mesh import P11_REQUEST_TIMEOUT_S, P11_WAITING_PER_NODE, clients_for, latency_summary

    assert latency_summary([]) == {"p50": None, "p95": None, "max": None}
    assert latency_summary([3.0, 1.0, 2.0, 10.0]) == {"p50": 2.0, "p95": 10.0, "max": 10.0}
    # 21 clients on the two nodes left after the kill, 4 slots each, ~0.2 requests/s per node
    # (0.5 CPU): the mean wait is clients / throughput; a request retried from the dead node waits twice.
    mean_wait_s = clients_for(3, 4) / (2 * 0.2)
    assert clients_for(3, 4) == 3 * (4 + P11_WAITING_PER_NODE)
    assert 3 * mean_wait_s * 0.9 <= P11_REQUEST_TIMEOUT_S <= 600


# --------------------------------------------------------------------------- bench/cgroup.py


def test_quota_files_for_both_cgroup_versions() -> None:
    from bench.cgroup import quota_files

    assert quota_files(0.5, version=2) == {"cpu.max": "50000 100000"}
    v1 = quota_files(0.5, version=1)
    assert list(v1) == ["cpu.cfs_period_us", "cpu.cfs_quota_us"]  # the period first
    assert v1 == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}
    assert quota_files(1.5, version=2, period_us=200_000) == {"cpu.max": "300000 200000"}
    assert quota_files(0.001, version=1)["cpu.cfs_quota_us"] == "1000"  # the kernel's 1 ms floor
    with pytest.raises(ValueError):
        quota_files(0.0, version=2)
    with pytest.raises(ValueError):
        quota_files(0.5, version=3)


def test_parse_cpu_stat() -> None:
    from bench.cgroup import parse_cpu_stat

    text = "nr_periods 20\nnr_throttled 18\nthrottled_time 644536342\nbogus line here\nusage_usec x\n"
    assert parse_cpu_stat(text) == {"nr_periods": 20, "nr_throttled": 18, "throttled_time": 644536342}


def test_find_controller_prefers_v2_with_cpu_then_v1(tmp_path: Any) -> None:
    from bench.cgroup import Controller, find_controller

    assert find_controller(tmp_path) is None
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("memory pids\n")  # hybrid v2 without cpu
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert find_controller(tmp_path) == Controller(1, tmp_path / "cpu")
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "unified" / "cgroup.subtree_control").write_text("")
    assert find_controller(tmp_path) == Controller(2, tmp_path / "unified")
    assert (tmp_path / "unified" / "cgroup.subtree_control").read_text() == "+cpu"


def test_cpu_budget_writes_its_quota_and_empties_into_the_parent(tmp_path: Any) -> None:
    from bench.cgroup import Controller, CpuBudget

    (tmp_path / "cgroup.procs").write_text("")
    budget = CpuBudget("t", cpus=0.5, controller=Controller(1, tmp_path))
    with budget:
        assert (budget.path / "cpu.cfs_quota_us").read_text() == "50000"
        budget.add(4242)
        assert budget.pids() == [4242]
        assert "v1" in budget.method and "50000" in budget.method
    # a real cgroupfs would now rmdir the group; here the pid went back to the parent
    assert (tmp_path / "cgroup.procs").read_text() == "4242"


# --------------------------------------------------------------------------- bench/mesh_sim.py (pure parts)


def test_log_fit_recovers_a_log10_law() -> None:
    from bench.mesh_sim import log_fit

    pts = [(n, 1.0 + 2.0 * math.log10(n)) for n in (30, 100, 200)]
    fit = log_fit(pts)
    assert fit is not None
    assert fit["a"] == pytest.approx(1.0) and fit["b_per_decade"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert log_fit([(100, 1.0), (100, 2.0)]) is None  # one distinct N: no slope
    assert log_fit([(10, 3.0), (100, 3.0)]) == {"a": 3.0, "b_per_decade": 0.0, "r2": 1.0}


def test_gossip_rounds_and_expected_figures_grow_with_log_n() -> None:
    from bench.mesh_sim import expected_figures, gossip_rounds

    assert gossip_rounds(1, 3) == 0 and gossip_rounds(4, 3) == 1 and gossip_rounds(5, 3) == 2 and gossip_rounds(200, 3) == 4
    small = expected_figures(n=10, probe_interval_s=0.5, suspicion_mult=4, gossip_interval_s=0.2, gossip_nodes=3)
    big = expected_figures(n=100, probe_interval_s=0.5, suspicion_mult=4, gossip_interval_s=0.2, gossip_nodes=3)
    assert small["suspicion_floor_s"] == pytest.approx(2.0) and big["suspicion_floor_s"] == pytest.approx(4.0)
    assert big["detect_s"] - small["detect_s"] == pytest.approx(2.0)  # one decade: + mult x interval
    assert big["convergence_s"] > small["convergence_s"]


def test_sim_median_growth_summary_and_table() -> None:
    from bench.mesh_sim import format_table, growth_summary, median

    assert median([]) is None and median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 2.0]) == 1.5
    rows = [
        {"n": n, "timing": "lan", "convergence_s": 0.1 * math.log10(n), "detect_s": 2.0 * math.log10(n), "bytes_per_node_kbps": 0.5}
        for n in (30, 100, 200)
    ]
    g = growth_summary(rows)
    assert g["lan"]["detect_s"]["b_per_decade"] == pytest.approx(2.0)
    assert g["lan"]["convergence_s"]["b_per_decade"] == pytest.approx(0.1)
    text = format_table(rows)
    assert " 200 | lan" in text and text.count("\n") == 3


def test_p11_clients_scale_with_nodes_and_engine_slots() -> None:
    from bench.mesh import P11_WAITING_PER_NODE, clients_for, engine_slots

    assert clients_for(1, 1) == 1 + P11_WAITING_PER_NODE
    assert clients_for(3, 1) == 3 * clients_for(1, 1)
    assert clients_for(3, 4) == 3 * (4 + P11_WAITING_PER_NODE)
    assert clients_for(0, 0) == clients_for(1, 1)
    lines = ['{"event": "daemon_starting"}', "garbage", '{"model": "m", "slots": 2, "threads": 1, "event": "llm_started"}']
    assert engine_slots(lines) == 2
    assert engine_slots(lines[:2]) is None


def test_throughput_summary_also_compares_decoded_tokens() -> None:
    one = {"completed": 13, "tokens": 13 * 48, "elapsed_s": 30.0}
    three = {"completed": 40, "tokens": 40 * 48, "elapsed_s": 30.0}
    s = throughput_summary(one, three)
    assert s["tokens_ratio"] == pytest.approx(40 / 13) and s["mesh_tokens_per_s"] == pytest.approx(64.0)
    assert throughput_summary({"completed": 3, "elapsed_s": 30.0}, three)["tokens_ratio"] is None
