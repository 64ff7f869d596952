"""Recall re-ranker: numeric features of a recalled memory, a small logistic model, MRR and NDCG (pure numpy).

Everything here is pure: no I/O, no clock, no randomness (the model starts from zeros and is
trained by full-batch gradient descent, so the same rows always give the same weights). The
model only ever sees the numbers below: never a memory's text, never a user name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from mongarsd.errors import MongarsError
from mongarsd.memory.hippocampus import MEMORY_KINDS, RRF_K, RecallHit

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

MODEL_FORMAT: Final = 1  # bump when FEATURE_NAMES change: a stored model of another format is not loaded
FEATURE_NAMES: Final[tuple[str, ...]] = (
    "similarity_gap",  # cosine to the query (0 when the vector ranker did not see it) minus the recall's best
    "similarity_missing",
    "vector_rr",  # 1 / vector rank
    "vector_missing",
    "text_rr",  # 1 / BM25 rank
    "text_missing",
    "rrf_gap",  # the fused score, scaled to [0, 1], minus the recall's best
    "log_age_days",
    "importance",
    *(f"kind_{kind}" for kind in MEMORY_KINDS),
    "usefulness",  # smoothed share of positive feedback on answers that recalled this memory
    "log_feedback",  # how much feedback that share rests on
)
N_FEATURES: Final = len(FEATURE_NAMES)
DAY_S: Final = 86400.0
RRF_SCALE: Final = (RRF_K + 1) / 2.0  # two rankers, both rank 1: score * RRF_SCALE == 1
# Laplace smoothing of usefulness: a memory nobody rated yet reads 0.5, not 0 or 1.
USEFULNESS_PRIOR_POS: Final = 1.0
USEFULNESS_PRIOR_TOTAL: Final = 2.0

L2: Final = 1e-2  # ridge penalty on the (standardised) weights
MAX_ITERATIONS: Final = 2000
GRADIENT_TOLERANCE: Final = 1e-6
STOP_CHECK_EVERY: Final = 16  # iterations between two looks at should_stop
# Standardisation never divides by less: a feature that barely varied in training (every memory
# a few seconds old) must not get a weight that explodes once it varies in use.
MIN_SCALE: Final = 0.05

NDCG_K: Final = 5
RELEVANT_GAIN: Final = 0.5  # for MRR a memory is relevant when more than this share of its answers helped
ADOPT_MIN_GAIN: Final = 0.01  # NDCG@k a new model must gain over the current ranking to be adopted


class TrainingStopped(MongarsError):
    """Training was asked to stop (its idle period ended) before it converged."""


# ------------------------------------------------------------------------------ features


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the recall log keeps of one recalled memory: numbers and a kind, nothing else."""

    similarity: float | None
    vector_rank: int | None
    text_rank: int | None
    score: float  # fused RRF score
    age_days: float
    importance: float
    kind: str
    shared: bool = False  # a shared document (not the user's own): never given a usefulness

    def to_json(self) -> dict[str, Any]:
        return {
            "similarity": self.similarity,
            "vector_rank": self.vector_rank,
            "text_rank": self.text_rank,
            "score": self.score,
            "age_days": self.age_days,
            "importance": self.importance,
            "kind": self.kind,
            "shared": self.shared,
        }

    @classmethod
    def from_json(cls, data: object) -> Candidate:
        """Read a stored feature record; ValueError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError("features must be an object")
        return cls(
            similarity=_opt_float(data, "similarity"),
            vector_rank=_opt_rank(data, "vector_rank"),
            text_rank=_opt_rank(data, "text_rank"),
            score=_float(data, "score"),
            age_days=max(0.0, _float(data, "age_days")),
            importance=_float(data, "importance"),
            kind=str(data.get("kind", "")),
            shared=bool(data.get("shared", False)),
        )


def _float(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"features.{key} must be a finite number")
    return float(value)


def _opt_float(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _float(data, key)


def _opt_rank(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"features.{key} must be a rank from 1")
    return value


def candidate_from_hit(hit: RecallHit, now: float, *, shared: bool = False) -> Candidate:
    """The features of one recall hit at wall-clock time `now`."""
    mem = hit.memory
    return Candidate(
        similarity=hit.similarity,
        vector_rank=hit.vector_rank,
        text_rank=hit.text_rank,
        score=hit.score,
        age_days=max(0.0, (now - mem.created_at) / DAY_S),
        importance=mem.importance,
        kind=mem.kind,
        shared=shared,
    )


def usefulness(pos: int, neg: int) -> float:
    """Smoothed share of positive feedback: (pos + 1) / (pos + neg + 2)."""
    return (pos + USEFULNESS_PRIOR_POS) / (pos + neg + USEFULNESS_PRIOR_TOTAL)


# Query-dependent features are taken relative to the recall's best: a ranking only compares
# memories of one recall, and the answer-level label must not be explained by how well the
# query matched overall (a vague question rates badly whatever is recalled).
_RELATIVE: Final = (FEATURE_NAMES.index("similarity_gap"), FEATURE_NAMES.index("rrf_gap"))


def feature_vector(c: Candidate, counts: tuple[int, int] = (0, 0)) -> FloatArray:
    """One candidate's features before the recall-relative ones are offset (see feature_matrix)."""
    pos, neg = counts
    kinds = [1.0 if c.kind == kind else 0.0 for kind in MEMORY_KINDS]
    return np.array(
        [
            c.similarity if c.similarity is not None else 0.0,
            1.0 if c.similarity is None else 0.0,
            1.0 / c.vector_rank if c.vector_rank else 0.0,
            0.0 if c.vector_rank else 1.0,
            1.0 / c.text_rank if c.text_rank else 0.0,
            0.0 if c.text_rank else 1.0,
            c.score * RRF_SCALE,
            math.log1p(c.age_days),
            c.importance,
            *kinds,
            usefulness(pos, neg),
            math.log1p(pos + neg),
        ],
        dtype=np.float64,
    )


