"""SelfTrainingEngine: a recall re-ranker learnt on the board from users' feedback on answers.

After a persona turn is stored, the memories its recall used are written to `recall_log`
(numbers only: cosine, ranks, fused score, age, importance, kind). A rating on the assistant
message (table `feedback`, the newest row per message wins) labels every memory recalled for
it: 1 helped, -1 did not, 0 says nothing. During Sommeil the idle job trains a logistic model
(maintenance/rerank.py) on the older labelled recalls, scores it on the newest ones (split by
time, never at random, so nothing from the future leaks into training) against the ranking in
use (the active version, or the plain RRF order when none is), and adopts it only when it is
strictly better. Every try is a row of `reranker_versions`, adopted or refused, with its
figures and the reason; rollback reactivates the previous adopted version.

Privacy: the model sees only numeric features, never a memory's text nor a user name, so the
one model shared by every user cannot carry one user's memory into another's recall. The
usefulness feature is counted per memory, and only for a user's own memories (shared
documents always read the neutral prior), so another user's ratings never reorder someone's
recall. `rerank` only reorders the hits Hippocampus already returned for the caller: it can
neither add nor remove a memory.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiosqlite
import numpy as np
import structlog

from mongarsd.config import SelfTrainingConfig
from mongarsd.errors import StoreError, ValidationError
from mongarsd.maintenance import rerank
from mongarsd.maintenance.rerank import Candidate, LabelledRow, RankingMetrics, RerankModel
from mongarsd.memory.db import Database
from mongarsd.memory.hippocampus import RecallHit

log = structlog.get_logger("mongarsd.maintenance.self_training")

JOB_NAME: Final = "self_training"
MAX_LOG_HITS: Final = 20  # recall_log rows written per turn at most
MAX_TRAIN_ROWS: Final = 20_000  # newest labelled rows a training run reads
MAX_RECALL_LOG_ROWS: Final = 100_000  # the log is cut to this many newest rows
UNLABELLED_RETENTION_S: Final = 30 * 86400.0  # a recall nobody rated within this is dropped from the log
MAX_REFUSED_VERSIONS: Final = 50  # refused versions kept (adopted ones are kept for rollback)
MAX_HISTORY: Final = 50  # versions shown by the history
MAX_USEFULNESS_ENTRIES: Final = 200_000  # memories whose feedback counts are held in RAM for rerank
RETRAIN_INTERVAL_S: Final = 6 * 3600.0  # an idle daemon retrains at least this often (feedback may arrive late)
RETRAIN_MIN_INTERVAL_S: Final = 600.0  # ... and sooner only after RETRAIN_NEW_RECALLS new recalls
RETRAIN_NEW_RECALLS: Final = 20
OUTCOMES: Final = ("adopted", "refused", "not_enough_data", "failed", "cancelled")


@dataclass(frozen=True)
class _Fit:
    """What a training run computed off the event loop."""

    recalls: int  # labelled recalls read
    skipped_rows: int  # rows whose stored features could not be read
    counts: rerank.Counts  # usefulness counts for rerank
    dataset: rerank.Dataset | None = None
    result: rerank.TrainResult | None = None
    candidate: RankingMetrics | None = None
    current: RankingMetrics | None = None  # the active version's, when there is one
    baseline: RankingMetrics | None = None


class SelfTrainingJob:
    """The Sommeil idle job that trains, evaluates and maybe adopts a re-ranker version."""

    name = JOB_NAME

    def __init__(self, engine: SelfTrainingEngine) -> None:
        self._engine = engine

    def due(self, now: float) -> bool:
        """Tell whether a training run is worth starting (no I/O; `now` unused: the engine keeps monotonic time)."""
        return self._engine.training_due()

    async def async_run(self) -> dict[str, Any]:
        return await self._engine.async_train()


class SelfTrainingEngine:
    """Learn a recall re-ranker from feedback; keep its versions; rerank recalls with the active one."""

    name = "self-training"
    start_timeout_s = 10.0
    stop_timeout_s = 0.5

    def __init__(self, *, config: SelfTrainingConfig, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._db = db
        self._clock = clock  # wall clock: memory ages and row times
        self._model: RerankModel | None = None
        self._active_id: int | None = None
        self._counts: rerank.Counts = {}
        self._lock = asyncio.Lock()  # one training or rollback at a time
        self._stop = threading.Event()  # set to stop a training thread now
        self._job = SelfTrainingJob(self)
        self._started = False
        self._training = False
        self._resync = False  # a run was cancelled while committing: the store may hold a newer active version
        self._last_attempt: float | None = None  # time.monotonic() of the last finished run
        self._new_recalls = 0  # recalls logged since then
        self.heldout_mrr: float | None = None  # of the ranking in use, at its last evaluation
        self.runs_total: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.logged_total = 0
        self.log_failures_total = 0

    # ---------------------------------------------------------------- lifecycle

    async def async_start(self) -> None:
        if self._started:
            return
        self._stop = threading.Event()
        await self._async_load_active()
        if self.config.enabled:
            rows = await self._async_labelled_rows()
            self._counts = await asyncio.to_thread(_counts_from_rows, rows)
        self._started = True
        log.info("self_training_started", enabled=self.config.enabled, active_version=self._active_id, memories_rated=len(self._counts))

    async def async_stop(self) -> None:
        self._stop.set()  # a training thread still running returns at its next check
        self._started = False

    @property
    def active_version(self) -> int | None:
        return self._active_id

    def job(self) -> SelfTrainingJob:
        return self._job

    def training_due(self) -> bool:
        """Whether the idle job has work: never ran since start, a run was cut short, or new recalls or time passed."""
        if not (self.config.enabled and self._started) or self._training:
            return False
        if self._resync or self._last_attempt is None:
            return True
        elapsed = time.monotonic() - self._last_attempt
        return elapsed >= RETRAIN_INTERVAL_S or (elapsed >= RETRAIN_MIN_INTERVAL_S and self._new_recalls >= RETRAIN_NEW_RECALLS)

    # ---------------------------------------------------------------- the chat path

    async def async_log_recall(self, user: str, message_id: int, hits: Sequence[RecallHit]) -> None:
        """Record the memories recalled for an answer, for feedback to label later (best effort: never fails the turn)."""
        if not self.config.enabled or not hits:
            return
        if not user:
            raise ValidationError("user must not be empty", param="user")
        if isinstance(message_id, bool) or not isinstance(message_id, int) or message_id < 1:
            raise ValidationError(f"message_id must be a positive integer, got {message_id!r}", param="message_id")
        hits = list(hits)[:MAX_LOG_HITS]
        now = self._clock()
        ids = [h.memory.id for h in hits]
        try:
            own = {
                int(r["id"])
                for r in await self._db.async_fetchall(
                    f"SELECT id FROM memories WHERE user = ? AND id IN ({','.join('?' * len(ids))})", (user, *ids)
                )
            }
            rows = [
                (
                    user,
                    message_id,
                    h.memory.id,
                    rank,
                    json.dumps(rerank.candidate_from_hit(h, now, shared=h.memory.id not in own).to_json()),
                    now,
                )
                for rank, h in enumerate(hits, start=1)
            ]

            async def op(conn: aiosqlite.Connection) -> None:
                # a retried turn logs once: the newest recall for the message replaces the older one
                await conn.execute("DELETE FROM recall_log WHERE user = ? AND message_id = ?", (user, message_id))
                await conn.executemany(
                    "INSERT INTO recall_log(user, message_id, memory_id, rank, features, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows
                )

            await self._db.async_write(op)
        except StoreError as err:
            # the answer is already stored and sent: losing one training example is better than failing the turn
            self.log_failures_total += 1
            log.warning("recall_log_failed", user=user, message_id=message_id, error=str(err))
            return
        self.logged_total += 1
        self._new_recalls += 1

    def rerank(self, hits: list[RecallHit]) -> list[RecallHit]:
        """Reorder one user's recall hits by the active model (no I/O; the same hits, never others); identity without one."""
        model = self._model
        if model is None or len(hits) < 2:
            return list(hits)
        now = self._clock()
        counts = self._counts
        x = rerank.feature_matrix([rerank.candidate_from_hit(h, now) for h in hits], [counts.get(h.memory.id, (0, 0)) for h in hits])
        scores = np.array([h.score for h in hits], dtype=np.float64)
        order = rerank.model_order(model, x, scores, np.array([h.memory.id for h in hits], dtype=np.int64))
        return [hits[int(i)] for i in order]

    # ---------------------------------------------------------------- training (the idle job)

    async def async_train(self) -> dict[str, Any]:
        """Train on labelled recalls, evaluate on the newest ones, adopt only a strictly better model.

        Cancellable at any await: the training thread is told to stop, nothing is recorded,
        and the job is due again in the next idle period.
        """
        if not self.config.enabled:
            return {"outcome": "disabled", "skipped": "self-training is disabled in the configuration"}
        async with self._lock:
            self._training = True
            stop = threading.Event()
            try:
                summary = await self._async_train_locked(stop)
            except asyncio.CancelledError:
                stop.set()
                self.runs_total["cancelled"] += 1
                raise
            except Exception:  # counted, then raised on: Sommeil records the run as failed
                self.runs_total["failed"] += 1
                self._finished()
                raise
            finally:
                self._training = False
            self.runs_total[summary["outcome"]] += 1
            self._finished()
            return summary

    def _finished(self) -> None:
        self._last_attempt = time.monotonic()
        self._new_recalls = 0

    async def _async_train_locked(self, stop: threading.Event) -> dict[str, Any]:
        if self._resync:
            await self._async_load_active()
            self._resync = False
        await self._async_prune()
        rows = await self._async_labelled_rows()
        current = self._model
        current_id = self._active_id
        outer = self._stop
        fit = await asyncio.to_thread(
            _fit, rows, self.config.min_examples, self.config.holdout_fraction, current, lambda: stop.is_set() or outer.is_set()
        )
        self._counts = fit.counts
        summary: dict[str, Any] = {"labelled_recalls": fit.recalls, "min_examples": self.config.min_examples}
        if fit.skipped_rows:
            summary["skipped_rows"] = fit.skipped_rows
        if fit.dataset is None or fit.result is None or fit.candidate is None or fit.baseline is None:
            summary["outcome"] = "not_enough_data"
            summary["reason"] = f"{fit.recalls} labelled recalls; training needs {self.config.min_examples}"
            summary["skipped"] = summary["reason"]  # Sommeil records the run as skipped
            log.info("self_training_skipped", **summary)
            return summary
        reference = fit.current if fit.current is not None else fit.baseline
        compared_with = f"version {current_id}" if current_id is not None else "the RRF order"
        adopt, why = rerank.should_adopt(fit.candidate, reference)
        metrics = {
            "adopted": adopt,
            "candidate": fit.candidate.to_json(),
            "current": reference.to_json(),
            "baseline": fit.baseline.to_json(),
            "compared_with": compared_with,
            "train_recalls": fit.dataset.train_recalls,
            "heldout_recalls": fit.dataset.heldout_recalls,
            "train_rows": len(fit.dataset.train_y),
            "split_at": fit.dataset.split_at,
            "iterations": fit.result.iterations,
            "converged": fit.result.converged,
            "loss": round(fit.result.loss, 6),
        }
        reason = f"{why} ({compared_with})"
        try:
            version = await self._async_record(fit.result.model, metrics, reason, adopt=adopt)
        except asyncio.CancelledError:
            self._resync = adopt  # the write may still commit: reload the active version before trusting memory
            raise
        if adopt:
            self._model, self._active_id = fit.result.model, version
            self.heldout_mrr = fit.candidate.mrr
        else:
            self.heldout_mrr = reference.mrr
        summary.update(outcome="adopted" if adopt else "refused", version=version, reason=reason, metrics=metrics)
        log.info("self_training_run", outcome=summary["outcome"], version=version, reason=reason)
        return summary

    async def _async_record(self, model: RerankModel, metrics: dict[str, Any], reason: str, *, adopt: bool) -> int:
        weights = json.dumps(model.to_json())
        now = self._clock()

        async def op(conn: aiosqlite.Connection) -> int:
            if adopt:
                await conn.execute("UPDATE reranker_versions SET active = 0 WHERE active = 1")
            cur = await conn.execute(
                "INSERT INTO reranker_versions(created_at, weights, metrics, reason, active) VALUES (?, ?, ?, ?, ?)",
                (now, weights, json.dumps(metrics), reason, 1 if adopt else 0),
            )
            # refused versions only explain the past: keep the newest few (adopted ones stay for rollback)
            await conn.execute(
                "DELETE FROM reranker_versions WHERE active = 0 AND id NOT IN (SELECT id FROM reranker_versions "
                "WHERE json_extract(metrics, '$.adopted') = 1) AND id NOT IN (SELECT id FROM reranker_versions "
                "WHERE active = 0 ORDER BY id DESC LIMIT ?)",
                (MAX_REFUSED_VERSIONS,),
            )
            return int(cur.lastrowid or 0)

        version: int = await self._db.async_write(op)
        return version

    async def _async_prune(self) -> None:
        cutoff = self._clock() - UNLABELLED_RETENTION_S

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "DELETE FROM recall_log WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM feedback f "
                "WHERE f.user = recall_log.user AND f.message_id = recall_log.message_id)",
                (cutoff,),
            )
            await conn.execute("DELETE FROM recall_log WHERE id <= (SELECT max(id) FROM recall_log) - ?", (MAX_RECALL_LOG_ROWS,))

        await self._db.async_write(op)

    async def _async_labelled_rows(self) -> list[tuple[Any, ...]]:
        """The newest labelled recall rows: a user's own rating (the newest per message) on the message the recall served."""
        rows = await self._db.async_fetchall(
            "SELECT r.user AS user, r.message_id AS message_id, r.memory_id AS memory_id, r.features AS features, "
            "r.created_at AS created_at, f.rating AS rating FROM recall_log r "
            "JOIN (SELECT user, message_id, max(id) AS fid FROM feedback WHERE message_id IS NOT NULL GROUP BY user, message_id) lf "
            "ON lf.user = r.user AND lf.message_id = r.message_id JOIN feedback f ON f.id = lf.fid "
            "WHERE f.rating != 0 ORDER BY r.id DESC LIMIT ?",
            (MAX_TRAIN_ROWS,),
        )
        return [tuple(r) for r in reversed(rows)]

    # ---------------------------------------------------------------- versions

    async def _async_load_active(self) -> None:
        row = await self._db.async_fetchone("SELECT id, weights, metrics FROM reranker_versions WHERE active = 1 ORDER BY id DESC LIMIT 1")
        self._model, self._active_id, self.heldout_mrr = None, None, None
        if row is None:
            return
        try:
            self._model = RerankModel.from_json(json.loads(row["weights"]))
        except ValueError as err:  # json.JSONDecodeError is a ValueError: damaged or of another feature format
            log.error("reranker_version_unreadable", version=int(row["id"]), error=str(err))
            return
        self._active_id = int(row["id"])
        self.heldout_mrr = _candidate_mrr(row["metrics"])

    async def async_history(self, *, limit: int = MAX_HISTORY) -> dict[str, Any]:
        """The active version and the newest versions (adopted and refused), newest first."""
        if self._resync and not self._lock.locked():
            async with self._lock:
                await self._async_load_active()
                self._resync = False
        rows = await self._db.async_fetchall(
            "SELECT id, created_at, weights, metrics, reason, active FROM reranker_versions ORDER BY id DESC LIMIT ?", (limit,)
        )
        versions = [_version_public(r) for r in rows]
        active = next((v for v in versions if v["active"]), None)
        if active is None and self._active_id is not None:
            row = await self._db.async_fetchone(
                "SELECT id, created_at, weights, metrics, reason, active FROM reranker_versions WHERE id = ?", (self._active_id,)
            )
            active = None if row is None else _version_public(row)
        return {
            "enabled": self.config.enabled,
            "active": active,
            "versions": versions,
            "min_examples": self.config.min_examples,
            "holdout_fraction": self.config.holdout_fraction,
        }

    async def async_rollback(self) -> dict[str, Any]:
        """Deactivate the active version and reactivate the previous adopted one (none: the plain RRF order).

        ValidationError (409) when no version is active.
        """
        async with self._lock:
            active = await self._db.async_fetchone("SELECT id FROM reranker_versions WHERE active = 1 ORDER BY id DESC LIMIT 1")
            if active is None:
                raise ValidationError("no re-ranker version is active: there is nothing to roll back", status=409)
            current = int(active["id"])
            rows = await self._db.async_fetchall(
                "SELECT id, weights, metrics FROM reranker_versions WHERE id < ? AND json_extract(metrics, '$.adopted') = 1 ORDER BY id DESC",
                (current,),
            )
            previous: tuple[int, RerankModel, str] | None = None
            for row in rows:
                try:
                    previous = (int(row["id"]), RerankModel.from_json(json.loads(row["weights"])), str(row["metrics"]))
                    break
                except ValueError:  # another feature format: it could not rank today's features
                    continue
            now = self._clock()
            target = None if previous is None else previous[0]

            async def op(conn: aiosqlite.Connection) -> None:
                await conn.execute(
                    "UPDATE reranker_versions SET active = 0, metrics = json_set(metrics, '$.rolled_back_at', ?) WHERE active = 1", (now,)
                )
                if target is not None:
                    await conn.execute("UPDATE reranker_versions SET active = 1 WHERE id = ?", (target,))

            await self._db.async_write(op)
            self._resync = False
            if previous is None:
                self._model, self._active_id, self.heldout_mrr = None, None, None
            else:
                self._model, self._active_id, self.heldout_mrr = previous[1], previous[0], _candidate_mrr(previous[2])
            log.info("reranker_rolled_back", rolled_back=current, active_version=target)
        history = await self.async_history()
        return {"rolled_back": current, "active": history["active"], "versions": history["versions"]}

    # ---------------------------------------------------------------- metrics

    def metrics(self) -> Iterable[tuple[str, str, str, float, dict[str, str]]]:
        """Pull-time samples for Metrics.add_source."""
        for outcome, n in self.runs_total.items():
            yield ("mongarsd_self_training_runs_total", "counter", "Re-ranker training runs by outcome.", float(n), {"outcome": outcome})
        yield (
            "mongarsd_self_training_active_version",
            "gauge",
            "Id of the active re-ranker version (0: the plain RRF order).",
            float(self._active_id or 0),
            {},
        )
        if self.heldout_mrr is not None:
            yield ("mongarsd_self_training_heldout_mrr", "gauge", "Held-out MRR of the recall ranking in use.", self.heldout_mrr, {})
        yield ("mongarsd_self_training_recalls_logged_total", "counter", "Recalls written to the recall log.", float(self.logged_total), {})


