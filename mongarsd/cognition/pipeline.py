"""The conversation pipeline: recall -> style -> prompt -> llm -> bouche -> durable store.

Each stage runs under its own timeout. Optional stages (history, recall, profile, profile
update) degrade gracefully: the turn goes on without them and the result names what was
skipped. Generation and the durable store are not optional: a turn is acknowledged only
after the user's message and the answer are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import structlog

from mongarsd.cognition import bouche, mimicry, personality
from mongarsd.cognition.prompt import Msg, PromptParts, fit
from mongarsd.errors import EmbedderUnavailableError, InferenceError, MongarsError, StoreError, ValidationError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.sampling import SamplingSpec, build_params, check_fits, context_limit, reply_reserve
from mongarsd.memory.hippocampus import Hippocampus, Message, RecallResult
from mongarsd.memory.profiles import ProfileRow, ProfileStore
from mongarsd.sanitize import clean_text

log = structlog.get_logger("mongarsd.cognition.pipeline")

DEFAULT_SYSTEM_PROMPT = (
    "You are monGARS, a private assistant running on the user's own device. "
    "Answer helpfully, honestly and concisely. If you do not know, say so."
)
MAX_MESSAGE_CHARS = 32_000
MAX_SESSION_ID_CHARS = 100
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,99}$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PERSONA_SESSION_ID = "default"
STAGES = ("validate", "history", "recall", "profile", "prompt", "first_token", "generate", "shape", "persist", "total")


@dataclass(frozen=True, slots=True)
class StageTimeouts:
    """Seconds each stage may take; optional stages are skipped past their limit."""

    history_s: float = 2.0
    recall_s: float = 3.0
    profile_s: float = 2.0
    model_s: float = 180.0  # getting the engine (may load the model)
    prompt_s: float = 10.0
    first_token_s: float = 300.0  # includes waiting in the engine's queue
    generate_s: float = 900.0
    persist_s: float = 60.0
    update_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """A streamed piece of the answer (raw model text, before final shaping)."""

    text: str


@dataclass(slots=True)
class ChatResult:
    response: str
    session_id: str
    message_id: int  # the assistant message
    user_message_id: int
    model: str
    finish_reason: str
    usage: dict[str, int]
    memories_used: list[dict[str, Any]]
    timings_ms: dict[str, float]
    degraded: list[str] = field(default_factory=list)
    memory_id: int | None = None

    @property
    def processing_time_ms(self) -> float:
        return self.timings_ms.get("total", 0.0)

    def public(self) -> dict[str, Any]:
        return {
            "response": self.response,
            "session_id": self.session_id,
            "message_id": self.message_id,
            "user_message_id": self.user_message_id,
            "processing_time_ms": round(self.processing_time_ms, 1),
            "memories_used": self.memories_used,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "degraded": self.degraded,
            "timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
        }


# ------------------------------------------------------------------------------ pure helpers


def sanitize_message(message: object, *, max_chars: int = MAX_MESSAGE_CHARS, param: str = "message") -> str:
    """Validate a user message: a non-empty string within the size cap; strip control characters, repair unpaired surrogates."""
    if not isinstance(message, str):
        raise ValidationError(f"'{param}' must be a string, got {type(message).__name__}", param=param)
    if len(message) > max_chars:
        raise ValidationError(f"'{param}' is too long ({len(message)} characters; at most {max_chars})", param=param, status=413)
    # unpaired surrogates become U+FFFD, as everywhere else (mongarsd.sanitize)
    cleaned = _CONTROL_RE.sub("", clean_text(message)).strip()
    if not cleaned:
        raise ValidationError(f"'{param}' must not be empty", param=param)
    return cleaned


def validate_session_id(session_id: object) -> str:
    """Return a valid session id, or a new one when None."""
    if session_id is None:
        return uuid.uuid4().hex
    if not isinstance(session_id, str) or not SESSION_ID_RE.match(session_id):
        raise ValidationError(
            "'session_id' must be 1-100 characters: letters, digits and _ . : @ -, starting with a letter or digit", param="session_id"
        )
    return session_id


def content_text(content: object, param: str) -> str:
    """Flatten OpenAI message content (a string or a list of text parts) to text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ValidationError("only text content parts are supported", param=param)
        return "\n".join(texts)
    if content is None:
        return ""
    raise ValidationError(f"'{param}' must be a string or a list of text parts", param=param)


