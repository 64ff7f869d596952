"""Recall re-ranker (pure): features, training, MRR/NDCG, the time split and the adoption rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mongarsd.maintenance import rerank
from mongarsd.maintenance.rerank import (
    FEATURE_NAMES,
    N_FEATURES,
    Candidate,
    Group,
    LabelledRow,
    RankingMetrics,
    RerankModel,
    TrainingStopped,
)
from mongarsd.memory.hippocampus import MEMORY_KINDS, RecallHit, rrf_fuse
from mongarsd.memory.hippocampus import Memory as Mem

F = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _cand(**kw: object) -> Candidate:
    base: dict[str, object] = {
        "similarity": 0.5,
        "vector_rank": 2,
        "text_rank": 4,
        "score": 0.03,
        "age_days": 1.0,
        "importance": 0.5,
        "kind": "fact",
    }
    base.update(kw)
    return Candidate(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ features


def test_feature_vector_values_and_missing_flags() -> None:
    v = rerank.feature_vector(_cand(kind="summary", importance=0.9), (3, 1))
    assert v.shape == (N_FEATURES,)
    assert v[F["similarity_gap"]] == 0.5 and v[F["similarity_missing"]] == 0.0  # offset by the recall's best in feature_matrix
    assert v[F["vector_rr"]] == 0.5 and v[F["vector_missing"]] == 0.0
    assert v[F["text_rr"]] == 0.25 and v[F["text_missing"]] == 0.0
    assert v[F["rrf_gap"]] == pytest.approx(0.03 * (60 + 1) / 2)
    assert v[F["log_age_days"]] == pytest.approx(math.log1p(1.0))
    assert v[F["importance"]] == 0.9
    assert [v[F[f"kind_{k}"]] for k in MEMORY_KINDS] == [1.0 if k == "summary" else 0.0 for k in MEMORY_KINDS]
    assert v[F["usefulness"]] == pytest.approx((3 + 1) / (4 + 2))
    assert v[F["log_feedback"]] == pytest.approx(math.log1p(4))

    missing = rerank.feature_vector(_cand(similarity=None, vector_rank=None, text_rank=None, kind="unknown"))
    assert missing[F["similarity_gap"]] == 0.0 and missing[F["similarity_missing"]] == 1.0
    assert missing[F["vector_rr"]] == 0.0 and missing[F["vector_missing"]] == 1.0
    assert missing[F["text_rr"]] == 0.0 and missing[F["text_missing"]] == 1.0
    assert all(missing[F[f"kind_{k}"]] == 0.0 for k in MEMORY_KINDS)
    assert missing[F["usefulness"]] == 0.5 and missing[F["log_feedback"]] == 0.0  # never rated: the neutral prior


def test_query_dependent_features_are_relative_to_the_recalls_best() -> None:
    cands = [_cand(similarity=0.8, score=0.03), _cand(similarity=0.5, score=0.02), _cand(similarity=None, score=0.01)]
    x = rerank.feature_matrix(cands, [(0, 0), (2, 0), (0, 0)])
    assert x[:, F["similarity_gap"]].tolist() == pytest.approx([0.0, -0.3, -0.8])  # missing reads as cosine 0
    assert x[:, F["rrf_gap"]].tolist() == pytest.approx([0.0, -0.01 * 30.5, -0.02 * 30.5])
    assert x[:, F["importance"]].tolist() == [0.5, 0.5, 0.5]  # memory properties stay absolute
    assert x[1, F["usefulness"]] == pytest.approx(0.75)
    assert rerank.feature_matrix([], []).shape == (0, N_FEATURES)


def test_candidate_from_a_recall_hit_carries_numbers_only() -> None:
    mem = Mem(7, "alice's secret garden plan", 0.8, "note", "user", created_at=1_000.0)
    hit = RecallHit(mem, 0.0325, 0.71, 1, None)
    c = rerank.candidate_from_hit(hit, 1_000.0 + 2 * 86400.0)
    assert c == Candidate(0.71, 1, None, 0.0325, 2.0, 0.8, "note", False)
    stored = json.dumps(c.to_json())
    assert "secret" not in stored and "alice" not in stored  # no text, no user in what is logged
    assert Candidate.from_json(json.loads(stored)) == c
    assert rerank.candidate_from_hit(hit, 0.0).age_days == 0.0  # clock skew never gives a negative age


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ([], "object"),
        ({"score": "x", "age_days": 0, "importance": 0.5}, "score"),
        ({"score": 0.1, "age_days": float("nan"), "importance": 0.5}, "age_days"),
        ({"score": 0.1, "age_days": 0, "importance": 0.5, "vector_rank": 0}, "vector_rank"),
        ({"score": 0.1, "age_days": 0, "importance": True}, "importance"),
    ],
)
def test_damaged_feature_records_are_refused_by_name(record: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Candidate.from_json(record)


# ------------------------------------------------------------------------------ training


def _separable(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is 1 exactly when importance + usefulness is high (a linearly separable set)."""
    rng = np.random.default_rng(seed)
    rows, ys = [], []
    for _ in range(n):
        imp = float(rng.uniform(0, 1))
        pos, neg = int(rng.integers(0, 5)), int(rng.integers(0, 5))
        kind = str(rng.choice(MEMORY_KINDS))
        c = _cand(similarity=float(rng.uniform(0, 1)), importance=imp, kind=kind, score=float(rng.uniform(0.01, 0.033)))
        rows.append(rerank.feature_vector(c, (pos, neg)))
        ys.append(1.0 if imp + rerank.usefulness(pos, neg) > 1.0 else 0.0)
    return np.stack(rows), np.array(ys)


