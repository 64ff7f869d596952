"""Tool calling for any chat model: tools in the prompt, calls constrained by grammar, calls parsed out (pure).

The wire format of a call is the one Hermes-style templates teach (Qwen 2.5/3, Hermes,
SmolLM3): a JSON object with the tool's name and arguments between tags,

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "17 * 23"}}
    </tool_call>

Models whose own chat template renders tools in that format get their template (it receives
`tools` and HuggingFace-style `tool_calls` messages). Every other template, the default
SmolLM2 one included, gets the generic format: one system block listing the tools as JSON
and the format above, assistant calls written back as those tags, and tool results as one user
turn of lines "Result of the <name> tool: <content>" ending "Use these results to answer my
question." (small models copy tags back; plain words they answer from). Either way the call itself is generated under a grammar built
from the tools' JSON Schemas, so a call always parses and its arguments match the schema:
forced (`required` or a named tool) from the first token, or lazily (`auto`) from the moment
the model writes `<tool_call>`, so a plain text answer stays free and costs no grammar work.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import structlog

from mongarsd.inference.events import TokenEvent
from mongarsd.inference.grammar import clamp_to_schema
from mongarsd.inference.sampling import MAX_STOP_SEQUENCES, SamplingSpec, ToolConstraint, partial_stop_len

log = structlog.get_logger("mongarsd.inference.tools")

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # calls one reply may make when parallel calls are allowed
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_DESCRIPTION_CHARS = 4096
# the trigger of a lazy grammar is a std::regex searched in the text generated so far
TRIGGER_PATTERN = CALL_OPEN
CALL_RULE = "tool-call-json"

ChoiceMode = Literal["auto", "none", "required", "function"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call: its name, description and JSON Schema for the arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: ChoiceMode = "auto"
    name: str | None = None  # mode "function": the tool that must be called


@dataclass(frozen=True, slots=True)
class ToolSet:
    """The tools a request offers and how the model may use them."""

    tools: tuple[ToolSpec, ...] = ()
    choice: ToolChoice = ToolChoice()
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice.mode in ("required", "function")

    def offered(self) -> tuple[ToolSpec, ...]:
        """The tools the grammar allows: all of them, or the one tool_choice names."""
        if self.choice.mode == "function":
            return tuple(t for t in self.tools if t.name == self.choice.name)
        return self.tools

    def get(self, name: str) -> ToolSpec | None:
        for t in self.tools:
            if t.name == name:
                return t
        return None


NO_TOOLS = ToolSet()


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: an id (OpenAI style), the tool's name and its arguments object."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def as_message_call(self) -> dict[str, Any]:
        """The neutral form kept in chat messages and the conversation history."""
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def call_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """The JSON Schema of one call to any of `tools`: name first, then the tool's own arguments."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": _arguments_schema(t.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return alternatives[0] if len(alternatives) == 1 else {"oneOf": alternatives}


def _arguments_schema(parameters: Mapping[str, Any]) -> dict[str, Any]:
    schema = dict(parameters)
    if not schema or (schema.get("type") is None and "properties" not in schema):
        schema = {"type": "object", **schema}
    return schema


def constraint_for(toolset: ToolSet) -> ToolConstraint | None:
    """The grammar constraint a tool set needs, or None when the model may not call anything."""
    if not toolset.active:
        return None
    offered = toolset.offered()
    if not offered:
        return None
    return ToolConstraint(
        schema=call_schema(offered),
        lazy=not toolset.forced,
        max_calls=MAX_PARALLEL_CALLS if toolset.parallel else 1,
    )


def with_tools(spec: SamplingSpec, tools: ToolSet) -> SamplingSpec:
    """The spec with the tools' grammar constraint.

    With a JSON response format too, the reply is either calls or that JSON, both under one
    grammar from the first token (Home Assistant's AI tasks send a format and tools together).
    """
    constraint = constraint_for(tools)
    if constraint is None:
        return spec
    if spec.json_mode or spec.json_schema is not None:
        constraint = replace(
            constraint, lazy=False, text_schema=spec.json_schema, text_json=spec.json_schema is None, text_param=spec.schema_param
        )
        return replace(spec, tools=constraint, json_mode=False, json_schema=None)
    return replace(spec, tools=constraint)


