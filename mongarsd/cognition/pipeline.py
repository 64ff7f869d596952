"""The conversation pipeline: recall -> style -> prompt -> llm -> bouche -> durable store.

Each stage runs under its own timeout. Optional stages (history, recall, profile, profile
update) degrade gracefully: the turn goes on without them and the result names what was
skipped. Generation and the durable store are not optional: a turn is acknowledged only
after the user's message and the answer are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, overload

import structlog

from mongarsd.cognition import bouche, mimicry, personality
from mongarsd.cognition.hands import HandContext, HandResult, Hands
from mongarsd.cognition.prompt import Msg, PromptParts, fit
from mongarsd.errors import EmbedderUnavailableError, InferenceError, MongarsError, StoreError, ValidationError
from mongarsd.inference.events import TokenEvent
from mongarsd.inference.llm import LlamaEngine
from mongarsd.inference.manager import InferenceManager
from mongarsd.inference.sampling import (
    GenerationParams,
    SamplingSpec,
    build_params,
    check_fits,
    context_limit,
    reply_reserve,
)
from mongarsd.inference.tools import (
    FINISH_REPEATED,
    FINISH_TOOL_CALLS,
    NO_TOOLS,
    GenEvent,
    ToolCall,
    ToolCallEvent,
    ToolChoice,
    ToolSet,
    ToolSpec,
    answered_calls,
    async_split_calls,
    prepare_messages,
    template_supports_tools,
    with_tools,
    without_tools,
)
from mongarsd.memory.hippocampus import Hippocampus, Message, RecallResult
from mongarsd.memory.profiles import ProfileRow, ProfileStore
from mongarsd.sanitize import clean_text

if TYPE_CHECKING:
    from mongarsd.cognition.cortex import Cortex
    from mongarsd.maintenance.energy import EnergyMonitor
    from mongarsd.maintenance.self_training import SelfTrainingEngine

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
SOURCED_KINDS: Final = frozenset({"document", "research"})  # memories read from a source the answer names
CITE_MIN_SIMILARITY: Final = 0.35  # a sourced memory this close to the question is named in the answer
MAX_SOURCES_NAMED: Final = 3
MAX_SOURCE_LABEL_CHARS: Final = 200
MAX_TOOL_ROUNDS = 1  # generation rounds that may call the daemon's hands before the answer
STAGES = ("validate", "history", "recall", "research", "profile", "prompt", "first_token", "generate", "shape", "persist", "total")


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


@dataclass(frozen=True, slots=True)
class ChatToolCall:
    """The answer calls one of the client's own tools: sent to the client, never run here."""

    call: ToolCall


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
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # calls to the client's tools
    hands_used: list[dict[str, Any]] = field(default_factory=list)  # Mains Virtuelles calls run for this answer
    sources: list[dict[str, Any]] = field(default_factory=list)  # documents and research the answer drew on
    research: dict[str, Any] | None = None  # research the Curiosity Engine started for this turn
    energy: dict[str, Any] | None = None  # joules of this turn's generation and their source

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
            "tool_calls": self.tool_calls,
            "hands_used": self.hands_used,
            "sources": self.sources,
            "research": self.research,
            "energy": self.energy,
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


def memory_source(kind: str, provenance: str | None) -> dict[str, Any] | None:
    """Where a document or research memory came from (its provenance's source and title), else None (pure)."""
    if kind not in SOURCED_KINDS or not provenance:
        return None
    try:
        prov = json.loads(provenance)
    except ValueError:
        return None
    if not isinstance(prov, dict) or not isinstance(prov.get("source"), str) or not prov["source"]:
        return None
    title = prov.get("title") if isinstance(prov.get("title"), str) else ""
    out: dict[str, Any] = {"source": prov["source"][:MAX_SOURCE_LABEL_CHARS], "title": str(title)[:MAX_SOURCE_LABEL_CHARS], "kind": kind}
    if isinstance(prov.get("fetched_at"), (int, float)):
        out["fetched_at"] = prov["fetched_at"]
    return out