def test_training_converges_on_a_separable_set() -> None:
    x, y = _separable(400)
    res = rerank.train(x, y)
    assert res.converged and res.iterations < rerank.MAX_ITERATIONS
    assert res.loss < 0.35  # far below log(2) = 0.69, the loss of knowing nothing
    acc = float(np.mean((res.model.score(x) > 0) == (y > 0.5)))
    assert acc > 0.95
    w = res.model.named_weights()
    assert w["importance"] > 0 and w["usefulness"] > 0  # the features that decide the label weigh in favour
    x_test, y_test = _separable(200, seed=4)
    assert float(np.mean((res.model.score(x_test) > 0) == (y_test > 0.5))) > 0.9  # and it generalises


def test_training_is_deterministic_and_round_trips_through_json() -> None:
    x, y = _separable(300)
    a, b = rerank.train(x, y), rerank.train(x, y)
    assert np.array_equal(a.model.weights, b.model.weights) and a.model.bias == b.model.bias and a.iterations == b.iterations
    stored = json.loads(json.dumps(a.model.to_json()))
    assert stored["features"] == list(FEATURE_NAMES)
    again = RerankModel.from_json(stored)
    assert np.allclose(again.score(x), a.model.score(x), rtol=0, atol=1e-12)


def test_stored_models_of_another_format_are_refused() -> None:
    x, y = _separable(100)
    good = rerank.train(x, y).model.to_json()
    for damage in ({"format": 0}, {"features": ["a", "b"]}, {"weights": [1.0]}, {"scale": [0.0] * N_FEATURES}, {"bias": "x"}):
        with pytest.raises(ValueError):
            RerankModel.from_json({**good, **damage})


def test_training_stops_when_asked() -> None:
    x, y = _separable(100)
    with pytest.raises(TrainingStopped):
        rerank.train(x, y, should_stop=lambda: True)


def test_training_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="no training rows"):
        rerank.train(np.zeros((0, N_FEATURES)), np.zeros(0))
    with pytest.raises(ValueError, match="must be"):
        rerank.train(np.zeros((3, 4)), np.zeros(3))


def test_constant_features_do_not_break_training() -> None:
    x = np.zeros((10, N_FEATURES))
    x[:, F["importance"]] = np.linspace(0, 1, 10)
    y = (x[:, F["importance"]] > 0.5).astype(float)
    model = rerank.train(x, y).model
    assert np.all(np.isfinite(model.score(x)))
    assert model.named_weights()["importance"] > 0


# ------------------------------------------------------------------------------ ranking metrics


def test_reciprocal_rank_and_ndcg_on_hand_made_rankings() -> None:
    assert rerank.reciprocal_rank([False, True, False]) == 0.5
    assert rerank.reciprocal_rank([True]) == 1.0
    assert rerank.reciprocal_rank([False, False]) == 0.0
    # DCG = 0 + 1/log2(3) + 0.5/log2(4); IDCG = 1 + 0.5/log2(3)
    expected = (1 / math.log2(3) + 0.5 / 2) / (1 + 0.5 / math.log2(3))
    assert rerank.ndcg_at_k([0.0, 1.0, 0.5], k=3) == pytest.approx(expected)
    assert rerank.ndcg_at_k([1.0, 0.5, 0.0], k=3) == pytest.approx(1.0)
    assert rerank.ndcg_at_k([0.0, 0.0, 1.0], k=2) == pytest.approx(0.0)  # the relevant one is past k
    assert rerank.ndcg_at_k([0.0, 0.0]) is None  # nothing to rank well: left out of the mean