def feature_matrix(cands: Sequence[Candidate], counts: Sequence[tuple[int, int]]) -> FloatArray:
    """The model's input for the candidates of ONE recall, in FEATURE_NAMES order; counts = (positive, negative) feedback."""
    if not cands:
        return np.zeros((0, N_FEATURES), dtype=np.float64)
    x = np.stack([feature_vector(c, n) for c, n in zip(cands, counts, strict=True)])
    for col in _RELATIVE:
        x[:, col] -= x[:, col].max()
    return x


# ------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class RerankModel:
    """Logistic scorer over standardised features: score = ((x - mean) / scale) . weights + bias."""

    weights: FloatArray
    bias: float
    mean: FloatArray
    scale: FloatArray

    def score(self, features: FloatArray) -> FloatArray:
        """Scores (log-odds that the answer helps) of an (n, N_FEATURES) matrix; higher ranks first."""
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != N_FEATURES:
            raise ValueError(f"expected {N_FEATURES} features, got {x.shape[1]}")
        out: FloatArray = ((x - self.mean) / self.scale) @ self.weights + self.bias
        return out

    def named_weights(self) -> dict[str, float]:
        """Each feature's weight in raw units (per unit of the feature, not standardised)."""
        return {name: round(float(w / s), 6) for name, w, s in zip(FEATURE_NAMES, self.weights, self.scale, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "features": list(FEATURE_NAMES),
            "weights": [float(w) for w in self.weights],
            "bias": float(self.bias),
            "mean": [float(m) for m in self.mean],
            "scale": [float(s) for s in self.scale],
        }

    @classmethod
    def from_json(cls, data: object) -> RerankModel:
        """Load stored weights; ValueError when they are of another format or damaged."""
        if not isinstance(data, Mapping):
            raise ValueError("model must be an object")
        if data.get("format") != MODEL_FORMAT or list(data.get("features") or []) != list(FEATURE_NAMES):
            raise ValueError(f"model is of another feature format (expected format {MODEL_FORMAT})")
        arrays = []
        for key in ("weights", "mean", "scale"):
            raw = data.get(key)
            if not isinstance(raw, list) or len(raw) != N_FEATURES:
                raise ValueError(f"model.{key} must be a list of {N_FEATURES} numbers")
            arr = np.asarray([_float({"v": v}, "v") for v in raw], dtype=np.float64)
            arrays.append(arr)
        weights, mean, scale = arrays
        if np.any(scale <= 0):
            raise ValueError("model.scale must be positive")
        return cls(weights, _float(data, "bias"), mean, scale)


@dataclass(frozen=True)
class TrainResult:
    model: RerankModel
    iterations: int
    loss: float  # mean logistic loss on the training rows, without the penalty
    converged: bool


def _sigmoid(z: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))  # never overflows, unlike 1 / (1 + exp(-z))
    return out


