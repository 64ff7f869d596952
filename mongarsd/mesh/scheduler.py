"""Pure scheduling: which node runs a whole request (never a model sharded over the LAN).

Candidates are this node plus alive peers that have the model (loaded, or on disk and loadable)
and whose breaker is not open. Nodes with the model already loaded come first; within a tier
the lowest expected completion time wins, where

    expected = (1 + (queue_depth + busy_slots - finished + pending) / slots) * expected_tokens / tokens_per_s

(`pending` = requests this node forwarded there that the peer's gossiped state cannot show yet;
`finished` = requests of ours that the state still shows running, although their answers came back).
This node wins ties within `tie_margin` (relative): forwarding costs a LAN round trip and the
peer's numbers are up to a second old. A request that already made `hop_limit` hops runs here.
Unlike the original DistributedScheduler, which ran everything locally and broadcast results,
the result is an ordered list: the first node serves, the next ones are the failover order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

DEFAULT_TOKENS_PER_S: Final = 10.0  # assumed for a node that has not measured itself yet
DEFAULT_EXPECTED_TOKENS: Final = 128
TIE_MARGIN: Final = 0.15  # relative: local wins unless a peer is > 15 % faster
THROTTLED_FACTOR: Final = 1.5  # a thermally throttled node is slower than its EWMA says
LOAD_PENALTY_TOKENS: Final = 64  # a model not yet loaded costs about this many tokens of time
STATE_LAG_S: Final = 0.25  # a forward this close before a peer's state arrived may not be in it yet

TIER_LOADED: Final = 0
TIER_AVAILABLE: Final = 1
TIER_MISSING: Final = 2


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """What the scheduler knows about one node (from live engine stats or gossiped state)."""

    node_id: str
    local: bool
    models_available: frozenset[str] = frozenset()
    models_loaded: frozenset[str] = frozenset()
    slots_total: int = 1
    slots_free: int = 1
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    throttled: bool = False
    pending: int = 0  # requests we forwarded there, not yet visible in its gossip
    finished: int = 0  # our forwards its gossip still shows running, though their answers came back
    reachable: bool = True  # has an API address we can call

    @property
    def busy_slots(self) -> int:
        return max(0, self.slots_total - self.slots_free)


@dataclass(frozen=True, slots=True)
class Ranked:
    node: NodeLoad
    tier: int
    expected_s: float


def tier_of(node: NodeLoad, model: str) -> int:
    if model in node.models_loaded:
        return TIER_LOADED
    if model in node.models_available:
        return TIER_AVAILABLE
    return TIER_MISSING


def measured(tokens_per_s: float) -> bool:
    """Whether a node has measured its decode rate yet (pure)."""
    return tokens_per_s > 0 and math.isfinite(tokens_per_s)


def expected_completion_s(node: NodeLoad, *, expected_tokens: int, model: str, unknown_tokens_per_s: float = DEFAULT_TOKENS_PER_S) -> float:
    """Return the expected seconds until this node finishes the request (pure).

    A node that has not measured itself yet counts at `unknown_tokens_per_s`.
    """
    tps = node.tokens_per_s if measured(node.tokens_per_s) else unknown_tokens_per_s
    per_token_s = 1.0 / tps
    ahead = max(0, node.queue_depth + node.busy_slots - node.finished) + node.pending
    factor = 1.0 + ahead / max(1, node.slots_total)
    tokens = max(1, expected_tokens)
    if model not in node.models_loaded:
        tokens += LOAD_PENALTY_TOKENS
    seconds = factor * tokens * per_token_s
    return seconds * THROTTLED_FACTOR if node.throttled else seconds


def rank(
    local: NodeLoad,
    peers: Iterable[NodeLoad],
    *,
    model: str,
    hops: int,
    hop_limit: int,
    expected_tokens: int = DEFAULT_EXPECTED_TOKENS,
    breaker_available: Callable[[str], bool] = lambda _node: True,
    exclude: Iterable[str] = (),
    tie_margin: float = TIE_MARGIN,
) -> list[Ranked]:
    """Return the nodes to try in order, best first; this node is always in the list (pure).

    Peers that lack the model, cannot be reached, have an open breaker or are excluded (the
    node that forwarded the request to us) are left out. At the hop limit only this node remains.
    A peer that has not measured its decode rate yet (it never generated) is assumed as fast as
    this node: with a fixed low prior, an idle new peer would never get the request that lets it
    measure itself, and a busy node would queue (then refuse) work the mesh could run.
    """
    prior = local.tokens_per_s if measured(local.tokens_per_s) else DEFAULT_TOKENS_PER_S
    me = Ranked(local, tier_of(local, model), expected_completion_s(local, expected_tokens=expected_tokens, model=model))
    if hops >= hop_limit:
        return [me]
    skip = set(exclude)
    others: list[Ranked] = []
    for p in peers:
        if p.local or p.node_id == local.node_id or p.node_id in skip or not p.reachable:
            continue
        t = tier_of(p, model)
        if t == TIER_MISSING or not breaker_available(p.node_id):
            continue
        others.append(Ranked(p, t, expected_completion_s(p, expected_tokens=expected_tokens, model=model, unknown_tokens_per_s=prior)))
    others.sort(key=lambda r: (r.tier, r.expected_s, r.node.node_id))
    if not others:
        return [me]
    best = others[0]
    if me.tier < best.tier or (me.tier == best.tier and me.expected_s <= best.expected_s * (1.0 + tie_margin)):
        return [me, *others]
    # Peers strictly better than us go first; we are the fallback before worse peers.
    ahead = [r for r in others if (r.tier, r.expected_s) < (me.tier, me.expected_s / (1.0 + tie_margin))]
    behind = [r for r in others if r not in ahead]
    return [*ahead, me, *behind]


def unseen_forwards(started_at: Iterable[float], *, state_at: float, lag_s: float = STATE_LAG_S) -> int:
    """Count forwards in flight that the peer's gossiped state (received at `state_at`) cannot show yet (pure).

    A forward started before the state was published is in its busy slots or queue already:
    counting it again as pending made a peer look up to twice as loaded as it was, so the
    mesh kept work on the entry node (and refused it there) while peers idled. Forwards started
    up to `lag_s` before the state arrived still count: the request and the state cross on the wire.
    """
    return sum(1 for t in started_at if t > state_at - lag_s)


def unseen_completions(spans: Iterable[tuple[float, float]], *, state_at: float, lag_s: float = STATE_LAG_S) -> int:
    """Count our forwards the peer's state (received at `state_at`) shows running though they finished (pure).

    `spans` are (started, finished) wall-clock times of forwards the peer answered. One that
    started before the state (not counted as pending) and finished after it received is still
    in the state's busy slots: a peer that just finished a batch looked full for up to a publish
    interval plus gossip delay, and its slots idled while the entry queued the clients' next
    requests. A forward that started within `lag_s` of the state was counted as pending, not
    as busy, so its completion changes nothing here.
    """
    return sum(1 for started, finished in spans if started <= state_at - lag_s and finished > state_at)


def expected_tokens_of(body: Mapping[str, Any], default: int = DEFAULT_EXPECTED_TOKENS) -> int:
    """Return the requested output budget of an OpenAI or Ollama body (pure, never raises)."""
    candidates: list[Any] = [body.get("max_completion_tokens"), body.get("max_tokens")]
    options = body.get("options")
    if isinstance(options, Mapping):
        candidates.append(options.get("num_predict"))
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, 1 << 20)
    return default


def load_from_state(node_id: str, meta: Mapping[str, Any], *, pending: int = 0, finished: int = 0) -> NodeLoad:
    """Build a NodeLoad from a peer's gossiped state, tolerating missing fields (pure)."""

    def num(key: str, default: float) -> float:
        v = meta.get(key)
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) else default

    def ids(key: str) -> frozenset[str]:
        v = meta.get(key)
        return frozenset(x for x in v if isinstance(x, str)) if isinstance(v, list | tuple) else frozenset()

    loaded = ids("models_loaded")
    slots_total = max(1, int(num("slots_total", 1)))
    return NodeLoad(
        node_id=node_id,
        local=False,
        models_available=ids("models_available") | loaded,
        models_loaded=loaded,
        slots_total=slots_total,
        slots_free=max(0, min(slots_total, int(num("slots_free", slots_total)))),
        queue_depth=max(0, int(num("queue_depth", 0))),
        tokens_per_s=max(0.0, num("tokens_per_s", 0.0)),
        throttled=meta.get("throttled") is True,
        pending=pending,
        finished=max(0, finished),
        reachable=isinstance(meta.get("api_host"), str) and bool(meta.get("api_host")) and isinstance(meta.get("api_port"), int),
    )