def _group(gains: list[float], rrf: list[float], ids: list[int] | None = None, feats: np.ndarray | None = None) -> Group:
    n = len(gains)
    return Group(
        features=feats if feats is not None else np.zeros((n, N_FEATURES)),
        gains=np.array(gains),
        rrf=np.array(rrf),
        ids=np.array(ids if ids is not None else list(range(1, n + 1)), dtype=np.int64),
    )


def test_evaluate_the_baseline_rrf_order() -> None:
    groups = [
        _group([0.0, 1.0, 0.0], [0.03, 0.02, 0.01]),  # the relevant one second: RR 1/2
        _group([1.0, 0.0], [0.02, 0.01]),  # first: RR 1
        _group([0.0, 0.0], [0.02, 0.01]),  # no gain at all: left out of both means
        _group([0.5, 0.0], [0.02, 0.01]),  # a gain, but nothing "relevant": NDCG only
    ]
    m = rerank.evaluate(groups, rerank.baseline_ranker, k=3)
    assert m.mrr == pytest.approx((0.5 + 1.0) / 2)
    assert m.ndcg == pytest.approx((1 / math.log2(3) + 1.0 + 1.0) / 3)
    assert m.recalls == 3
    assert m.to_json() == {"mrr": 0.75, "ndcg@3": round(m.ndcg or 0, 6), "recalls": 3}
    assert rerank.evaluate([], rerank.baseline_ranker) == RankingMetrics(None, None, 0)


def test_baseline_order_matches_hippocampus_rrf_ties() -> None:
    fused = rrf_fuse([[5, 9], [9, 5]])  # 5 and 9 tie: Hippocampus puts the larger id first
    rrf = np.array([s for _, s in fused])
    ids = np.array([i for i, _ in fused], dtype=np.int64)
    shuffled = np.array([1, 0])
    assert ids[shuffled][rerank.baseline_order(rrf[shuffled], ids[shuffled])].tolist() == [i for i, _ in fused] == [9, 5]


def test_model_order_sorts_by_score_and_keeps_the_fused_order_on_ties() -> None:
    x, y = _separable(200)
    model = rerank.train(x, y).model
    feats = np.stack([rerank.feature_vector(_cand(importance=v), (0, 0)) for v in (0.1, 0.9, 0.5)])
    order = rerank.model_order(model, feats, np.array([0.03, 0.01, 0.02]), np.array([1, 2, 3], dtype=np.int64))
    assert order.tolist() == [1, 2, 0]  # importance decides here
    same = np.stack([feats[0]] * 3)
    tied = rerank.model_order(model, same, np.array([0.01, 0.03, 0.02]), np.array([1, 2, 3], dtype=np.int64))
    assert tied.tolist() == [1, 2, 0]  # equal scores: the RRF order


def test_adoption_needs_a_strictly_better_ranking() -> None:
    cur = RankingMetrics(mrr=0.6, ndcg=0.70, recalls=10)
    ok, why = rerank.should_adopt(RankingMetrics(0.8, 0.80, 10), cur)
    assert ok and "0.8000 vs 0.7000" in why
    same, why = rerank.should_adopt(RankingMetrics(0.6, 0.70, 10), cur)
    assert not same and "not better" in why
    tiny, _ = rerank.should_adopt(RankingMetrics(0.6, 0.70 + rerank.ADOPT_MIN_GAIN / 2, 10), cur)
    assert not tiny  # noise-sized gains are not improvements
    worse_mrr, why = rerank.should_adopt(RankingMetrics(0.5, 0.80, 10), cur)
    assert not worse_mrr and "MRR went down" in why
    nothing, why = rerank.should_adopt(RankingMetrics(None, None, 0), cur)
    assert not nothing and "no graded feedback" in why


# ------------------------------------------------------------------------------ a simulated recall log


def _world(n_recalls: int, *, seed: int = 11, flip_before: float | None = None) -> list[LabelledRow]:
    """Recalls of 4 memories from a pool where summaries help but RRF ranks them low.

    Each answer is rated up (90 %) when a summary was among its memories, else down (90 %).
    With `flip_before`, ratings of recalls older than that time are flipped (poisoned feedback).
    """
    rng = np.random.default_rng(seed)
    pool = 40
    helpful = {m for m in range(1, pool + 1) if m % 4 == 0}
    rows: list[LabelledRow] = []
    for r in range(n_recalls):
        members = rng.choice(np.arange(1, pool + 1), size=4, replace=False)
        has_helpful = any(int(m) in helpful for m in members)
        rating = 1 if (rng.uniform() < 0.9) == has_helpful else -1
        t = float(r)
        if flip_before is not None and t < flip_before:
            rating = -rating
        for member in members:
            m = int(member)
            good = m in helpful
            score = float(rng.uniform(0.016, 0.033)) - (0.008 if good else 0.0)
            cand = Candidate(
                similarity=float(rng.uniform(0.2, 0.6)) - (0.15 if good else 0.0),
                vector_rank=int(rng.integers(1, 9)),
                text_rank=None if good else int(rng.integers(1, 9)),
                score=score,
                age_days=float(rng.uniform(0, 30)),
                importance=0.9 if good else float(rng.uniform(0.2, 0.6)),
                kind="summary" if good else str(rng.choice(["fact", "turn", "note"])),
            )
            rows.append(LabelledRow(("u", r), m, cand, t, rating))
    return rows