def train(
    x: FloatArray,
    y: FloatArray,
    *,
    l2: float = L2,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = GRADIENT_TOLERANCE,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fit L2-regularised logistic regression by full-batch gradient descent (deterministic).

    BLOCKING (numpy): call it through asyncio.to_thread. The step is 1/L with L the gradient's
    Lipschitz bound, so it converges without tuning; `should_stop` is polled every few
    iterations and raises TrainingStopped.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != N_FEATURES or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (n, {N_FEATURES}) and y (n,), got {x.shape} and {y.shape}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("no training rows")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale < MIN_SCALE, 1.0, scale)
    xs = (x - mean) / scale
    aug = np.hstack([xs, np.ones((n, 1))])
    lipschitz = 0.25 * float(np.linalg.eigvalsh(aug.T @ aug / n)[-1]) + l2
    step = 1.0 / lipschitz
    w = np.zeros(N_FEATURES, dtype=np.float64)
    b = 0.0
    converged = False
    it = 0
    for it in range(1, max_iterations + 1):
        if should_stop is not None and it % STOP_CHECK_EVERY == 0 and should_stop():
            raise TrainingStopped(f"training stopped after {it} iterations")
        err = _sigmoid(xs @ w + b) - y
        grad_w = xs.T @ err / n + l2 * w
        grad_b = float(err.mean())
        w = w - step * grad_w
        b -= step * grad_b
        if math.sqrt(float(grad_w @ grad_w) + grad_b * grad_b) < tolerance:
            converged = True
            break
    z = xs @ w + b
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    return TrainResult(RerankModel(w, b, mean, scale), it, loss, converged)


# ------------------------------------------------------------------------------ ranking metrics


@dataclass(frozen=True)
class Group:
    """One held-out recall: its candidates' features, relevance gains and the fused (RRF) order's inputs."""

    features: FloatArray  # (n, N_FEATURES)
    gains: FloatArray  # (n,) graded relevance in [0, 1]
    rrf: FloatArray  # (n,) fused score
    ids: IntArray  # (n,) memory ids (RRF ties go to the larger id, as Hippocampus's rrf_fuse)


def baseline_order(rrf: FloatArray, ids: IntArray) -> IntArray:
    """Indices in the fused (RRF) order: score descending, ties to the larger id."""
    order: IntArray = np.lexsort((-np.asarray(ids), -np.asarray(rrf, dtype=np.float64))).astype(np.int64)
    return order


def model_order(model: RerankModel, features: FloatArray, rrf: FloatArray, ids: IntArray) -> IntArray:
    """Indices by model score descending; ties keep the fused order."""
    base = baseline_order(rrf, ids)
    position = np.empty_like(base)
    position[base] = np.arange(len(base))
    order: IntArray = np.lexsort((position, -model.score(features))).astype(np.int64)
    return order


def reciprocal_rank(relevant: Sequence[bool]) -> float:
    """1 / position of the first relevant item (from 1), 0 when none is."""
    for i, rel in enumerate(relevant, start=1):
        if rel:
            return 1.0 / i
    return 0.0


def ndcg_at_k(gains: Sequence[float], k: int = NDCG_K) -> float | None:
    """NDCG@k of gains listed in ranked order (linear gains, log2 discount); None when every gain is 0."""
    g = np.asarray(gains, dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, min(k, len(g)) + 2))
    ideal = float(np.sort(g)[::-1][:k] @ discounts)
    if ideal <= 0.0:
        return None
    return float(g[:k] @ discounts) / ideal


@dataclass(frozen=True)
class RankingMetrics:
    mrr: float | None  # over recalls with at least one relevant memory
    ndcg: float | None  # NDCG@k over recalls with any gain
    recalls: int  # held-out recalls the NDCG is averaged over
    k: int = NDCG_K

    def to_json(self) -> dict[str, Any]:
        return {
            "mrr": None if self.mrr is None else round(self.mrr, 6),
            f"ndcg@{self.k}": None if self.ndcg is None else round(self.ndcg, 6),
            "recalls": self.recalls,
        }


Ranker = Callable[[Group], IntArray]


def baseline_ranker(group: Group) -> IntArray:
    return baseline_order(group.rrf, group.ids)


def model_ranker(model: RerankModel) -> Ranker:
    return lambda group: model_order(model, group.features, group.rrf, group.ids)


def evaluate(groups: Iterable[Group], ranker: Ranker, *, k: int = NDCG_K) -> RankingMetrics:
    """Mean reciprocal rank and NDCG@k of a ranking over held-out recalls."""
    rrs: list[float] = []
    ndcgs: list[float] = []
    for group in groups:
        gains = group.gains[ranker(group)]
        if np.any(gains > RELEVANT_GAIN):
            rrs.append(reciprocal_rank([bool(g > RELEVANT_GAIN) for g in gains]))
        value = ndcg_at_k(list(gains), k)
        if value is not None:
            ndcgs.append(value)
    return RankingMetrics(
        mrr=float(np.mean(rrs)) if rrs else None,
        ndcg=float(np.mean(ndcgs)) if ndcgs else None,
        recalls=len(ndcgs),
        k=k,
    )