# ------------------------------------------------------------------------------ grammar


def wrap_call_grammar(call_gbnf: str, max_calls: int) -> str:
    """Turn the GBNF of one call's JSON into a grammar of up to `max_calls` tagged calls.

    The converter's `root` rule is renamed (definition and references, never inside literals or
    character classes) and a new root spells the tags around it.
    """
    renamed = _rename_rule(call_gbnf, "root", CALL_RULE)
    lines = [
        'tc-call ::= "' + CALL_OPEN + '" "\\n"? ' + CALL_RULE + ' "\\n"? "' + CALL_CLOSE + '"',
        "root ::= tc-call" + (' ("\\n"? tc-call){0,' + str(max_calls - 1) + "}" if max_calls > 1 else ""),
    ]
    return renamed.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def either_grammar(calls_gbnf: str, text_gbnf: str) -> str:
    """A grammar whose root is either the calls grammar or the text (JSON format) grammar.

    Every rule of the text grammar gets a prefix so the two rule sets cannot collide.
    """
    defined = set(_RULE_DEF_RE.findall(text_gbnf))
    text = _rename_rules(text_gbnf, {name: "fmt-" + name for name in defined})
    calls = _rename_rule(calls_gbnf, "root", "tc-root")
    return calls.rstrip("\n") + "\n" + text.rstrip("\n") + "\nroot ::= tc-root | fmt-root\n"


_RULE_DEF_RE = re.compile(r"^([A-Za-z0-9_-]+)\s*::=", re.MULTILINE)


def _rename_rule(gbnf: str, old: str, new: str) -> str:
    return _rename_rules(gbnf, {old: new})


def _rename_rules(gbnf: str, names: Mapping[str, str]) -> str:
    out: list[str] = []
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < n and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif c == "#":
            j = gbnf.find("\n", i)
            j = n if j == -1 else j
            out.append(gbnf[i:j])
            i = j
        elif c.isalnum() or c in "-_":
            j = i
            while j < n and (gbnf[j].isalnum() or gbnf[j] in "-_"):
                j += 1
            word = gbnf[i:j]
            out.append(names.get(word, word))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


# ------------------------------------------------------------------------------ prompts


def template_supports_tools(source: str | None) -> bool:
    """Say whether a chat template renders `tools` itself, in the tagged call format parsed here."""
    return bool(source) and "tools" in str(source) and CALL_OPEN in str(source)


def tools_system_text(tools: Sequence[ToolSpec], choice: ToolChoice) -> str:
    """The generic tool instructions (for templates that know nothing of tools)."""
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False) for t in tools
    )
    if choice.mode == "function":
        when = "You must call the tool " + str(choice.name) + "."
    elif choice.mode == "required":
        when = "You must call one of the tools."
    else:
        when = "Call a tool when it helps answer; otherwise answer normally."
    return (
        "You can call these tools:\n<tools>\n"
        + listing
        + "\n</tools>\n"
        + when
        + " To call a tool, write exactly:\n"
        + CALL_OPEN
        + '\n{"name": "<tool name>", "arguments": {<the arguments as JSON>}}\n'
        + CALL_CLOSE
        + '\nTool results come back as a message starting with "Result of the".'
    )


def call_text(call: Mapping[str, Any]) -> str:
    body = {"name": call.get("name", ""), "arguments": call.get("arguments", {})}
    return CALL_OPEN + "\n" + json.dumps(body, ensure_ascii=False) + "\n" + CALL_CLOSE


def response_text(name: str | None, content: str) -> str:
    """One tool result in the generic format: plain words small models read back reliably."""
    return "Result of the " + (name or "tool") + " tool: " + content.strip()


RESULTS_TAIL = "Use these results to answer my question."


