"""Text that cannot be encoded as UTF-8 never enters or leaves the daemon (pure, no project imports)."""

from __future__ import annotations

import math
import re
from typing import Any

# No field needs more digits; longer integer literals read as infinity and are refused by name
# (Python refuses to parse over 4,300 digits, and ints past 1e308 overflow float conversions).
MAX_JSON_INT_DIGITS = 40

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Replace lone UTF-16 surrogates (unencodable in UTF-8) with U+FFFD.

    JSON can spell them (`"\\ud800"`) and Python keeps them in str; every string that enters
    the daemon goes through here once, so nothing unencodable is stored or answered.
    """
    if text.isascii() or _SURROGATES.search(text) is None:
        return text
    return _SURROGATES.sub("\ufffd", text)


def has_surrogates(text: str) -> bool:
    return not text.isascii() and _SURROGATES.search(text) is not None


def clean_value(value: Any) -> tuple[Any, bool]:
    """Return (a copy of a decoded JSON value with every string cleaned, whether anything changed)."""
    if isinstance(value, str):
        cleaned = clean_text(value)
        return cleaned, cleaned is not value
    if isinstance(value, dict):
        changed = False
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new_key, key_changed = clean_value(key) if isinstance(key, str) else (key, False)
            new_item, item_changed = clean_value(item)
            out[new_key] = new_item
            changed = changed or key_changed or item_changed
        return out, changed
    if isinstance(value, list):
        pairs = [clean_value(item) for item in value]
        return [p[0] for p in pairs], any(p[1] for p in pairs)
    return value, False


def bounded_int(literal: str) -> int | float:
    """`json.loads(parse_int=...)`: integers over MAX_JSON_INT_DIGITS digits read as +-infinity."""
    digits = len(literal) - (literal[0] == "-")
    if digits > MAX_JSON_INT_DIGITS:
        return -math.inf if literal[0] == "-" else math.inf
    return int(literal)
