"""Chat messages and the request fields every generation surface shares (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mongarsd.api.io import get_number, kind_of
from mongarsd.const import PERSONA_MODEL_ID
from mongarsd.errors import ValidationError
from mongarsd.inference.sampling import MAX_SEED, MAX_STOP_CHARS

CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system text
MAX_MESSAGES = 1024


def normalize_messages(raw: object, *, param: str = "messages", allow_images: bool = False) -> list[dict[str, str]]:
    """Validate chat messages and return them as [{role, content}] with text content (pure).

    Roles: system, user, assistant, tool ("developer" is read as system). Content: a string,
    null (assistant turns that only called tools), or a list of text parts.
    """
    if not isinstance(raw, list):
        raise ValidationError("'" + param + "' must be a list of messages, got " + kind_of(raw), param=param)
    if not raw:
        raise ValidationError("'" + param + "' must contain at least one message", param=param)
    if len(raw) > MAX_MESSAGES:
        raise ValidationError("'" + param + "' has " + str(len(raw)) + " messages; at most " + str(MAX_MESSAGES), param=param)
    out: list[dict[str, str]] = []
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
        out.append({"role": role, "content": text})
    return out


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


def check_prompt_chars(messages: Sequence[Mapping[str, str]], limit: int, *, param: str = "messages") -> None:
    """Refuse prompts over inference.max_prompt_chars before tokenizing them (pure)."""
    total = sum(len(m.get("content", "")) for m in messages)
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