def select_memories(recall: RecallResult, history: Sequence[Msg]) -> list[dict[str, Any]]:
    """Keep recalled memories not already present verbatim in the prompt's history."""
    in_history = {m["content"].strip() for m in history}
    out: list[dict[str, Any]] = []
    for hit in recall.hits:
        if hit.memory.text.strip() in in_history:
            continue
        item: dict[str, Any] = {"id": hit.memory.id, "text": hit.memory.text, "score": round(hit.score, 6), "similarity": hit.similarity}
        source = memory_source(hit.memory.kind, hit.memory.provenance)
        if source is not None:
            item["kind"] = hit.memory.kind
            item["source"] = source
            close = hit.similarity is not None and hit.similarity >= CITE_MIN_SIMILARITY
            item["cite"] = close or (hit.similarity is None and hit.text_rank is not None)
        out.append(item)
    return out


def memory_prompt_text(memory: Mapping[str, Any]) -> str:
    """A memory as the prompt shows it: sourced ones say where they come from (pure)."""
    source = memory.get("source")
    if not isinstance(source, Mapping):
        return str(memory["text"])
    return f"{memory['text']} (source: {source.get('title') or source['source']})"


def cited_sources(memories: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct sources of the kept memories close enough to the question to name (pure)."""
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for m in memories:
        source = m.get("source")
        if not m.get("cite") or not isinstance(source, Mapping) or source["source"] in seen:
            continue
        seen.add(source["source"])
        out.append(dict(source))
        if len(out) == MAX_SOURCES_NAMED:
            break
    return out


def with_sources(answer: str, sources: Sequence[Mapping[str, Any]]) -> str:
    """Append a line naming the sources the answer drew on, unless it already names them all (pure)."""
    missing = [s for s in sources if str(s["source"]) not in answer]
    if not missing:
        return answer
    names = [f"{s['title']} <{s['source']}>" if s.get("title") else f"<{s['source']}>" for s in missing]
    sep = "\n\n" if answer else ""
    return answer + sep + "Sources: " + "; ".join(names)


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
        hands: Hands | None = None,
        board: str = "generic",
        timezone: str | None = None,
        max_tool_rounds: int = MAX_TOOL_ROUNDS,
        cortex: Cortex | None = None,
        research_budget_s: float = 0.0,
        self_training: SelfTrainingEngine | None = None,
        energy: EnergyMonitor | None = None,
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
        self.hands = hands
        self.board = board
        self.timezone = timezone
        self.max_tool_rounds = max_tool_rounds
        self.cortex = cortex
        self.research_budget_s = research_budget_s
        self.self_training = self_training
        self.energy = energy
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
    ) -> AsyncGenerator[ChatChunk | ChatToolCall | ChatResult, None]: ...

    async def async_chat(
        self, user: str, message: object, session_id: object = None, *, stream: bool = False, **kw: Any
    ) -> ChatResult | AsyncGenerator[ChatChunk | ChatToolCall | ChatResult, None]:
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
        role: str = "user",
        tools: ToolSet = NO_TOOLS,
    ) -> AsyncGenerator[GenEvent, None]:
        """Run the persona `mongars` on chat messages; yield engine-style events.

        The last user message is the turn (stored with the answer). Earlier user/assistant
        messages, when given, replace the stored history in the prompt; system messages are
        added to the system prompt. Messages after the last user message are the turn's tool
        exchange: a client sending its tools' results back (the last message is then a tool
        result) continues the turn. Recall and style use the caller's own memory and profile.
        `tools` are the client's own tools: a call to one is yielded as a ToolCallEvent, never
        run here; the daemon's own hands (Mains Virtuelles) run inside the turn.
        stream=True yields the raw pieces as they come and the final event carries any
        closing text Bouche added; stream=False yields the whole shaped answer as one piece.
        The final event has finish_reason ("tool_calls" when the client's tools were called)
        and token counts.
        """
        if not isinstance(messages, Sequence) or not messages:
            raise ValidationError("'messages' must be a non-empty list", param="messages")
        history: list[Msg] = []
        extra_system: list[str] = []
        last_user = max((n for n, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "user"), default=-1)
        if last_user < 0:
            raise ValidationError("the messages must contain a message with role 'user'", param="messages")
        exchange: list[dict[str, Any]] = []
        for n, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValidationError(f"messages[{n}] must be an object", param=f"messages[{n}]")
            role_n = m.get("role")
            text = content_text(m.get("content"), f"messages[{n}].content")
            if role_n in ("system", "developer"):
                extra_system.append(text)
            elif n > last_user and role_n in ("assistant", "tool"):
                exchange.append(dict(m))
            elif role_n in ("user", "assistant"):
                if text or role_n == "user":  # assistant turns that only called tools carry no text
                    history.append({"role": str(role_n), "content": text})
            elif role_n != "tool":  # older tool results are not replayed into the prompt
                raise ValidationError(f"messages[{n}].role must be system, user, assistant or tool", param=f"messages[{n}].role")
        if exchange and exchange[-1].get("role") != "tool":
            raise ValidationError("the last message must have role 'user' or 'tool'", param="messages")
        turn = history.pop()
        it = self.async_chat_stream(
            user,
            turn["content"],
            session_id if session_id is not None else PERSONA_SESSION_ID,
            model=model,
            spec=spec,
            history_override=history if history else None,
            extra_system=extra_system,
            role=role,
            tools=tools,
            exchange=exchange,
        )
        raw: list[str] = []
        try:
            async for item in it:
                if isinstance(item, ChatChunk):
                    raw.append(item.text)
                    if stream:
                        yield TokenEvent(item.text, 0)
                    continue
                if isinstance(item, ChatToolCall):
                    yield ToolCallEvent(item.call)
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
        role: str = "user",
        tools: ToolSet = NO_TOOLS,
        exchange: Sequence[Mapping[str, Any]] = (),
    ) -> AsyncGenerator[ChatChunk | ChatToolCall | ChatResult, None]:
        """Yield ChatChunk pieces while generating, then exactly one ChatResult once the turn is durable.

        The model may call the daemon's hands (run here, their results fed back, at most
        max_tool_rounds times) or the client's `tools` (yielded as ChatToolCall; the turn ends
        there). `exchange`: the turn's tool messages so far (a client returning its tools'
        results); the user's message was stored by the request that made those calls.
        """
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
        research: dict[str, Any] | None = None
        if self.cortex is not None and not exchange:
            recall, research = await self._async_research(user, text, recall, timings, degraded)
        if recall.degraded:
            degraded.append("recall:" + recall.status)
        memories = select_memories(recall, hist_msgs)
        directives = mimicry.style_directives(profile.mimicry, text) + personality.style_directives(profile.personality)
        system = self.system_prompt + "".join("\n\n" + s.strip() for s in extra_system if s.strip())
        parts = PromptParts(
            system=system,
            user_message=text,
            directives=directives,
            memories=[memory_prompt_text(m) for m in memories],
            history=hist_msgs,
            context=list(context),
        )

        continuation = bool(exchange)
        turn_exchange: list[dict[str, Any]] = [dict(m) for m in exchange]
        new_exchange: list[dict[str, Any]] = []  # what this request adds before the answer (hands' turns)
        if continuation:  # the client's tool results after the last assistant turn are stored with the answer
            last_assistant = max((i for i, m in enumerate(turn_exchange) if m.get("role") == "assistant"), default=-1)
            new_exchange = [m for m in turn_exchange[last_assistant + 1 :] if m.get("role") == "tool"]
        hands_used: list[dict[str, Any]] = []
        client_calls: list[ToolCall] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        hand_ctx = HandContext(user=user, role=role, hippocampus=self.hippocampus, board=self.board, timezone=self.timezone)
        energy: dict[str, Any] = {}
        async with self._async_energy(usage, energy), self._async_engine(model, timings) as (engine, model_id):
            template = engine.chat_template
            native = template is not None and not template.is_fallback and template_supports_tools(template.source)
            n_ctx = context_limit(spec, int(engine.n_ctx_per_slot))
            reserve = reply_reserve(spec, self.max_tokens_default)
            if n_ctx - reserve < 1:
                check_fits(1, reserve, n_ctx)  # the one overflow message: nothing fits beside the reply
            rounds = 0
            text_only = False  # set when the model only repeated a call already answered
            while True:
                toolset = NO_TOOLS if text_only else self._round_tools(tools, role, text, rounds, continuation=continuation)
                round_spec = with_tools(spec, toolset)
                if not toolset.active and any(m.get("tool_calls") for m in turn_exchange):
                    # the answer round: a model that imitates the calls above it stops there
                    round_spec = without_tools(round_spec)
                t0 = time.perf_counter()

                def tokenize(
                    msgs: list[Msg], toolset: ToolSet = toolset, done: Sequence[Mapping[str, Any]] = tuple(turn_exchange)
                ) -> list[int]:
                    chat, template_tools = prepare_messages([*msgs, *done], toolset, native=native)
                    return list(engine.tokenize_chat(chat, tools=template_tools))

                # the fitted prompt's token ids are carried through to generation, never tokenized again
                fitted = await asyncio.wait_for(asyncio.to_thread(fit, parts, tokenize, n_ctx - reserve), self.timeouts.prompt_s)
                tokens = fitted.token_ids
                gparams = build_params(
                    round_spec, n_prompt=len(tokens), n_ctx=int(engine.n_ctx_per_slot), max_tokens_default=self.max_tokens_default
                )
                timings["prompt"] = timings.get("prompt", 0.0) + _ms(t0)
                memories = memories[: fitted.memories_kept]
                pieces: list[str] = []
                calls: list[ToolCall] = []
                final = None
                answered = answered_calls([{"role": "user"}, *turn_exchange])
                async for item in self._async_generate(
                    engine, tokens, gparams, toolset=toolset, answered=answered, cache_key=f"{user}\x1f{sid}", timings=timings
                ):
                    if isinstance(item, ToolCallEvent):
                        calls.append(item.call)
                    elif item.finish_reason is not None:
                        final = item
                    elif item.text:
                        pieces.append(item.text)
                        yield ChatChunk(item.text)
                if final is None:
                    raise InferenceError("the model stopped without finishing the answer")
                if final.finish_reason == FINISH_REPEATED and not text_only:
                    text_only = True
                    continue
                for key in usage:
                    usage[key] += int(getattr(final, key))
                client_calls = [c for c in calls if tools.active and tools.get(c.name) is not None]
                hand_calls = [c for c in calls if c not in client_calls and self.hands is not None and self.hands.get(c.name)]
                if client_calls or not hand_calls:
                    break
                for call in client_calls:
                    yield ChatToolCall(call)
                results = await asyncio.gather(*(self._async_run_hand(c, hand_ctx) for c in hand_calls))
                step: list[dict[str, Any]] = [
                    {"role": "assistant", "content": "".join(pieces), "tool_calls": [c.as_message_call() for c in hand_calls]}
                ]
                for call, result in zip(hand_calls, results, strict=True):
                    step.append({"role": "tool", "content": result.content, "tool_call_id": call.id, "tool_name": call.name})
                    hands_used.append({"name": call.name, "arguments": call.arguments, "ok": result.ok, "result": result.data})
                turn_exchange += step
                new_exchange += step
                rounds += 1
            for call in client_calls:
                yield ChatToolCall(call)
        timings["generate"] = timings.get("generate", 0.0)

        t0 = time.perf_counter()
        reason = FINISH_TOOL_CALLS if client_calls else str(final.finish_reason)
        raw_answer = "".join(pieces)
        answer = raw_answer.strip() if client_calls else bouche.shape(raw_answer, truncated=final.finish_reason == "length")
        sources = cited_sources(memories)
        if not client_calls:
            answer = with_sources(answer, sources)  # ingested documents and research are named in the answer
        timings["shape"] = _ms(t0)

        t0 = time.perf_counter()
        stored = await self._async_persist(
            user,
            sid=sid,
            text=text,
            answer=answer,
            model_id=model_id,
            final=usage,
            degraded=degraded,
            exchange=new_exchange,
            answer_calls=[c.as_message_call() for c in client_calls],
            store_user=not continuation,
        )
        timings["persist"] = _ms(t0)
        if self.self_training is not None and not continuation:
            # which memories this answer was given: feedback on it teaches the recall re-ranker
            kept = {m["id"] for m in memories}
            await self.self_training.async_log_recall(user, stored.assistant_message_id, [h for h in recall.hits if h.memory.id in kept])
        timings["total"] = _ms(t_start)
        self.turns_total += 1
        for stage, ms in timings.items():
            if stage in self.stage_seconds_total:
                self.stage_seconds_total[stage] += ms / 1000.0
        for d in degraded:
            self.degraded_total[d] = self.degraded_total.get(d, 0) + 1
        usage_out = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "cached_tokens": usage["cached_tokens"],
        }
        log.info(
            "chat_turn",
            user=user,
            session=sid,
            model=model_id,
            ms=round(timings["total"], 1),
            degraded=degraded or None,
            hands=[h["name"] for h in hands_used] or None,
            tool_calls=len(client_calls) or None,
            **usage_out,
        )
        yield ChatResult(
            response=answer,
            session_id=sid,
            message_id=stored.assistant_message_id,
            user_message_id=stored.user_message_id,
            model=model_id,
            finish_reason=reason,
            usage=usage_out,
            memories_used=memories,
            timings_ms=timings,
            degraded=degraded,
            memory_id=stored.memory_id,
            tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in client_calls],
            hands_used=hands_used,
            sources=sources,
            research=research,
            energy=energy or None,
        )

    async def _async_research(
        self, user: str, text: str, recall: RecallResult, timings: dict[str, float], degraded: list[str]
    ) -> tuple[RecallResult, dict[str, Any] | None]:
        """Let the Curiosity Engine research a knowledge gap; wait for it within the budget, then recall again.

        Research that does not finish within `research_budget_s` goes on in the background: the
        answer uses what is known now and the next turn on the topic recalls what was found.
        """
        assert self.cortex is not None
        t0 = time.perf_counter()
        try:
            handle = await self.cortex.async_consider(user, text, recall)
            if handle is None:
                return recall, None
            finished = self.research_budget_s > 0 and await self.cortex.async_wait(handle, self.research_budget_s)
            info: dict[str, Any] = {"id": handle.research_id, "query": handle.query, "status": handle.status if finished else "running"}
            if finished:
                again = await self._async_stage("recall", self.hippocampus.async_recall(user, text, self.recall_k), timings, degraded)
                if again is not None:
                    recall = again
            return recall, info
        except MongarsError as err:  # research is optional: the turn goes on without it
            degraded.append("research:error")
            log.warning("research_failed", user=user, error=str(err))
            return recall, None
        finally:
            timings["research"] = _ms(t0)

    # ---------------------------------------------------------------- tools

    def _round_tools(self, client: ToolSet, role: str, text: str, rounds: int, *, continuation: bool) -> ToolSet:
        """The tools one generation round offers: the client's, and the daemon's hands while rounds remain.

        A client's forced choice (required, a named tool) offers only its tools. A user who asks
        for a hand by name (or asks a plain arithmetic question) gets that hand forced on the
        first round; later rounds let the model choose, and the last one answers in text.
        """
        if client.forced:
            return client
        hands: tuple[ToolSpec, ...] = ()
        if self.hands is not None and rounds < self.max_tool_rounds:
            hands = tuple(
                ToolSpec(h.name, h.description, h.parameters)
                for h in self.hands.allowed(role)
                if not client.active or client.get(h.name) is None
            )
        offered = (client.tools if client.active else ()) + hands
        if not offered:
            return NO_TOOLS
        if rounds == 0 and not continuation and self.hands is not None:
            wanted = self.hands.requested(text, role)
            if wanted is not None and any(h.name == wanted for h in hands):
                return ToolSet(offered, ToolChoice("function", wanted), parallel=False)
        return ToolSet(offered, ToolChoice("auto"), parallel=client.parallel)

    async def _async_run_hand(self, call: ToolCall, ctx: HandContext) -> HandResult:
        assert self.hands is not None
        result = await self.hands.async_run(call.name, call.arguments, ctx)
        log.info("hand_called", user=ctx.user, hand=call.name, ok=result.ok, ms=round(result.elapsed_ms, 1))
        return result

    async def _async_generate(
        self,
        engine: LlamaEngine,
        tokens: list[int],
        params: GenerationParams,
        *,
        toolset: ToolSet,
        answered: frozenset[str],
        cache_key: str,
        timings: dict[str, float],
    ) -> AsyncGenerator[GenEvent, None]:
        """One generation round under the first-token and generation deadlines."""
        t_gen = time.perf_counter()
        first = "first_token" not in timings
        events = async_split_calls(
            engine.async_generate(tokens, params, cache_key=cache_key), toolset, prompt_tokens=len(tokens), answered=answered
        )
        try:
            async with asyncio.timeout(self.timeouts.generate_s) as deadline:
                if first:
                    deadline.reschedule(asyncio.get_running_loop().time() + min(self.timeouts.first_token_s, self.timeouts.generate_s))
                async for ev in events:
                    if first:
                        first = False
                        timings["first_token"] = _ms(t_gen)  # queue wait + prefill
                        deadline.reschedule(asyncio.get_running_loop().time() + self.timeouts.generate_s)
                    yield ev
        except TimeoutError:
            self.failures_total += 1
            raise InferenceError(f"generation timed out (limit {self.timeouts.generate_s:g} s)") from None
        finally:
            await events.aclose()
            timings["generate"] = timings.get("generate", 0.0) + _ms(t_gen)

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
    async def _async_energy(self, usage: Mapping[str, int], out: dict[str, Any]) -> AsyncIterator[None]:
        """Account the energy of the generation inside: joules (and per token) into OUT, with their source."""
        if self.energy is None:
            yield
            return
        mark = self.energy.begin()
        done = False
        try:
            yield
            done = True
        finally:
            try:
                out.update(await self.energy.async_end(mark, tokens=int(usage["completion_tokens"]) if done else 0))
            except MongarsError as err:  # energy is a report: it never fails a turn
                log.warning("energy_account_failed", error=str(err))

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

    async def _async_persist(
        self,
        user: str,
        *,
        sid: str,
        text: str,
        answer: str,
        model_id: str,
        final: Mapping[str, int],
        degraded: list[str],
        exchange: Sequence[Mapping[str, Any]] = (),
        answer_calls: Sequence[Mapping[str, Any]] = (),
        store_user: bool = True,
    ) -> Any:
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
                        prompt_tokens=int(final["prompt_tokens"]),
                        completion_tokens=int(final["completion_tokens"]),
                        exchange=exchange,
                        answer_calls=answer_calls,
                        store_user=store_user,
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
        if self.hands is not None:
            for what, n in self.hands.metrics().items():
                yield ("mongarsd_hand_events_total", "counter", "Mains Virtuelles tool calls by outcome.", float(n), {"event": what})


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


async def _last_result(it: AsyncIterator[ChatChunk | ChatToolCall | ChatResult]) -> ChatResult:
    result: ChatResult | None = None
    async for item in it:
        if isinstance(item, ChatResult):
            result = item
    if result is None:
        raise InferenceError("the turn ended without a result")
    return result


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0