def test_split_is_by_time_and_usefulness_never_sees_the_held_out_period() -> None:
    rows = _world(40)
    ds = rerank.split_by_time(rows, 0.25)
    assert ds.train_recalls == 30 and ds.heldout_recalls == 10
    assert ds.split_at == 30.0  # the newest quarter, not a random one
    assert ds.train_x.shape == (30 * 4, N_FEATURES) and ds.train_y.shape == (120,)
    # held-out usefulness features equal the counts over the training recalls alone
    train_counts = rerank.usefulness_counts([r for r in rows if r.created_at < ds.split_at])
    for group in ds.heldout:
        for feats, mid in zip(group.features, group.ids, strict=True):
            pos, neg = train_counts.get(int(mid), (0, 0))
            assert feats[F["usefulness"]] == pytest.approx(rerank.usefulness(pos, neg))
    # a training row's usefulness counts only the recalls before it
    first = rerank.group_recalls(rows)[0]
    assert all(ds.train_x[i, F["log_feedback"]] == 0.0 for i in range(len(first)))
    # gains are the held-out period's share of helpful answers per memory
    held = [r for r in rows if r.created_at >= ds.split_at]
    mid = int(ds.heldout[0].ids[0])
    mine = [r.rating for r in held if r.memory_id == mid]
    assert ds.heldout[0].gains[0] == pytest.approx(mine.count(1) / len(mine))


def test_split_needs_a_training_recall_and_groups_are_ordered() -> None:
    rows = _world(2)
    with pytest.raises(ValueError, match="cannot be split"):
        rerank.split_by_time(rows[:4], 0.25)  # one recall only
    assert len(rerank.split_by_time(rows, 0.05).heldout) == 1  # at least one recall is always held out
    dup = [*rows[:4], rows[0]]  # the same memory twice in one recall counts once
    assert [len(g) for g in rerank.group_recalls(dup)] == [4]


def test_shared_documents_never_get_a_usefulness() -> None:
    cand = _cand(shared=True)
    rows = [LabelledRow(("a", 1), 5, cand, 0.0, 1), LabelledRow(("a", 1), 6, _cand(), 0.0, 1)]
    assert rerank.usefulness_counts(rows) == {6: (1, 0)}


def test_a_trained_model_beats_rrf_and_a_worse_one_is_refused() -> None:
    ds = rerank.split_by_time(_world(240), 0.25)
    model = rerank.train(ds.train_x, ds.train_y).model
    base = rerank.evaluate(ds.heldout, rerank.baseline_ranker)
    good = rerank.evaluate(ds.heldout, rerank.model_ranker(model))
    assert good.ndcg is not None and base.ndcg is not None and good.mrr is not None and base.mrr is not None
    assert good.ndcg > base.ndcg + 0.05 and good.mrr > base.mrr
    adopt, _ = rerank.should_adopt(good, base)
    assert adopt
    w = model.named_weights()
    assert w["kind_summary"] > 0 and w["importance"] > 0  # what helps, learnt from answer-level ratings alone

    # the same rows with the training period's ratings flipped: that model must lose to the good one
    poisoned = rerank.split_by_time(_world(240, flip_before=ds.split_at), 0.25)
    bad_model = rerank.train(poisoned.train_x, poisoned.train_y).model
    bad = rerank.evaluate(poisoned.heldout, rerank.model_ranker(bad_model))
    incumbent = rerank.evaluate(poisoned.heldout, rerank.model_ranker(model))
    adopt_bad, why = rerank.should_adopt(bad, incumbent)
    assert not adopt_bad and "not better" in why
    assert bad.ndcg is not None and incumbent.ndcg is not None and bad.ndcg < incumbent.ndcg - 0.03
    # a model with its weights negated ranks worst of all, and is refused against the plain RRF order
    flipped = RerankModel(-model.weights, -model.bias, model.mean, model.scale)
    assert not rerank.should_adopt(rerank.evaluate(ds.heldout, rerank.model_ranker(flipped)), base)[0]