def prepare_messages(
    messages: Sequence[Mapping[str, Any]], toolset: ToolSet, *, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Return (messages for the chat template, `tools` for the template or None).

    native: the template renders tools and tool turns itself (HuggingFace message shapes).
    Otherwise tool calls become tagged assistant text, consecutive tool results one user turn,
    and the tool listing joins the first system message (or becomes one).
    """
    offered = toolset.offered() if toolset.active else ()
    if native:
        out_native: list[dict[str, Any]] = []
        for m in messages:
            msg: dict[str, Any] = {"role": m["role"], "content": m.get("content", "")}
            if m.get("tool_calls"):
                msg["tool_calls"] = [
                    {"id": c.get("id"), "type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments", {})}}
                    for c in m["tool_calls"]
                ]
            if m["role"] == "tool":
                if m.get("tool_name"):
                    msg["name"] = m["tool_name"]
                if m.get("tool_call_id"):
                    msg["tool_call_id"] = m["tool_call_id"]
            out_native.append(msg)
        return out_native, [t.as_openai() for t in offered] or None
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        content = str(m.get("content") or "")
        if role == "tool":
            block = response_text(m.get("tool_name"), content)
            if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                out[-1]["content"] = out[-1]["content"].removesuffix("\n" + RESULTS_TAIL) + "\n" + block + "\n" + RESULTS_TAIL
            else:
                out.append({"role": "user", "content": block + "\n" + RESULTS_TAIL, "_tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c) for c in m["tool_calls"])
            content = (content.rstrip() + "\n" + calls) if content.strip() else calls
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if offered:
        text = tools_system_text(offered, toolset.choice)
        if out and out[0]["role"] == "system":
            out[0]["content"] = (out[0]["content"].rstrip() + "\n\n" + text) if out[0]["content"].strip() else text
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


# ------------------------------------------------------------------------------ output


@dataclass(frozen=True, slots=True)
class Piece:
    """One output of the stream parser: text for the client, or one whole call."""

    text: str = ""
    call: ToolCall | None = None


class ToolStreamParser:
    """Split a streamed reply into content text and whole tool calls.

    Text that could be the start of CALL_OPEN is held back until it is clearly not; a call is
    released once its closing tag arrives and its JSON parses into a known tool's call.
    """

    __slots__ = ("_buf", "_in_call", "_toolset", "calls", "dropped")

    def __init__(self, toolset: ToolSet) -> None:
        self._toolset = toolset
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self.dropped = 0  # calls that were cut off or did not parse (length limit, stop sequence)

    def feed(self, text: str) -> list[Piece]:
        if not self._toolset.active and not self._in_call:
            return [Piece(text)] if text else []
        self._buf += text
        out: list[Piece] = []
        while True:
            if not self._in_call:
                i = self._buf.find(CALL_OPEN)
                if i == -1:
                    keep = partial_stop_len(self._buf, (CALL_OPEN,), len(CALL_OPEN))
                    emit = self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep :]
                    if emit and not (self.calls and not emit.strip()):
                        out.append(Piece(emit))
                    return out
                if i and not (self.calls and not self._buf[:i].strip()):
                    out.append(Piece(self._buf[:i]))
                self._buf = self._buf[i + len(CALL_OPEN) :]
                self._in_call = True
            j = self._buf.find(CALL_CLOSE)
            if j == -1:
                return out
            body, self._buf = self._buf[:j], self._buf[j + len(CALL_CLOSE) :]
            self._in_call = False
            call = parse_call(body, self._toolset)
            if call is None:
                self.dropped += 1
                continue
            self.calls.append(call)
            out.append(Piece(call=call))

    def finish(self) -> list[Piece]:
        """Release what is held back at the end; an unfinished call is dropped (counted)."""
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            self.dropped += 1
            return []
        if rest and not (self.calls and not rest.strip()):
            return [Piece(rest)]
        return []


def parse_call(body: str, toolset: ToolSet) -> ToolCall | None:
    """Parse one call's JSON; None when it is not a call to one of the tools."""
    try:
        obj = json.loads(body, strict=False)  # a raw control character in a string is not worth losing a call
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    args = obj.get("arguments", {})
    tool = toolset.get(name) if isinstance(name, str) else None
    if tool is None or not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), tool.name, clamp_to_schema(args, tool.parameters))