# ------------------------------------------------------------------------------ helpers (pure or thread)


def _parse_rows(rows: Sequence[tuple[Any, ...]]) -> tuple[list[LabelledRow], int]:
    """Turn (user, message_id, memory_id, features, created_at, rating) rows into LabelledRows; count unreadable ones."""
    out: list[LabelledRow] = []
    skipped = 0
    for user, message_id, memory_id, features, created_at, rating in rows:
        try:
            cand = Candidate.from_json(json.loads(features))
        except ValueError:  # a damaged row costs one example, never the run
            skipped += 1
            continue
        out.append(LabelledRow((str(user), int(message_id)), int(memory_id), cand, float(created_at), 1 if int(rating) > 0 else -1))
    return out, skipped


def _bounded_counts(parsed: Sequence[LabelledRow]) -> rerank.Counts:
    counts = rerank.usefulness_counts(parsed)
    if len(counts) > MAX_USEFULNESS_ENTRIES:
        counts = dict(sorted(counts.items())[-MAX_USEFULNESS_ENTRIES:])  # the newest memories
    return counts


def _counts_from_rows(rows: Sequence[tuple[Any, ...]]) -> rerank.Counts:
    """Usefulness counts from labelled rows (blocking: runs in a worker thread)."""
    return _bounded_counts(_parse_rows(rows)[0])


