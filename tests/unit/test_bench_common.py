"""Pure parts of the bench harness: target evaluation, entries, JSON shape, statistics, parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.chart import chart_rows
from bench.common import (
    TARGET_IDS,
    TARGETS,
    Check,
    Dechunker,
    Proc,
    Skip,
    StreamResult,
    chunk_text,
    dump_json,
    evaluate,
    finalize,
    format_table,
    histogram_delta,
    histogram_quantile,
    log_event,
    machine_description,
    make_entry,
    paired_ratio,
    parse_histogram,
    parse_sse_response,
    present,
    safe_ratio,
    skipped_entry,
    target_text,
)
from bench.llm import parse_llama_bench
from bench.run import parse_only

REQUIRED_KEYS = {"value", "reference", "ratio", "target", "unit", "machine"}


def test_every_design_target_has_a_spec() -> None:
    assert tuple(f"P{i}" for i in range(1, 18)) == TARGET_IDS  # DESIGN §9: P1-P16, and P17 (the mind's work beside chats)
    assert set(TARGETS) == set(TARGET_IDS)
    assert target_text("P1") == (
        "ratio >= 0.95; vs_llama_server >= 1; four_slots_vs_llama_server >= 1; defaults_ratio >= 0.95; defaults_vs_llama_server >= 1"
    )
    assert target_text("P4") == "ratio >= 0.95; defaults_ratio >= 0.95"
    assert target_text("P13") == "ratio >= 0.8"
    assert target_text("P3") == "delta_ms <= 10"
    assert target_text("P8") == "value <= 80; loaded_rss_mb <= 300"


@pytest.mark.parametrize(
    ("check", "observed", "ok"),
    [
        (Check("ratio", ">=", 0.95), 0.95, True),
        (Check("ratio", ">=", 0.95), 0.949, False),
        (Check("value", "<=", 20.0), 20.0, True),
        (Check("value", "<=", 20.0), 20.01, False),
    ],
)
def test_check_boundaries(check: Check, observed: float, ok: bool) -> None:
    assert check.passes(observed) is ok


def test_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError, match="operator"):
        Check("ratio", "==", 1.0).passes(1.0)


def test_safe_ratio() -> None:
    assert safe_ratio(90.0, 100.0) == pytest.approx(0.9)
    assert safe_ratio(None, 100.0) is None
    assert safe_ratio(90.0, 0.0) is None
    assert safe_ratio(float("nan"), 1.0) is None


def test_make_entry_computes_ratio_and_keeps_extras() -> None:
    e = make_entry("P3", value=30.0, reference=25.0, delta_ms=5.0, details={"n": 3})
    assert e["ratio"] == pytest.approx(1.2)
    assert e["delta_ms"] == 5.0
    assert e["target"] == "delta_ms <= 10"
    assert e["unit"] == "ms"
    assert e["details"] == {"n": 3}


def test_evaluate_all_checks_must_pass() -> None:
    checks = TARGETS["P6"].checks
    assert evaluate({"ratio": 0.95, "int8_speedup": 2.0}, checks)[0] is True
    assert evaluate({"ratio": 0.95, "int8_speedup": 1.2}, checks)[0] is False
    met, rows = evaluate({"ratio": 0.95}, checks)
    assert met is None  # a missing field is unknown, not a pass
    assert rows[1] == {"check": "int8_speedup >= 1.5", "observed": None, "met": None}
    # one failing check decides even when another is unknown
    assert evaluate({"ratio": 0.5}, checks)[0] is False


def test_p3_is_judged_on_the_delta_not_the_ratio() -> None:
    slow_ratio_small_delta = make_entry("P3", value=40.0, reference=32.0, delta_ms=8.0)
    out = finalize({"P3": slow_ratio_small_delta}, machine="m", measured_at="t")
    assert out["P3"]["ratio"] == pytest.approx(1.25)
    assert out["P3"]["met"] is True
    out = finalize({"P3": make_entry("P3", value=50.0, reference=32.0, delta_ms=18.0)}, machine="m", measured_at="t")
    assert out["P3"]["met"] is False


def test_finalize_shape_for_every_id(tmp_path: Path) -> None:
    results = {
        "P1": make_entry("P1", value=80.0, reference=87.0),
        "P7": {"value": 4.2, "reference": 40.0, "unit": "ms", "recall_at_10": 1.0},  # a teammate's bare dict
        "P9": skipped_entry("P9", "no models"),
    }
    out = finalize(results, machine="AMD EPYC, 2 cores, x86_64", measured_at="2025-01-01T00:00:00Z")
    assert list(out) == list(TARGET_IDS)
    for pid, entry in out.items():
        assert set(entry) >= REQUIRED_KEYS, pid
        assert entry["machine"] == "AMD EPYC, 2 cores, x86_64"
        assert entry["target"] == target_text(pid)
    assert out["P1"]["ratio"] == pytest.approx(80 / 87, abs=1e-4)
    assert out["P1"]["met"] is False
    assert out["P7"]["ratio"] == pytest.approx(0.105)
    assert out["P7"]["met"] is True
    assert out["P9"]["met"] is None and out["P9"]["skipped"] == "no models"
    assert out["P2"]["skipped"]  # never measured: present and marked skipped
    path = tmp_path / "r" / "latest.json"
    dump_json(out, path)
    assert json.loads(path.read_text()) == out


def test_format_table_lists_every_id_and_status() -> None:
    out = finalize(
        {
            "P1": make_entry(
                "P1",
                value=90.0,
                reference=87.0,
                vs_llama_server=1.05,
                four_slots_vs_llama_server=1.03,
                defaults_ratio=0.97,
                defaults_vs_llama_server=1.02,
            ),
            "P6": make_entry("P6", value=100.0, reference=110.0, int8_speedup=1.2),
        },
        machine="m",
        measured_at="t",
    )
    table = format_table(out)
    lines = table.splitlines()
    assert len(lines) == 2 + len(TARGET_IDS)
    assert any(
        line.startswith("P1 ")
        and line.endswith("met (vs_llama_server=1.05, four_slots_vs_llama_server=1.03, defaults_ratio=0.97, defaults_vs_llama_server=1.02)")
        for line in lines
    )
    assert any(line.startswith("P6 ") and "MISSED" in line and "int8_speedup=1.2" in line for line in lines)
    assert any(line.startswith("P2 ") and "skipped" in line for line in lines)


def test_chart_rows_scale_to_threshold() -> None:
    out = finalize(
        {"P12": make_entry("P12", value=10.0, reference=None), "P8": make_entry("P8", value=60.0, reference=None, loaded_rss_mb=330.0)},
        machine="m",
        measured_at="t",
    )
    rows = {label: (scaled, met) for label, scaled, met, _ in chart_rows(out)}
    assert rows["P12"] == (pytest.approx(0.5), True)
    assert rows["P8 value"] == (pytest.approx(0.75), True)
    assert rows["P8 loaded_rss_mb"] == (pytest.approx(1.1), False)
    assert rows["P1 ratio"] == (None, None)


def test_chart_p3_is_scaled_by_its_allowance() -> None:
    out = finalize({"P3": make_entry("P3", value=90.0, reference=91.0, delta_ms=-1.0)}, machine="m", measured_at="t")
    rows = {label: (scaled, met) for label, scaled, met, _ in chart_rows(out)}
    assert rows["P3"] == (pytest.approx(90.0 / 101.0), True)


PROM = """# HELP mongarsd_event_loop_lag_seconds Event loop scheduling lag.
# TYPE mongarsd_event_loop_lag_seconds histogram
mongarsd_event_loop_lag_seconds_bucket{le="0.001"} 50.0
mongarsd_event_loop_lag_seconds_bucket{le="0.01"} 90.0
mongarsd_event_loop_lag_seconds_bucket{le="0.1"} 100.0
mongarsd_event_loop_lag_seconds_bucket{le="+Inf"} 100.0
mongarsd_event_loop_lag_seconds_count 100.0
other_bucket{le="0.1"} 7.0
"""


def test_parse_histogram_and_quantile() -> None:
    buckets = parse_histogram(PROM, "mongarsd_event_loop_lag_seconds")
    assert buckets == [(0.001, 50.0), (0.01, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 9 / 10)
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_histogram_delta_counts_only_new_observations() -> None:
    before = [(0.01, 10.0), (math.inf, 10.0)]
    after = [(0.01, 15.0), (math.inf, 20.0)]
    delta = histogram_delta(after, before)
    assert delta == [(0.01, 5.0), (math.inf, 10.0)]
    assert histogram_quantile(0.99, delta) == 0.01  # beyond the last finite bucket


def test_machine_description() -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC   7B13 64-Core Processor\n"
    assert machine_description(cpuinfo, 2, "x86_64") == "AMD EPYC 7B13 64-Core Processor, 2 cores, x86_64"
    assert machine_description("Hardware\t: BCM2835\nModel\t: Raspberry Pi 5 Model B Rev 1.0\n", 4, "aarch64").startswith("BCM2835")
    assert machine_description("", 1, "riscv64") == "unknown CPU, 1 cores, riscv64"


def test_stream_decode_rate_and_chunk_text() -> None:
    r = StreamResult(t_send=0.0, t_first=0.1, t_last=1.1, chunks=50, usage={"completion_tokens": 101, "prompt_tokens": 9})
    assert r.ttft_s == pytest.approx(0.1)
    assert r.decode_rate() == pytest.approx(100.0)
    assert r.prompt_tokens == 9
    assert StreamResult(t_send=0.0, t_first=0.1, t_last=0.1, chunks=1).decode_rate() is None
    assert chunk_text({"choices": [{"text": "ab"}]}) == "ab"
    assert chunk_text({"choices": [{"delta": {"content": "c"}}]}) == "c"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [], "usage": {}}) == ""


def test_parse_llama_bench_json() -> None:
    out = "build: x\n" + json.dumps(
        [
            {"n_prompt": 512, "n_gen": 0, "avg_ts": 247.1, "stddev_ts": 2.0, "samples_ts": [245.0, 249.2], "build_commit": "abc"},
            {"n_prompt": 0, "n_gen": 128, "avg_ts": 87.3, "stddev_ts": 0.5, "samples_ts": [87.0, 87.6], "build_commit": "abc"},
        ]
    )
    ref = parse_llama_bench(out)
    assert ref["pp"] == 247.1 and ref["tg"] == 87.3
    assert ref["tg_samples"] == [87.0, 87.6]


def test_parse_only() -> None:
    assert parse_only(None) == set(TARGET_IDS)
    assert parse_only("p1, P6") == {"P1", "P6"}
    with pytest.raises(SystemExit, match="P18"):
        parse_only("P18")


def test_p7_needs_both_latency_and_recall() -> None:
    fast_but_lossy = make_entry("P7", value=4.0, reference=80.0, recall_at_10=0.9)
    assert finalize({"P7": fast_but_lossy}, machine="m", measured_at="t")["P7"]["met"] is False
    exact = make_entry("P7", value=4.0, reference=80.0, recall_at_10=1.0)
    assert finalize({"P7": exact}, machine="m", measured_at="t")["P7"]["met"] is True


def test_log_event_returns_the_last_matching_json_line(tmp_path: Path) -> None:
    import subprocess

    log = tmp_path / "daemon.log"
    log.write_text(
        "plain text mentioning llm_started\n"
        + json.dumps({"event": "llm_started", "slots": 1})
        + "\n"
        + "{not json llm_started\n"
        + json.dumps({"event": "other", "note": "llm_started"})
        + "\n"
        + json.dumps({"event": "llm_started", "slots": 4, "kv_unified": True})
        + "\n"
    )
    proc = Proc(proc=subprocess.Popen(["true"]), port=1, log_path=log, started_at=0.0)
    proc.proc.wait()
    assert log_event(proc, "llm_started") == {"event": "llm_started", "slots": 4, "kv_unified": True}
    assert log_event(proc, "embed_loaded") is None
    log.unlink()
    assert log_event(proc, "llm_started") is None


def test_paired_ratio_is_the_median_of_the_reps_ratios_and_skips_missing_pairs() -> None:
    # the machine slowed down 30 % half way: each pair keeps its ratio, the medians do not
    ours = [95.0, 96.0, 66.5, 67.2, 97.0]
    theirs = [100.0, 100.0, 70.0, 70.0, 100.0]
    assert paired_ratio(ours, theirs) == pytest.approx(0.96)
    assert paired_ratio([1.0, None, 3.0], [2.0, 2.0, None]) == pytest.approx(0.5)
    assert paired_ratio([1.0], [0.0]) is None
    assert paired_ratio([], []) is None
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])
    assert present([1.0, None, 2.0]) == [1.0, 2.0]


def _chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_dechunker_decodes_chunks_split_anywhere() -> None:
    raw = _chunked(b"data: one\n\n", b"data: two and more\n\n")
    for cut in range(1, len(raw)):
        d = Dechunker()
        assert d.feed(raw[:cut]) + d.feed(raw[cut:]) == b"data: one\n\ndata: two and more\n\n"
        assert d.done


def test_parse_sse_response_times_each_event_by_the_piece_that_completed_it() -> None:
    ev = [
        b'data: {"choices":[{"text":"Hel","finish_reason":null}]}\n\n',
        b'data: {"choices":[{"text":"lo","finish_reason":null}]}\n\n',
        b'data: {"choices":[{"text":"","finish_reason":"length"}],"timings":{"predicted_n":2}}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n',
        b"data: [DONE]\n\n",
    ]
    raw = HEAD + _chunked(*ev)
    first_end = raw.index(b"Hel") + 30  # the first event ends inside the second piece
    pieces = [(1.0, raw[: first_end - 10]), (2.0, raw[first_end - 10 : first_end + 40]), (3.0, raw[first_end + 40 :])]
    res = parse_sse_response(StreamResult(t_send=0.5), pieces, "POST v1/completions")
    assert (res.status, res.text, res.chunks, res.finish_reason) == (200, "Hello", 2, "length")
    assert (res.t_first, res.t_last) == (2.0, 3.0)
    assert res.completion_tokens == 2 and res.timings == {"predicted_n": 2}
    assert res.decode_rate() == pytest.approx(1.0)


def test_parse_sse_response_reads_an_unchunked_body_and_refuses_errors() -> None:
    body = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\ndata: [DONE]\n\n'
    res = parse_sse_response(StreamResult(t_send=0.0), [(1.0, b"HTTP/1.1 200 OK\r\n\r\n" + body)], "POST x")
    assert res.text == "Hi" and res.t_first == 1.0
    err = b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 20\r\n\r\n" + b'{"error":"busy now"}'
    with pytest.raises(Skip, match=r"POST x answered 429: .*busy now"):
        parse_sse_response(StreamResult(t_send=0.0), [(1.0, err)], "POST x")
    with pytest.raises(Skip, match="ended before its headers"):
        parse_sse_response(StreamResult(t_send=0.0), [(1.0, b"HTTP/1.1 200 OK\r\n")], "POST x")