def select_memories(recall: RecallResult, history: Sequence[Msg]) -> list[dict[str, Any]]:
    """Keep recalled memories not already present verbatim in the prompt's history."""
    in_history = {m["content"].strip() for m in history}
    out: list[dict[str, Any]] = []
    for hit in recall.hits:
        if hit.memory.text.strip() in in_history:
            continue
        out.append({"id": hit.memory.id, "text": hit.memory.text, "score": round(hit.score, 6), "similarity": hit.similarity})
    return out


def shaped_suffix(raw: str, shaped: str) -> str:
    """What Bouche appended to a streamed answer (a closing fence, an ellipsis), to send last."""
    base = raw.strip()
    if base and shaped.startswith(base):
        return shaped[len(base) :]
    return ""


def history_messages(history: Sequence[Message]) -> list[Msg]:
    return [{"role": m.role, "content": m.content} for m in history if m.role in ("user", "assistant") and m.content]


# ------------------------------------------------------------------------------ service


class ConversationPipeline:
    """Run a chat turn for one user with their memory, style and history."""

    name = "pipeline"
    start_timeout_s = 5.0
    stop_timeout_s = 1.0

    def __init__(
        self,
        *,
        hippocampus: Hippocampus,
        llm: InferenceManager | LlamaEngine | None,
        profiles: ProfileStore | None = None,
        recall_k: int = 5,
        history_turns: int = 8,
        default_model: str | None = None,
        max_tokens_default: int = 256,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_message_chars: int = MAX_MESSAGE_CHARS,
        timeouts: StageTimeouts | None = None,
    ) -> None:
        self.hippocampus = hippocampus
        self.llm = llm
        self.profiles = profiles if profiles is not None else ProfileStore(db=hippocampus.db)
        self.recall_k = recall_k
        self.history_turns = history_turns
        self.default_model = default_model
        self.max_tokens_default = max_tokens_default
        self.system_prompt = system_prompt
        self.max_message_chars = max_message_chars
        self.timeouts = timeouts or StageTimeouts()
        self.turns_total = 0
        self.failures_total = 0
        self.degraded_total: dict[str, int] = {}
        self.stage_seconds_total: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    async def async_start(self) -> None:
        return None

    async def async_stop(self) -> None:
        return None

    # ---------------------------------------------------------------- public entry points

    @overload
    async def async_chat(
        self, user: str, message: object, session_id: object = None, *, stream: Literal[False] = False, **kw: Any
    ) -> ChatResult: ...

    @overload
    async def async_chat(
        self, user: str, message: object, session_id: object = None, *, stream: Literal[True], **kw: Any
    ) -> AsyncGenerator[ChatChunk | ChatResult, None]: ...

    async def async_chat(
        self, user: str, message: object, session_id: object = None, *, stream: bool = False, **kw: Any
    ) -> ChatResult | AsyncGenerator[ChatChunk | ChatResult, None]:
        """Run one turn. stream=False: the final ChatResult. stream=True: an iterator of ChatChunk then one ChatResult.

        Keyword args: model, spec (SamplingSpec: the client's sampling settings), and context
        (research text for the prompt only, never stored as the user's words).
        """
        it = self.async_chat_stream(user, message, session_id, **kw)
        if stream:
            return it
        return await _last_result(it)

    async def async_chat_messages(
        self,
        user: str,
        messages: Sequence[Mapping[str, Any]],
        stream: bool = False,
        spec: SamplingSpec | None = None,
        *,
        session_id: str | None = None,
        model: str | None = None,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Run the persona `mongars` on OpenAI-style messages; yield engine-style TokenEvents.

        The last message must come from the user: it is the turn (stored with the answer).
        Earlier user/assistant messages, when given, replace the stored history in the
        prompt; system messages are added to the system prompt. Recall and style use the
        caller's own memory and profile. stream=True yields the raw pieces as they come and
        the final event carries any closing text Bouche added; stream=False yields the whole
        shaped answer as one piece. The final event has finish_reason and token counts.
        """
        if not isinstance(messages, Sequence) or not messages:
            raise ValidationError("'messages' must be a non-empty list", param="messages")
        history: list[Msg] = []
        extra_system: list[str] = []
        for n, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValidationError(f"messages[{n}] must be an object", param=f"messages[{n}]")
            role = m.get("role")
            text = content_text(m.get("content"), f"messages[{n}].content")
            if role in ("system", "developer"):
                extra_system.append(text)
            elif role in ("user", "assistant"):
                history.append({"role": str(role), "content": text})
            elif role == "tool":
                continue  # tool results belong to the raw-model surface
            else:
                raise ValidationError(f"messages[{n}].role must be system, user or assistant", param=f"messages[{n}].role")
        if not history or history[-1]["role"] != "user":
            raise ValidationError("the last message must have role 'user'", param="messages")
        turn = history.pop()
        it = self.async_chat_stream(
            user,
            turn["content"],
            session_id if session_id is not None else PERSONA_SESSION_ID,
            model=model,
            spec=spec,
            history_override=history if history else None,
            extra_system=extra_system,
        )
        raw: list[str] = []
        try:
            async for item in it:
                if isinstance(item, ChatChunk):
                    raw.append(item.text)
                    if stream:
                        yield TokenEvent(item.text, 0)
                    continue
                tail = item.response if not stream else shaped_suffix("".join(raw), item.response)
                yield TokenEvent(
                    tail,
                    -1,
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.usage["prompt_tokens"],
                    completion_tokens=item.usage["completion_tokens"],
                    cached_tokens=item.usage["cached_tokens"],
                )
        finally:
            await it.aclose()

    # ---------------------------------------------------------------- the turn

    async def async_chat_stream(
        self,
        user: str,
        message: object,
        session_id: object = None,
        *,
        model: str | None = None,
        spec: SamplingSpec | None = None,
        context: Sequence[str] = (),
        history_override: Sequence[Msg] | None = None,
        extra_system: Sequence[str] = (),
    ) -> AsyncGenerator[ChatChunk | ChatResult, None]:
        """Yield ChatChunk pieces while generating, then exactly one ChatResult once the turn is durable."""
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        degraded: list[str] = []
        text = sanitize_message(message, max_chars=self.max_message_chars)
        sid = validate_session_id(session_id)
        spec = spec if spec is not None else SamplingSpec()
        await self.hippocampus.db.async_check_space()  # a turn that could not be stored is not generated
        timings["validate"] = _ms(t_start)

        # The optional stages run side by side; the group cancels them all if the turn is cancelled.
        async with asyncio.TaskGroup() as tg:
            history_task = (
                None
                if history_override is not None
                else tg.create_task(self._async_stage("history", self._async_history(user, sid), timings, degraded), name="turn-history")
            )
            recall_task = tg.create_task(
                self._async_stage("recall", self.hippocampus.async_recall(user, text, self.recall_k), timings, degraded), name="turn-recall"
            )
            profile_task = tg.create_task(
                self._async_stage("profile", self.profiles.async_get(user), timings, degraded), name="turn-profile"
            )
        hist_msgs: list[Msg] = list(history_override or []) if history_task is None else (history_task.result() or [])
        recall: RecallResult = recall_task.result() or RecallResult([])
        profile: ProfileRow = profile_task.result() or ProfileRow(user, {}, {}, None)
        if recall.degraded:
            degraded.append("recall:" + recall.status)
        memories = select_memories(recall, hist_msgs)
        directives = mimicry.style_directives(profile.mimicry, text) + personality.style_directives(profile.personality)
        system = self.system_prompt + "".join("\n\n" + s.strip() for s in extra_system if s.strip())
        parts = PromptParts(
            system=system,
            user_message=text,
            directives=directives,
            memories=[m["text"] for m in memories],
            history=hist_msgs,
            context=list(context),
        )

        async with self._async_engine(model, timings) as (engine, model_id):
            t0 = time.perf_counter()
            n_ctx = context_limit(spec, int(engine.n_ctx_per_slot))
            reserve = reply_reserve(spec, self.max_tokens_default)
            if n_ctx - reserve < 1:
                check_fits(1, reserve, n_ctx)  # the one overflow message: nothing fits beside the reply

            def tokenize(msgs: list[Msg]) -> list[int]:
                return list(engine.tokenize_chat(msgs))

            # the fitted prompt's token ids are carried through to generation, never tokenized again
            fitted = await asyncio.wait_for(asyncio.to_thread(fit, parts, tokenize, n_ctx - reserve), self.timeouts.prompt_s)
            tokens = fitted.token_ids
            gparams = build_params(spec, n_prompt=len(tokens), n_ctx=int(engine.n_ctx_per_slot), max_tokens_default=self.max_tokens_default)
            timings["prompt"] = _ms(t0)
            memories = memories[: fitted.memories_kept]

            t_gen = time.perf_counter()
            pieces: list[str] = []
            final: Any = None
            first = True
            gen_iter = engine.async_generate(tokens, gparams, cache_key=f"{user}\x1f{sid}")
            try:
                async with asyncio.timeout(self.timeouts.generate_s) as deadline:
                    if first:
                        deadline.reschedule(asyncio.get_running_loop().time() + min(self.timeouts.first_token_s, self.timeouts.generate_s))
                    async for ev in gen_iter:
                        if first:
                            first = False
                            timings["first_token"] = _ms(t_gen)  # queue wait + prefill
                            deadline.reschedule(asyncio.get_running_loop().time() + self.timeouts.generate_s)
                        if ev.text:
                            pieces.append(ev.text)
                            yield ChatChunk(ev.text)
                        if ev.finish_reason is not None:
                            final = ev
            except TimeoutError:
                self.failures_total += 1
                raise InferenceError(f"generation timed out (limit {self.timeouts.generate_s:g} s)") from None
            finally:
                await gen_iter.aclose()
            timings["generate"] = _ms(t_gen)
        if final is None:
            raise InferenceError("the model stopped without finishing the answer")

        t0 = time.perf_counter()
        answer = bouche.shape("".join(pieces), truncated=final.finish_reason == "length")
        timings["shape"] = _ms(t0)

        t0 = time.perf_counter()
        stored = await self._async_persist(user, sid=sid, text=text, answer=answer, model_id=model_id, final=final, degraded=degraded)
        timings["persist"] = _ms(t0)
        timings["total"] = _ms(t_start)
        self.turns_total += 1
        for stage, ms in timings.items():
            if stage in self.stage_seconds_total:
                self.stage_seconds_total[stage] += ms / 1000.0
        for d in degraded:
            self.degraded_total[d] = self.degraded_total.get(d, 0) + 1
        usage = {
            "prompt_tokens": int(final.prompt_tokens),
            "completion_tokens": int(final.completion_tokens),
            "total_tokens": int(final.prompt_tokens + final.completion_tokens),
            "cached_tokens": int(final.cached_tokens),
        }
        log.info("chat_turn", user=user, session=sid, model=model_id, ms=round(timings["total"], 1), degraded=degraded or None, **usage)
        yield ChatResult(
            response=answer,
            session_id=sid,
            message_id=stored.assistant_message_id,
            user_message_id=stored.user_message_id,
            model=model_id,
            finish_reason=str(final.finish_reason),
            usage=usage,
            memories_used=memories,
            timings_ms=timings,
            degraded=degraded,
            memory_id=stored.memory_id,
        )

    # ---------------------------------------------------------------- stages

    async def _async_history(self, user: str, sid: str) -> list[Msg]:
        msgs = await self.hippocampus.async_history(user, session_id=sid, limit=self.history_turns * 2)
        return history_messages(msgs)

    async def _async_stage(self, name: str, coro: Any, timings: dict[str, float], degraded: list[str]) -> Any:
        """Run an optional stage under its timeout; on failure log, mark it degraded and return None."""
        limit = float(getattr(self.timeouts, name + "_s"))
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(coro, limit)
        except TimeoutError:
            degraded.append(name + ":timeout")
            log.warning("pipeline_stage_timeout", stage=name, limit_s=limit)
        except (StoreError, EmbedderUnavailableError, InferenceError) as err:
            # Expected failure domains of optional stages: the turn continues without them.
            degraded.append(name + ":error")
            log.warning("pipeline_stage_failed", stage=name, error=str(err))
        finally:
            timings[name] = _ms(t0)
        return None

    @contextlib.asynccontextmanager
    async def _async_engine(self, model: str | None, timings: dict[str, float]) -> AsyncIterator[tuple[LlamaEngine, str]]:
        """Hold the engine for the turn: a manager lease, or a bare engine (tools and tests)."""
        t0 = time.perf_counter()
        llm = self.llm
        if llm is None:
            raise InferenceError("no language model is configured")
        if isinstance(llm, LlamaEngine):
            timings["model"] = _ms(t0)
            yield llm, llm.model_id
            return
        model_id = model or self.default_model or llm.default_model
        async with contextlib.AsyncExitStack() as stack:
            lease = await asyncio.wait_for(stack.enter_async_context(llm.async_use(model_id)), self.timeouts.model_s)
            timings["model"] = _ms(t0)
            yield lease.engine, lease.entry.id

    async def _async_persist(self, user: str, *, sid: str, text: str, answer: str, model_id: str, final: Any, degraded: list[str]) -> Any:
        """Store the turn durably (required) and fold it into the style profile (optional), in one writer batch."""

        def update(mim: dict[str, Any], per: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            new_mim = mimicry.update_profile(mim, text)
            return new_mim, personality.observe(per, new_mim)

        async def async_update_profile() -> None:
            try:
                await asyncio.wait_for(self.profiles.async_update(user, update), self.timeouts.update_s)
            except TimeoutError:
                degraded.append("profile_update:timeout")
            except MongarsError as err:
                degraded.append("profile_update:error")
                log.warning("profile_update_failed", user=user, error=str(err))

        async def async_store() -> Any:
            """Return the stored turn, or the StoreError to raise once the group is done."""
            try:
                return await asyncio.wait_for(
                    self.hippocampus.async_store_turn(
                        user,
                        sid,
                        text,
                        answer,
                        model=model_id,
                        prompt_tokens=int(final.prompt_tokens),
                        completion_tokens=int(final.completion_tokens),
                    ),
                    self.timeouts.persist_s,
                )
            except TimeoutError:
                # a write already queued still commits: a timeout cannot promise it was not saved
                return StoreError(f"storing the turn took longer than {self.timeouts.persist_s:g} s; it may or may not be saved")
            except StoreError as err:
                return err

        # Both writes go out together and share one writer batch.
        async with asyncio.TaskGroup() as tg:
            tg.create_task(async_update_profile(), name="turn-profile-update")
            store = tg.create_task(async_store(), name="turn-store")
        stored = store.result()
        if isinstance(stored, StoreError):
            raise stored
        return stored

    # ---------------------------------------------------------------- feedback and profile

    async def async_feedback(self, user: str, *, rating: int, message_id: int | None = None, comment: str = "") -> int:
        """Record feedback and let it adjust the user's personality profile."""
        fid = await self.profiles.async_add_feedback(user, rating=rating, message_id=message_id, comment=comment)
        await self.profiles.async_update(user, lambda mim, per: (mim, personality.apply_feedback(per, rating, comment)))
        return fid

    async def async_profile(self, user: str) -> dict[str, Any]:
        row = await self.profiles.async_get(user)
        return profile_public(row)

    async def async_edit_profile(self, user: str, edit: dict[str, Any]) -> dict[str, Any]:
        personality.validate_edit(edit)
        row = await self.profiles.async_update(user, lambda mim, per: (mim, personality.apply_edit(per, edit)))
        return profile_public(row)

    def metrics(self) -> Any:
        """Pull-time samples for Metrics.add_source."""
        yield ("mongarsd_chat_turns_total", "counter", "Chat turns completed by the pipeline.", float(self.turns_total), {})
        yield ("mongarsd_chat_failures_total", "counter", "Chat turns that failed in generation.", float(self.failures_total), {})
        for stage, secs in self.stage_seconds_total.items():
            yield ("mongarsd_chat_stage_seconds_total", "counter", "Time spent per pipeline stage.", secs, {"stage": stage})
        for what, n in self.degraded_total.items():
            yield ("mongarsd_chat_degraded_total", "counter", "Turns that went on without an optional stage.", float(n), {"stage": what})


def profile_public(row: ProfileRow) -> dict[str, Any]:
    mim = row.mimicry
    return {
        "user": row.user,
        "style": {k: mim.get(k) for k in (*mimicry.NUMERIC_FEATURES, "languages", "messages") if k in mim},
        "language": mimicry.dominant_language(mim),
        "personality": personality.normalize(row.personality),
        "directives": mimicry.style_directives(mim) + personality.style_directives(row.personality),
        "updated_at": row.updated_at,
    }


async def _last_result(it: AsyncIterator[ChatChunk | ChatResult]) -> ChatResult:
    result: ChatResult | None = None
    async for item in it:
        if isinstance(item, ChatResult):
            result = item
    if result is None:
        raise InferenceError("the turn ended without a result")
    return result


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