def should_adopt(candidate: RankingMetrics, current: RankingMetrics, *, min_gain: float = ADOPT_MIN_GAIN) -> tuple[bool, str]:
    """Adopt only a strictly better ranking: NDCG@k up by more than min_gain and MRR not down."""
    if candidate.ndcg is None or current.ndcg is None:
        return False, "the held-out recalls carry no graded feedback to compare on"
    c_mrr = candidate.mrr if candidate.mrr is not None else 0.0
    o_mrr = current.mrr if current.mrr is not None else 0.0
    figures = f"NDCG@{candidate.k} {candidate.ndcg:.4f} vs {current.ndcg:.4f}, MRR {c_mrr:.4f} vs {o_mrr:.4f}"
    if candidate.ndcg - current.ndcg <= min_gain:
        return False, f"not better on held-out feedback: {figures} (needs NDCG@{candidate.k} up by more than {min_gain})"
    if c_mrr < o_mrr:
        return False, f"MRR went down on held-out feedback: {figures}"
    return True, f"better on held-out feedback: {figures}"


# ------------------------------------------------------------------------------ dataset


@dataclass(frozen=True, slots=True)
class LabelledRow:
    """One recalled memory whose answer was rated: rating 1 (helped) or -1 (did not)."""

    recall: Hashable  # opaque key of the recall it belongs to (its answer message)
    memory_id: int
    candidate: Candidate
    created_at: float
    rating: int


@dataclass(frozen=True)
class Dataset:
    train_x: FloatArray
    train_y: FloatArray
    heldout: list[Group]
    train_recalls: int
    heldout_recalls: int
    split_at: float  # recalls at or after this time are held out


Counts = dict[int, tuple[int, int]]


def _bump(counts: Counts, row: LabelledRow) -> None:
    pos, neg = counts.get(row.memory_id, (0, 0))
    counts[row.memory_id] = (pos + 1, neg) if row.rating > 0 else (pos, neg + 1)


def usefulness_counts(rows: Iterable[LabelledRow]) -> Counts:
    """(positive, negative) feedback per memory; shared documents are left out, so one user's
    ratings never shape how another user's recall ranks."""
    counts: Counts = {}
    for row in rows:
        if not row.candidate.shared:
            _bump(counts, row)
    return counts


def group_recalls(rows: Iterable[LabelledRow]) -> list[list[LabelledRow]]:
    """Rows grouped by recall, recalls oldest first (ties keep input order); one row per memory."""
    groups: dict[Hashable, list[LabelledRow]] = {}
    for row in rows:
        members = groups.setdefault(row.recall, [])
        if all(r.memory_id != row.memory_id for r in members):
            members.append(row)
    ordered = sorted(enumerate(groups.values()), key=lambda item: (min(r.created_at for r in item[1]), item[0]))
    return [members for _, members in ordered]


def split_by_time(rows: Sequence[LabelledRow], holdout_fraction: float) -> Dataset:
    """Split labelled recalls by time (the newest `holdout_fraction` held out, never at random).

    Usefulness features use only feedback older than the row: for a training recall, the
    recalls before it; for a held-out one, the training recalls alone, so nothing from the
    held-out period reaches the features. A held-out memory's gain is its share of helpful
    answers over the held-out period.
    """
    groups = group_recalls(rows)
    n = len(groups)
    n_hold = max(1, math.ceil(n * holdout_fraction))
    if n - n_hold < 1:
        raise ValueError(f"{n} labelled recalls cannot be split into training and held-out sets")
    train_groups, hold_groups = groups[: n - n_hold], groups[n - n_hold :]
    counts: Counts = {}
    xs: list[FloatArray] = []
    ys: list[float] = []
    for members in train_groups:
        xs.append(feature_matrix([r.candidate for r in members], [counts.get(r.memory_id, (0, 0)) for r in members]))
        ys.extend(1.0 if r.rating > 0 else 0.0 for r in members)
        for r in members:
            if not r.candidate.shared:
                _bump(counts, r)
    judged: Counts = {}
    for members in hold_groups:
        for r in members:
            _bump(judged, r)
    heldout: list[Group] = []
    for members in hold_groups:
        feats = feature_matrix([r.candidate for r in members], [counts.get(r.memory_id, (0, 0)) for r in members])
        gains = np.array([judged[r.memory_id][0] / sum(judged[r.memory_id]) for r in members], dtype=np.float64)
        rrf = np.array([r.candidate.score for r in members], dtype=np.float64)
        ids = np.array([r.memory_id for r in members], dtype=np.int64)
        heldout.append(Group(feats, gains, rrf, ids))
    return Dataset(
        train_x=np.vstack(xs),
        train_y=np.asarray(ys, dtype=np.float64),
        heldout=heldout,
        train_recalls=len(train_groups),
        heldout_recalls=len(hold_groups),
        split_at=min(r.created_at for r in hold_groups[0]),
    )
