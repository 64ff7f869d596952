"""Chat messages and the request fields every generation surface shares (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mongarsd.api.io import get_bool, get_number, get_str, kind_of, require_str
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import ValidationError
from mongarsd.inference.grammar import check_schema
from mongarsd.inference.sampling import MAX_SEED, MAX_STOP_CHARS
from mongarsd.inference.tools import MAX_DESCRIPTION_CHARS, MAX_TOOLS, TOOL_NAME_RE, ToolChoice, ToolSpec

CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system", "function": "tool"}  # newer OpenAI clients send "developer"; "function" is legacy
MAX_MESSAGES = 1024
MAX_HISTORY_CALLS = 64
MAX_CALL_ID_CHARS = 128


def normalize_messages(raw: object, *, param: str = "messages", allow_images: bool = False) -> list[dict[str, Any]]:
    """Validate chat messages and return them as [{role, content, ...}] with text content (pure).

    Roles: system, user, assistant, tool ("developer" is read as system, the legacy "function"
    as tool). Content: a string, null (assistant turns that only called tools), or a list of
    text parts. Assistant turns may carry `tool_calls` (OpenAI: arguments as a JSON string;
    Ollama: as an object), kept as [{id, name, arguments: object}]; tool turns keep
    `tool_call_id` and `tool_name` (Ollama's `tool_name`, OpenAI's legacy `name`, or the name
    of the earlier call with that id).
    """
    if not isinstance(raw, list):
        raise ValidationError("'" + param + "' must be a list of messages, got " + kind_of(raw), param=param)
    if not raw:
        raise ValidationError("'" + param + "' must contain at least one message", param=param)
    if len(raw) > MAX_MESSAGES:
        raise ValidationError("'" + param + "' has " + str(len(raw)) + " messages; at most " + str(MAX_MESSAGES), param=param)
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(raw):
        where = param + "[" + str(i) + "]"
        if not isinstance(msg, dict):
            raise ValidationError("'" + where + "' must be an object with role and content, got " + kind_of(msg), param=where)
        role = msg.get("role")
        if not isinstance(role, str):
            raise ValidationError("'" + where + ".role' is required (one of " + ", ".join(CHAT_ROLES) + ")", param=where + ".role")
        role = ROLE_ALIASES.get(role, role)
        if role not in CHAT_ROLES:
            raise ValidationError(
                "'" + where + ".role' must be one of " + ", ".join(CHAT_ROLES) + ", got " + repr(role[:40]), param=where + ".role"
            )
        content = msg.get("content")
        if content is None:
            if role not in ("assistant", "tool"):
                raise ValidationError("'" + where + ".content' is required", param=where + ".content")
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = _join_parts(content, where + ".content")
        else:
            raise ValidationError(
                "'" + where + ".content' must be a string or a list of text parts, got " + kind_of(content), param=where + ".content"
            )
        if "\x00" in text:
            raise ValidationError("'" + where + ".content' must not contain NUL characters", param=where + ".content")
        images = msg.get("images")
        if images and not allow_images:
            raise ValidationError("'" + where + ".images': images are not supported by this server's models", param=where + ".images")
        item: dict[str, Any] = {"role": role, "content": text}
        if role == "assistant" and msg.get("tool_calls") is not None:
            calls = parse_history_calls(msg["tool_calls"], where + ".tool_calls")
            if calls:
                item["tool_calls"] = calls
                call_names.update((c["id"], c["name"]) for c in calls)
        elif role == "tool":
            call_id = get_str(msg, "tool_call_id", max_len=MAX_CALL_ID_CHARS, prefix=where + ".")
            name = get_str(msg, "tool_name", max_len=MAX_CALL_ID_CHARS, prefix=where + ".") or get_str(
                msg, "name", max_len=MAX_CALL_ID_CHARS, prefix=where + "."
            )
            if call_id:
                item["tool_call_id"] = call_id
                name = name or call_names.get(call_id)
            if name:
                item["tool_name"] = name
        out.append(item)
    return out


def parse_history_calls(raw: object, where: str) -> list[dict[str, Any]]:
    """Read an assistant turn's tool_calls from either surface into [{id, name, arguments}] (pure)."""
    if not isinstance(raw, list):
        raise ValidationError("'" + where + "' must be a list of calls, got " + kind_of(raw), param=where)
    if len(raw) > MAX_HISTORY_CALLS:
        raise ValidationError("'" + where + "' has " + str(len(raw)) + " calls; at most " + str(MAX_HISTORY_CALLS), param=where)
    out: list[dict[str, Any]] = []
    for j, call in enumerate(raw):
        at = where + "[" + str(j) + "]"
        if not isinstance(call, dict):
            raise ValidationError("'" + at + "' must be an object with a function, got " + kind_of(call), param=at)
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ValidationError("'" + at + ".function' must be an object with name and arguments", param=at + ".function")
        name = require_str(fn, "name", max_len=MAX_CALL_ID_CHARS, prefix=at + ".function.")
        args = fn.get("arguments")
        if args is None or args == "":
            parsed: object = {}
        elif isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                raise ValidationError(
                    "'" + at + ".function.arguments' must be a JSON object (as a string)", param=at + ".function.arguments"
                ) from None
        else:
            parsed = args
        if not isinstance(parsed, dict):
            raise ValidationError(
                "'" + at + ".function.arguments' must be a JSON object, got " + kind_of(parsed), param=at + ".function.arguments"
            )
        call_id = get_str(call, "id", max_len=MAX_CALL_ID_CHARS, prefix=at + ".") or "call_" + str(j)
        out.append({"id": call_id, "name": name, "arguments": parsed})
    return out