def split_reply(text: str, toolset: ToolSet) -> tuple[str, list[ToolCall], int]:
    """Return (content, calls, dropped) of a whole reply (non-streamed)."""
    parser = ToolStreamParser(toolset)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p.text for p in pieces if p.call is None)
    return content, parser.calls, parser.dropped


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    """The model called a tool: a client's tool is sent to the client, never executed by the daemon."""

    call: ToolCall


GenEvent = TokenEvent | ToolCallEvent
FINISH_TOOL_CALLS = "tool_calls"


FINISH_REPEATED = "repeated_call"  # internal: the reply repeated a call already answered in this turn


def call_key(name: str, arguments: Mapping[str, Any]) -> str:
    return name + "\x1f" + json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def answered_calls(messages: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """Keys of the calls made since the last user message (their results are in the messages)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return frozenset(
        call_key(str(c.get("name", "")), c.get("arguments") or {})
        for m in messages[last_user + 1 :]
        for c in m.get("tool_calls") or ()
        if isinstance(c, Mapping)
    )


async def async_split_calls(
    events: AsyncIterator[TokenEvent], tools: ToolSet, *, prompt_tokens: int = 0, answered: frozenset[str] = frozenset()
) -> AsyncGenerator[GenEvent, None]:
    """Turn a model's token events into text events and whole ToolCallEvents.

    The final event keeps the counters; its finish_reason is "tool_calls" when a call was made.
    A call cut off by the length limit is dropped (and logged): a partial call is never sent.
    A call that repeats an earlier one of the reply word for word ends the reply (small models
    loop on calls); one that repeats a call already answered in this turn (`answered`) ends it
    with FINISH_REPEATED before any call is sent, so the caller can ask again for a text answer.
    The generation is cancelled there and the final event is made from what was seen.
    """
    parser = ToolStreamParser(tools)
    seen: set[str] = set()
    n_events = 0

    try:
        async for event in events:
            n_events += 1
            last = event.finish_reason is not None
            pieces = parser.feed(event.text) + (parser.finish() if last else [])
            for piece in pieces:
                if piece.call is None:
                    yield TokenEvent(piece.text, event.token if not last else -1)
                    continue
                key = call_key(piece.call.name, piece.call.arguments)
                if key in answered and not seen:
                    log.info("tool_call_already_answered", name=piece.call.name)
                    yield TokenEvent("", -1, finish_reason=FINISH_REPEATED, prompt_tokens=prompt_tokens, completion_tokens=n_events)
                    return
                if key in seen or key in answered:
                    log.info("tool_call_repeated", name=piece.call.name)
                    yield TokenEvent("", -1, finish_reason=FINISH_TOOL_CALLS, prompt_tokens=prompt_tokens, completion_tokens=n_events)
                    return
                seen.add(key)
                yield ToolCallEvent(piece.call)
            if last:
                if parser.dropped:
                    log.warning("tool_call_dropped", dropped=parser.dropped, finish_reason=event.finish_reason)
                reason = FINISH_TOOL_CALLS if seen else event.finish_reason
                yield replace(event, text="", finish_reason=reason)
                return
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()  # frees the engine's slot at once


def without_tools(spec: SamplingSpec) -> SamplingSpec:
    """The spec for a text answer after tool results: no tools, and a stop where a copied call would start."""
    stop = spec.stop if CALL_OPEN in spec.stop or len(spec.stop) >= MAX_STOP_SEQUENCES else (*spec.stop, CALL_OPEN)
    t = spec.tools
    if t is not None and (t.text_schema is not None or t.text_json):  # the JSON format the reply still owes
        return replace(spec, tools=None, stop=stop, json_schema=t.text_schema, json_mode=t.text_schema is None, schema_param=t.text_param)
    return replace(spec, tools=None, stop=stop)
