"""SIGTERM with a generation in flight: the request completes, then the daemon exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from tests.conftest import Http, http, requires_models, start_daemon

pytestmark = requires_models()


def test_sigterm_drains_an_in_flight_generation(tmp_path: Path) -> None:
    # A long drain bound: the point is that the request completes, however slow this machine is today.
    d = start_daemon(tmp_path, models=True, env={"MONGARSD_SERVER__DRAIN_TIMEOUT_S": "90"})
    try:
        result: dict[str, Http] = {}
        body = {"model": "smollm2-135m-instruct:q4_1", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}

        def call() -> None:
            result["r"] = http("POST", d.url + "/v1/completions", body, timeout=120)

        t = threading.Thread(target=call, name="drain-client")
        t.start()
        # Wait until the request is really being served before signalling.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if d.get("/api/v1/status").json()["inflight_requests"] >= 2:  # the status call itself + the generation
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the generation never started")
        d.proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert not t.is_alive()
        r = result["r"]
        assert r.status == 200, r.body[:300]
        assert r.json()["usage"]["completion_tokens"] > 0
        assert d.proc.wait(timeout=60) == 0
        # Once draining began, the listening socket was closed: new requests are refused.
        try:
            refused = http("GET", d.url + "/health", timeout=2).status != 200
        except OSError:
            refused = True
        assert refused
    finally:
        d.stop()
