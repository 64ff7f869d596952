"""P10 simulation: N GossipNodes in one process over the in-memory network, on a virtual clock.

    .venv/bin/python -m bench.mesh_sim [--sizes 30,100,200] [--timings lan,memberlist] [--json out.json]

The real protocol code (GossipNode, encryption, signatures, Lifeguard) runs unchanged over
`transport.InMemoryNetwork` (seeded per-packet delay, every packet sealed and opened). The
event loop's clock is virtual: when nothing is ready, it jumps to the next timer instead of
sleeping (`VirtualTimeLoop`). So the figures are protocol time with infinitely fast CPUs, the
same from run to run and from machine to machine (as Serf's convergence simulator), and a 200-
node cluster costs only the CPU its packets take, not 200 nodes' worth of wall-clock seconds.

Per N and timing preset: join (sequential push-pull with one seed) until every node sees all N
alive; convergence = `set_local_state` on one node until ceil(99.99 %) of the others hold the
new incarnation (CONVERGENCE_REPS origins); bytes = UDP bytes sent+received per node over an
idle window; detection = `async_kill` of one node (no LEAVE) until every other node holds it
dead (FAILURE_REPS victims). The growth with N is fitted as value = a + b * log10(N).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import selectors
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

SIZES: Final = (30, 100, 200)
TIMINGS: Final = ("lan",)
CONVERGENCE_REPS: Final = 3
FAILURE_REPS: Final = 2
FRACTION: Final = 0.9999
DELAY_S: Final = (0.0003, 0.002)  # one-way packet delay on a LAN
POLL_S: Final = 0.02  # virtual seconds between checks of the nodes' views
JOIN_POLL_S: Final = 0.5  # the all-alive check is O(N^2)
JOIN_TIMEOUT_S: Final = 240.0  # virtual
CONVERGENCE_TIMEOUT_S: Final = 30.0  # virtual
FAILURE_TIMEOUT_S: Final = 90.0  # virtual
BYTES_WINDOW_S: Final = 5.0  # virtual
SETTLE_S: Final = 2.0  # virtual
STATE_KEY: Final = "bench_v"


# --------------------------------------------------------------------------- pure parts


def needed_observers(n_others: int, fraction: float = FRACTION) -> int:
    """How many of n_others must have seen an update to count as `fraction` reached (pure)."""
    return min(n_others, math.ceil(fraction * n_others - 1e-9))


def log_fit(points: Sequence[tuple[int, float]]) -> dict[str, float] | None:
    """Least-squares fit of value = a + b * log10(n); None with fewer than two distinct n (pure)."""
    pts = [(math.log10(n), v) for n, v in points if n > 0 and math.isfinite(v)]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for _, y in pts)
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in pts)
    return {"a": round(a, 3), "b_per_decade": round(b, 3), "r2": round(1.0 - ss_res / ss_tot, 3) if ss_tot > 0 else 1.0}


def gossip_rounds(n: int, fanout: int) -> int:
    """Rounds for an epidemic with `fanout` to reach n nodes, ~log_{fanout+1}(n) (pure, SWIM §5)."""
    if n <= 1:
        return 0
    return math.ceil(math.log(n) / math.log(fanout + 1))


def expected_figures(
    *, n: int, probe_interval_s: float, suspicion_mult: int, gossip_interval_s: float, gossip_nodes: int
) -> dict[str, float]:
    """Back-of-envelope convergence and detection for n nodes (pure).

    Convergence ~ one gossip round per epidemic generation. Detection ~ the first failed probe
    (about one interval: someone probes the victim every interval on average, then the probe
    waits the rest of it) + the Lifeguard suspicion floor, suspicion_mult x max(1, log10 n) x
    probe interval (reached once two members confirm), + one gossip round for the last nodes.
    """
    rounds = gossip_rounds(n, gossip_nodes)
    floor = suspicion_mult * max(1.0, math.log10(max(1, n))) * probe_interval_s
    return {
        "convergence_s": round(rounds * gossip_interval_s, 3),
        "suspicion_floor_s": round(floor, 3),
        "detect_s": round(probe_interval_s * 1.5 + floor + gossip_interval_s, 3),
    }


def median(xs: Sequence[float]) -> float | None:
    """Median of the samples, None when empty (pure)."""
    data = sorted(xs)
    if not data:
        return None
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def growth_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per timing, the log10(N) fits of convergence and detection over the simulated sizes (pure)."""
    out: dict[str, Any] = {}
    for timing in sorted({str(r["timing"]) for r in rows}):
        mine = [r for r in rows if r["timing"] == timing]
        out[timing] = {
            key: log_fit([(int(r["n"]), float(r[key])) for r in mine if r.get(key) is not None]) for key in ("convergence_s", "detect_s")
        }
    return out


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render the simulation rows as a text table (pure)."""

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = ["   N | timing     | conv (s) exp  | detect (s) exp  floor | KB/s/node | wall s"]
    for r in rows:
        e = r.get("expected", {})
        lines.append(
            f"{r['n']:>4} | {r['timing']:<10} | {f(r.get('convergence_s')):>8} {f(e.get('convergence_s')):>4} | "
            f"{f(r.get('detect_s')):>10} {f(e.get('detect_s')):>4} {f(e.get('suspicion_floor_s')):>6} | "
            f"{f(r.get('bytes_per_node_kbps')):>9} | {f(r.get('wall_s')):>6}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- virtual clock


class _SkipAheadSelector(selectors.DefaultSelector):
    """Poll without blocking; when nothing is ready, advance the owner's virtual clock instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout is not None and timeout > 0:
            self.now += timeout
        elif not events and timeout is None:  # no timer at all: only a real event can wake us
            events = super().select(0.05)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time() is virtual: idle waits take no wall-clock time (simulation only)."""

    def __init__(self) -> None:
        self._vsel = _SkipAheadSelector()
        super().__init__(self._vsel)

    def time(self) -> float:
        return self._vsel.now


# --------------------------------------------------------------------------- one cluster


async def _async_wait(pred: Callable[[], bool], timeout_s: float, poll_s: float = POLL_S) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


async def async_simulate(n: int, timing_name: str, *, seed: int = 1, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Simulate one cluster of n nodes with the named preset; return its figures (virtual seconds)."""
    from nacl.signing import SigningKey

    from mongarsd.mesh.gossip import PRESETS, GossipNode
    from mongarsd.mesh.identity import NodeIdentity
    from mongarsd.mesh.keyring import Keyring
    from mongarsd.mesh.transport import InMemoryNetwork

    timing = PRESETS[timing_name]
    loop = asyncio.get_running_loop()
    wall0 = time.monotonic()
    rng = random.Random(seed * 1000 + n)
    net = InMemoryNetwork(seed=rng.randrange(2**31), delay_s=DELAY_S)
    key = rng.randbytes(32)
    nodes = [
        GossipNode(
            identity=NodeIdentity(SigningKey(rng.randbytes(32))),
            keyring=Keyring(key),
            transport=net.transport(f"10.{i // 250}.{i % 250}.1"),
            cluster_label="sim",
            timing=timing,
            state={STATE_KEY: 0},
            rng=random.Random(rng.random()),
        )
        for i in range(n)
    ]
    out: dict[str, Any] = {"n": n, "timing": timing_name, "seed": seed}
    try:
        for node in nodes:
            await node.async_start()
            # started at one virtual instant, every node would probe in lockstep: spread the phases
            await asyncio.sleep(rng.uniform(0.0, 2.0 * timing.probe_interval_s / n))
        t_join = loop.time()
        for node in nodes[1:]:
            if await node.async_join([nodes[0].addr]) != 1:
                out["join_failures"] = out.get("join_failures", 0) + 1

        def all_alive() -> bool:
            return all(sum(1 for m in node._members.values() if m.state.name == "ALIVE") >= n for node in nodes)

        joined = await _async_wait(all_alive, JOIN_TIMEOUT_S, poll_s=JOIN_POLL_S)
        out["membership_s"] = round(loop.time() - t_join, 2) if joined else None
        if not joined:
            out["error"] = f"membership did not converge within {JOIN_TIMEOUT_S:.0f} virtual s"
            return out
        await asyncio.sleep(SETTLE_S)
        log(f"  sim N={n} {timing_name}: joined in {out['membership_s']} virtual s ({time.monotonic() - wall0:.1f} s wall)")

        conv: list[float] = []
        for rep in range(1, CONVERGENCE_REPS + 1):
            origin = nodes[rng.randrange(n)]
            t0 = loop.time()
            origin.set_local_state({STATE_KEY: rep})
            want = origin.incarnation
            need = needed_observers(n - 1)

            def reached(origin: GossipNode = origin, want: int = want, need: int = need) -> bool:
                seen = 0
                for node in nodes:
                    if node is not origin:
                        m = node._members.get(origin.node_id)
                        seen += m is not None and m.incarnation >= want
                return seen >= need

            if await _async_wait(reached, CONVERGENCE_TIMEOUT_S):
                conv.append(loop.time() - t0)
            await asyncio.sleep(1.0)
        out["convergence_samples_s"] = [round(c, 3) for c in conv]
        out["convergence_s"] = None if (c := median(conv)) is None else round(c, 3)

        before = {nd.node_id: nd.metrics() for nd in nodes}
        await asyncio.sleep(BYTES_WINDOW_S)
        after = {nd.node_id: nd.metrics() for nd in nodes}
        total = sum(
            after[k]["bytes_sent"] - before[k]["bytes_sent"] + after[k]["bytes_received"] - before[k]["bytes_received"] for k in after
        )
        out["bytes_per_node_kbps"] = round(total / n / BYTES_WINDOW_S / 1000.0, 3)

        detect: list[float] = []
        live = list(nodes)
        for k in range(min(FAILURE_REPS, max(0, n - 2))):
            victim = live.pop(rng.randrange(1, len(live)))  # never the seed: it is just one more node
            t0 = loop.time()
            await victim.async_kill()

            def all_dead(victim: GossipNode = victim, live: list[GossipNode] = live) -> bool:
                for node in live:
                    m = node._members.get(victim.node_id)
                    if m is None or m.state.name not in ("DEAD", "LEFT"):
                        return False
                return True

            if await _async_wait(all_dead, FAILURE_TIMEOUT_S):
                detect.append(loop.time() - t0)
            log(f"  sim N={n} {timing_name}: crash {k + 1} detected by all in {detect[-1] if detect else None}")
            await asyncio.sleep(2.0)
        out["detect_samples_s"] = [round(d, 3) for d in detect]
        out["detect_s"] = None if (d := median(detect)) is None else round(d, 3)
        out["refutations"] = sum(int(nd.metrics()["refutations"]) for nd in live)
        out["expected"] = expected_figures(
            n=n,
            probe_interval_s=timing.probe_interval_s,
            suspicion_mult=timing.suspicion_mult,
            gossip_interval_s=timing.gossip_interval_s,
            gossip_nodes=timing.gossip_nodes,
        )
        out["virtual_s"] = round(loop.time(), 1)
        return out
    finally:
        for node in nodes:
            await node.async_kill()
        net.close()
        out["wall_s"] = round(time.monotonic() - wall0, 1)


def simulate(n: int, timing_name: str, *, seed: int = 1, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Run one simulation on a fresh virtual-time loop (blocking; the CPU it takes is real)."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(async_simulate(n, timing_name, seed=seed, log=log))


def run_all(sizes: Sequence[int] = SIZES, timings: Sequence[str] = TIMINGS, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Simulate every (timing, N); return {"rows": [...], "growth": {...}} (blocking)."""
    rows = []
    for timing in timings:
        for n in sizes:
            rows.append(simulate(n, timing, log=log))
    return {"rows": rows, "growth": growth_summary(rows)}


def main(argv: list[str] | None = None) -> int:
    import logging

    import structlog

    parser = argparse.ArgumentParser(prog="python -m bench.mesh_sim", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--timings", default=",".join(TIMINGS))
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    args = parser.parse_args(argv)
    # the nodes log every suspicion (info) and the host's clock state (warning) each: noise at N = 200
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res = run_all([int(s) for s in args.sizes.split(",")], [t.strip() for t in args.timings.split(",")], log=log)
    print(format_table(res["rows"]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