def _fit(
    rows: Sequence[tuple[Any, ...]],
    min_examples: int,
    holdout_fraction: float,
    current: RerankModel | None,
    should_stop: Callable[[], bool],
) -> _Fit:
    """Parse, split by time, train and evaluate (blocking: runs in a worker thread)."""
    parsed, skipped = _parse_rows(rows)
    counts = _bounded_counts(parsed)
    recalls = len(rerank.group_recalls(parsed))
    if recalls < max(min_examples, 2):
        return _Fit(recalls, skipped, counts)
    dataset = rerank.split_by_time(parsed, holdout_fraction)
    result = rerank.train(dataset.train_x, dataset.train_y, should_stop=should_stop)
    candidate = rerank.evaluate(dataset.heldout, rerank.model_ranker(result.model))
    baseline = rerank.evaluate(dataset.heldout, rerank.baseline_ranker)
    cur = None if current is None else rerank.evaluate(dataset.heldout, rerank.model_ranker(current))
    return _Fit(recalls, skipped, counts, dataset, result, candidate, cur, baseline)


def _candidate_mrr(metrics_json: object) -> float | None:
    try:
        data = json.loads(str(metrics_json))
        value = data["candidate"]["mrr"]
    except (ValueError, KeyError, TypeError):  # an old or damaged record: the gauge stays unset
        return None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _version_public(row: Any) -> dict[str, Any]:
    try:
        metrics = json.loads(row["metrics"])
    except ValueError:
        metrics = {}
    try:
        weights: dict[str, float] | None = RerankModel.from_json(json.loads(row["weights"])).named_weights()
    except ValueError:  # another feature format: shown without weights
        weights = None
    return {
        "id": int(row["id"]),
        "created_at": float(row["created_at"]),
        "active": bool(row["active"]),
        "adopted": bool(metrics.get("adopted", False)) if isinstance(metrics, dict) else False,
        "reason": str(row["reason"]),
        "metrics": metrics,
        "weights": weights,
    }
