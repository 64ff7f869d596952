"""Bouche (the mouth): final shaping of an answer before it is shown and stored."""

from __future__ import annotations

import re

FENCE_RE = re.compile(r"^[ \t]{0,3}(```|~~~)", re.M)
_SENTENCE_END_RE = re.compile(r"[.!?…。！？](?:[\"'”’»)\]]*)(?=\s|$)")
_ROLE_PREFIX_RE = re.compile(r"^\s*(?:assistant|assistante?|bot)\s*:\s*", re.I)
_BLANK_RUN_RE = re.compile(r"\n{3,}")
MIN_KEEP_RATIO = 0.3  # never cut away more than 70 % of a truncated answer to end on a sentence
ELLIPSIS = "…"


def open_fence(text: str) -> str | None:
    """Return the fence marker of a code block left open at the end of `text`, or None."""
    marker: str | None = None
    for m in FENCE_RE.finditer(text):
        tick = m.group(1)
        if marker is None:
            marker = tick
        elif tick == marker:
            marker = None
    return marker


def cut_at_sentence_end(text: str) -> str:
    """Cut a truncated answer after its last complete sentence (outside code), or mark it with an ellipsis."""
    ends = [m.end() for m in _SENTENCE_END_RE.finditer(text)]
    # Paragraph breaks also end a thought (lists, headings).
    ends += [m.start() for m in re.finditer(r"\n\s*\n", text)]
    for end in sorted(ends, reverse=True):
        if end < len(text) * MIN_KEEP_RATIO:
            break
        head = text[:end]
        if open_fence(head) is None:
            return head.rstrip()
    return text.rstrip() + ELLIPSIS


def shape(text: str, *, truncated: bool = False) -> str:
    """Trim, drop a leaked role prefix, stop at a sentence end when cut by max_tokens, balance code fences."""
    out = _ROLE_PREFIX_RE.sub("", text.strip(), count=1)
    out = _BLANK_RUN_RE.sub("\n\n", out).strip()
    if truncated and out:
        fence = open_fence(out)
        if fence is None:
            out = cut_at_sentence_end(out)
        else:
            # Inside code: drop the half-written last line, then close the block.
            last_open = list(FENCE_RE.finditer(out))[-1].end()
            cut = out.rfind("\n")
            if cut > out.find("\n", last_open) >= 0:
                out = out[:cut]
    fence = open_fence(out)
    if fence is not None:
        out = out.rstrip() + "\n" + fence
    return out
