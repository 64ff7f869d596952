"""Real `mongarsd run` daemons in network namespaces: mDNS discovery, encrypted SWIM membership,
wrong-key outsider, SIGKILL detection, partition and heal, and forwarded requests.

Each daemon listens on 0.0.0.0:8642 inside its own namespace (so it needs an admin token first),
gossips on 8643, shares one cluster keyring (generated once, installed on the others). HTTP is
spoken with curl from inside the namespaces: on the namespace's loopback a daemon trusts its
local admin; towards another node the test uses that node's admin token.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mongarsd.mesh.gossip import LOCAL, failure_detection_bound_s
from tests.conftest import MODELS_DIR, REPO
from tests.netns.harness import NetnsLab

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

API_PORT = 8642
MEMBERSHIP_WITHIN_S = 15.0
READY_WITHIN_S = 60.0


def _keys_wired() -> bool:
    """Whether `mongarsd keys` is registered in the main CLI yet (else run mesh.cli directly)."""
    from mongarsd.cli import build_parser

    return "keys" in build_parser().format_help()


def cli(*args: str) -> str:
    """Run a mongarsd command on the host (state-dir files only, no network)."""
    module = "mongarsd" if args[0] not in ("keys", "peers") or _keys_wired() else "mongarsd.mesh.cli"
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0, f"mongarsd {' '.join(args)} -> {proc.returncode}: {proc.stderr}"
    return proc.stdout.strip()


class Node:
    """One daemon in namespace `index`."""

    def __init__(self, lab: NetnsLab, index: int, tmp: Path, *, key: str | None, models: bool = False) -> None:
        self.lab = lab
        self.index = index
        self.ip = lab.nodes[index].ip
        self.state_dir = tmp / f"n{index}"
        self.state_dir.mkdir(parents=True)
        self.token = cli("token", "create", "--user", "admin", "--role", "admin", "--state-dir", str(self.state_dir))
        if key is None:
            self.key = cli("keys", "generate", "--state-dir", str(self.state_dir))
        else:
            cli("keys", "install", key, "--state-dir", str(self.state_dir))
            self.key = key
        (tmp / "none.toml").write_text("")
        self.env = {
            "MONGARSD_CONFIG": str(tmp / "none.toml"),
            "MONGARSD_LOG__FORMAT": "json",
            "MONGARSD_LOG__LEVEL": "info",
            "MONGARSD_MESH__ENABLED": "true",
            "MONGARSD_MESH__TIMING": "local",
            "MONGARSD_INFERENCE__PRELOAD": "true" if models else "false",
            "MONGARSD_EMBED__PRELOAD": "false",
        }
        self.log_path = tmp / f"n{index}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        self.models_dir = MODELS_DIR

    def start(self) -> None:
        fh = self.log_path.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "mongarsd",
            "run",
            "--host",
            "0.0.0.0",
            "--port",
            str(API_PORT),
            "--state-dir",
            str(self.state_dir),
            "--models-dir",
            str(self.models_dir),
        ]
        self.proc = self.lab.popen(self.index, *cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()

    def curl(
        self, method: str, url: str, body: Any = None, *, token: str | None = None, timeout_s: float = 10.0
    ) -> tuple[int, dict[str, str], Any]:
        """Make an HTTP request from inside this node's namespace; return (status, headers, json)."""
        args = ["curl", "-sS", "-X", method, "-D", "-", "--max-time", str(timeout_s), url]
        if token:
            args += ["-H", f"Authorization: Bearer {token}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        proc = self.lab.run(self.index, *args, check=False, timeout=timeout_s + 5)
        if proc.returncode != 0:
            return 0, {}, None
        head, _, payload = proc.stdout.replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        try:
            doc = json.loads(payload) if payload.strip() else None
        except ValueError:
            doc = payload
        return status, headers, doc

    def local(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        return self.curl(method, f"http://127.0.0.1:{API_PORT}{path}", body, **kw)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WITHIN_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon n{self.index} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            status, _, doc = self.local("GET", "/api/v1/peer/hello", timeout_s=2)
            if status == 200 and self.local("GET", "/ready", timeout_s=2)[0] == 200:
                self.node_id = doc["node_id"]
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon n{self.index} not ready:\n{self.log()[-3000:]}")

    def members(self) -> dict[str, str]:
        """Return node id -> state as this node sees it ({} when unreachable)."""
        status, _, doc = self.local("GET", "/api/v1/peer/list", timeout_s=3)
        if status != 200:
            return {}
        return {m["node_id"]: m["state"] for m in doc["members"]}

    def alive(self) -> set[str]:
        return {n for n, s in self.members().items() if s == "alive"}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(cond: Callable[[], bool], timeout_s: float, what: str, nodes: list[Node]) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            views = {n.index: n.members() for n in nodes if n.proc is not None and n.proc.poll() is None}
            raise AssertionError(f"{what}: not within {timeout_s}s; views: {views}")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_daemons_form_a_mesh_refuse_outsiders_detect_kill_and_heal_partitions(netns_lab: Callable[[int], NetnsLab], tmp_path: Path) -> None:
    lab = netns_lab(4)
    first = Node(lab, 0, tmp_path, key=None)
    nodes = [first, Node(lab, 1, tmp_path, key=first.key), Node(lab, 2, tmp_path, key=first.key)]
    outsider = Node(lab, 3, tmp_path, key=None)  # its own, different cluster key
    assert outsider.key != first.key
    everyone = [*nodes, outsider]
    t_start = time.monotonic()
    for n in everyone:
        n.start()
    for n in everyone:
        n.wait_ready()
    t_ready = time.monotonic() - t_start
    ids = {n.node_id for n in nodes}
    assert len(ids) == 3 and outsider.node_id not in ids

    # Discovery (mDNS) -> join (encrypted push-pull) -> every node agrees on 3 alive members.
    t_join = wait_for(lambda: all(n.alive() == ids for n in nodes), MEMBERSHIP_WITHIN_S, "membership", everyone)
    print(f"\nall daemons ready {t_ready:.2f}s after spawn; membership agreed {t_join:.2f}s later ({t_ready + t_join:.2f}s from spawn)")

    # The outsider is refused: never a member anywhere, and it sees only itself.
    time.sleep(2.0)
    for n in nodes:
        assert outsider.node_id not in n.members()
    assert set(outsider.members()) == {outsider.node_id}

    # Members publish their API address and load; the list shows them; /metrics has mesh series.
    status, headers, doc = nodes[0].local("GET", "/api/v1/peer/list")
    assert status == 200 and headers.get("x-mongars-served-by") == nodes[0].node_id
    apis = {m["node_id"]: m["api"] for m in doc["members"]}
    assert apis[nodes[1].node_id] == f"http://{nodes[1].ip}:{API_PORT}"
    status, _, load = nodes[1].curl("GET", f"http://{nodes[2].ip}:{API_PORT}/api/v1/peer/load", token=nodes[2].token)
    assert status == 200 and load["scheduler_id"] == nodes[2].node_id
    status, _, _ = nodes[1].curl("GET", f"http://{nodes[2].ip}:{API_PORT}/api/v1/peer/load")
    assert status == 401  # not loopback there, no token
    metrics = nodes[0].lab.run(0, "curl", "-sS", f"http://127.0.0.1:{API_PORT}/metrics").stdout
    assert 'mongarsd_mesh_members{state="alive"} 3.0' in metrics

    # Partition {0} | {1, 2}: each side declares the other dead; healing re-merges everyone.
    lab.partition([[0], [1, 2]])
    wait_for(
        lambda: nodes[0].alive() == {nodes[0].node_id} and nodes[1].alive() == {nodes[1].node_id, nodes[2].node_id},
        failure_detection_bound_s(LOCAL, 3) + 5,
        "partition detected",
        nodes,
    )
    lab.heal_all()
    t_heal = wait_for(lambda: all(n.alive() == ids for n in nodes), MEMBERSHIP_WITHIN_S, "partition healed", nodes)
    print(f"partition healed in {t_heal:.2f}s")

    # SIGKILL one daemon (no leave): the others declare it dead within the LOCAL preset's bound.
    bound = failure_detection_bound_s(LOCAL, 3)
    victim = nodes[2]
    victim.kill(signal.SIGKILL)
    t_dead = wait_for(
        lambda: all(n.members().get(victim.node_id) in ("dead", None) for n in nodes[:2]),
        bound + 2.0,
        "kill detected",
        nodes[:2],
    )
    print(f"SIGKILL detected in {t_dead:.2f}s (LOCAL bound {bound:.2f}s)")
    assert t_dead <= bound + 1.0

    # A graceful leave through the CLI/API: the peer sees `left`, not a failure.
    status, _, doc = nodes[1].local("POST", "/api/v1/peer/leave", {})
    assert status == 200 and doc["status"] == "left"
    wait_for(lambda: nodes[0].members().get(nodes[1].node_id) == "left", 5.0, "leave seen", nodes[:1])


GEN_MODEL = "smollm2-135m-instruct:q4_1"


def test_generation_is_forwarded_to_a_node_with_the_model_and_fails_over_on_kill(
    netns_lab: Callable[[int], NetnsLab], tmp_path: Path
) -> None:
    """Node 0 has no model files; nodes 1 and 2 have the default model loaded. Requests at node 0
    are served by a peer (signed, hop 1); when that peer is SIGKILLed, the next request fails
    over to the other before any byte reaches the client."""
    if not (MODELS_DIR / "SmolLM2-135M-Instruct-Q4_1.gguf").exists():
        pytest.skip("default model not present in models/")
    lab = netns_lab(3)
    entry = Node(lab, 0, tmp_path, key=None)
    empty = tmp_path / "no-models"
    empty.mkdir()
    entry.models_dir = empty
    workers = [Node(lab, i, tmp_path, key=entry.key, models=True) for i in (1, 2)]
    nodes = [entry, *workers]
    for n in nodes:
        n.start()
    for n in nodes:
        n.wait_ready()
    ids = {n.node_id for n in nodes}
    wait_for(lambda: all(n.alive() == ids for n in nodes), MEMBERSHIP_WITHIN_S, "membership", nodes)
    worker_ids = {w.node_id for w in workers}

    # wait until the workers' gossip says the model is loaded
    def loaded_everywhere() -> bool:
        status, _, doc = entry.local("GET", "/api/v1/peer/list")
        return status == 200 and all(GEN_MODEL in m["models_loaded"] for m in doc["members"] if m["node_id"] in worker_ids)

    wait_for(loaded_everywhere, 30.0, "models loaded", nodes)

    req = {"model": GEN_MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
    status, headers, doc = entry.local("POST", "/v1/chat/completions", req, timeout_s=60)
    assert status == 200, doc
    served = headers.get("x-mongars-served-by")
    assert served in worker_ids
    assert doc["choices"][0]["message"]["content"] is not None

    # Streaming passes through (SSE) from the peer.
    args = [
        "curl",
        "-sS",
        "-N",
        "-D",
        "-",
        "--max-time",
        "60",
        f"http://127.0.0.1:{API_PORT}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        json.dumps({**req, "stream": True}),
    ]
    out = lab.run(0, *args, timeout=65).stdout
    assert "x-mongars-served-by:" in out.lower() and "data: [DONE]" in out
    assert out.count("data: ") >= 2

    # A non-streamed request in flight on a worker that is SIGKILLed mid-generation still succeeds:
    # the forward failed before any byte reached the client, so it is retried on the other worker.
    counting = {**req, "messages": [{"role": "user", "content": "Count from 1 to 300, comma separated: 1, 2, 3,"}], "max_tokens": 400}
    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(r=entry.local("POST", "/v1/chat/completions", counting, timeout_s=150)))
    client.start()

    def generating_worker() -> Node | None:
        for w in workers:
            text = lab.run(w.index, "curl", "-sS", f"http://127.0.0.1:{API_PORT}/metrics", check=False, timeout=10).stdout
            for line in text.splitlines():
                if line.startswith("llamacpp:requests_processing") and float(line.rsplit(" ", 1)[1]) > 0:
                    return w
        return None

    deadline = time.monotonic() + 30
    busy = None
    while busy is None and time.monotonic() < deadline and client.is_alive():
        busy = generating_worker()
    assert busy is not None, "no worker was seen generating the forwarded request"
    survivor = next(w for w in workers if w is not busy)
    busy.kill(signal.SIGKILL)
    client.join(timeout=160)
    assert not client.is_alive()
    status, headers, doc = result["r"]
    assert status == 200, doc
    assert headers.get("x-mongars-served-by") == survivor.node_id
    assert doc["choices"][0]["message"]["content"]

    # The next request, before gossip has declared the dead node failed, is served too.
    other = survivor
    t0 = time.monotonic()
    status, headers, doc = entry.local("POST", "/v1/chat/completions", req, timeout_s=60)
    elapsed = time.monotonic() - t0
    assert status == 200, doc
    assert headers.get("x-mongars-served-by") == other.node_id
    metrics = lab.run(0, "curl", "-sS", f"http://127.0.0.1:{API_PORT}/metrics").stdout
    print(
        f"\nfailover request answered in {elapsed:.2f}s; forward failures: {[m for m in metrics.splitlines() if m.startswith('mongarsd_mesh_forward_failures_total')]}"
    )