def parse_tools(raw: object, *, param: str = "tools") -> tuple[ToolSpec, ...]:
    """Read the tools a client offers (OpenAI and Ollama share the shape) (pure).

    Each is {"type": "function", "function": {name, description, parameters, strict}}; the
    parameters are a bounded JSON Schema (inference.grammar.check_schema).
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValidationError("'" + param + "' must be a list of tools, got " + kind_of(raw), param=param)
    if len(raw) > MAX_TOOLS:
        raise ValidationError("'" + param + "' has " + str(len(raw)) + " tools; at most " + str(MAX_TOOLS), param=param)
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(raw):
        at = param + "[" + str(i) + "]"
        if not isinstance(tool, dict):
            raise ValidationError("'" + at + "' must be a tool object, got " + kind_of(tool), param=at)
        kind = tool.get("type", "function")
        if kind != "function":
            raise ValidationError("'" + at + '.type\' must be "function", got ' + repr(str(kind)[:40]), param=at + ".type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValidationError("'" + at + ".function' must be an object with a name", param=at + ".function")
        name = require_str(fn, "name", max_len=64, prefix=at + ".function.")
        if not TOOL_NAME_RE.match(name):
            raise ValidationError(
                "'" + at + ".function.name' must be 1-64 letters, digits, '_', '-' or '.', got " + repr(name[:40]),
                param=at + ".function.name",
            )
        if name in seen:
            raise ValidationError("'" + at + ".function.name' repeats the tool " + repr(name), param=at + ".function.name")
        seen.add(name)
        description = get_str(fn, "description", default="", max_len=MAX_DESCRIPTION_CHARS, prefix=at + ".function.")
        params_raw = fn.get("parameters")
        parameters = (
            {"type": "object", "properties": {}} if params_raw is None else check_schema(params_raw, param=at + ".function.parameters")
        )
        out.append(ToolSpec(name, description or "", parameters, strict=get_bool(fn, "strict", default=False, prefix=at + ".function.")))
    return tuple(out)


def parse_tool_choice(raw: object, tools: Sequence[ToolSpec], *, param: str = "tool_choice") -> ToolChoice:
    """Read OpenAI's tool_choice: "auto", "none", "required" or {"type": "function", "function": {"name"}} (pure)."""
    if raw is None or raw == "auto":
        return ToolChoice("auto")
    if raw in ("none", "required"):
        if raw == "required" and not tools:
            raise ValidationError("'" + param + '\' is "required" but no tools were given', param=param)
        return ToolChoice("none" if raw == "none" else "required")
    if isinstance(raw, dict):
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else raw.get("name")
        if not isinstance(name, str) or not name:
            raise ValidationError("'" + param + ".function.name' must name one of the tools", param=param + ".function.name")
        if not any(t.name == name for t in tools):
            raise ValidationError(
                "'" + param + "' names " + repr(name[:64]) + ", which is not among the tools", param=param + ".function.name"
            )
        return ToolChoice("function", name)
    raise ValidationError("'" + param + "' must be auto, none, required or a named function, got " + repr(str(raw)[:40]), param=param)


def _join_parts(parts: list[Any], where: str) -> str:
    texts: list[str] = []
    for j, part in enumerate(parts):
        at = where + "[" + str(j) + "]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ValidationError("'" + at + "' must be a content part object, got " + kind_of(part), param=at)
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise ValidationError("'" + at + ".text' must be a string", param=at + ".text")
        else:
            raise ValidationError(
                "'" + at + ".type' " + repr(str(kind)[:40]) + " is not supported: only text content parts are", param=at + ".type"
            )
    return "\n".join(texts)


def check_prompt_chars(messages: Sequence[Mapping[str, Any]], limit: int, *, param: str = "messages") -> None:
    """Refuse prompts over inference.max_prompt_chars before tokenizing them (pure)."""
    total = sum(len(m.get("content", "")) + sum(len(str(c.get("arguments", ""))) for c in m.get("tool_calls", ())) for m in messages)
    if total > limit:
        raise ValidationError(
            "prompt is too long: " + str(total) + " characters; at most " + str(limit) + " (inference.max_prompt_chars)",
            param=param,
            status=413,
        )


def parse_seed(data: Mapping[str, Any], key: str = "seed", *, prefix: str = "") -> int | None:
    """Read a seed: a non-negative 32-bit integer; negative means random (pure)."""
    value = get_number(data, key, integer=True, prefix=prefix)
    if value is None or value < 0:
        return None
    if value > MAX_SEED:
        raise ValidationError("'" + prefix + key + "' must be at most " + str(MAX_SEED) + " (or negative for random)", param=prefix + key)
    return int(value)


def parse_stop(value: object, *, max_items: int, param: str = "stop") -> tuple[str, ...]:
    """Read stop sequences: a string or a list of non-empty strings (pure)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValidationError("'" + param + "' must be a string or a list of strings, got " + kind_of(value), param=param)
    if len(items) > max_items:
        raise ValidationError("'" + param + "' has " + str(len(items)) + " sequences; at most " + str(max_items), param=param)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValidationError("'" + param + "' entries must be non-empty strings", param=param)
        if len(item) > MAX_STOP_CHARS:
            raise ValidationError("'" + param + "' entries must be at most " + str(MAX_STOP_CHARS) + " characters", param=param)
        out.append(item)
    return tuple(out)


def is_persona(model: str) -> bool:
    return model.strip().lower() in (PERSONA_MODEL_ID, PERSONA_MODEL_ID + ":latest")
