"""Prompt assembly within the model's context, measured with the model's own tokenizer (pure).

Order of sacrifice when the context is short: the oldest history turns first, then the
weakest recalled memories; the system prompt and the user's message are never cut. (The
original dropped the *newest* turn first and estimated tokens from byte counts.)

Layout: the system prompt, then the history, then one user message that carries what changes
every turn (style directives, recalled memories, gathered context) ahead of the user's words.
The engine's prefix cache reuses the KV of the longest unchanged token prefix, so everything
that differs from one turn to the next goes last: with the memories in the system prompt, each
turn's new recall changed the prompt's first hundred tokens and the whole history was decoded
again (measured with four users chatting: 90 of 880 prompt tokens reused per turn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mongarsd.errors import ValidationError

Msg = dict[str, str]
# The model's tokenizer: token ids (carried through to generation) or, in pure tests, a count.
TokenCounter = Callable[[list[Msg]], list[int] | int]

MEMORY_HEADER = "What you remember about this user from earlier conversations (use it only if relevant; it may be outdated):"
CONTEXT_HEADER = "Background information gathered for this question (may be incomplete):"
STYLE_HEADER = "How to answer this user:"
MESSAGE_HEADER = "The user's message:"
MAX_MEMORY_LINE_CHARS = 600


@dataclass(frozen=True, slots=True)
class PromptParts:
    system: str
    user_message: str
    directives: Sequence[str] = ()
    memories: Sequence[str] = ()  # strongest first
    history: Sequence[Msg] = ()  # oldest first, {"role", "content"}
    context: Sequence[str] = ()  # research/tool context: shown to the model, never stored as the user's words


@dataclass(frozen=True, slots=True)
class FittedPrompt:
    messages: list[Msg]
    tokens: int
    budget: int
    memories_kept: int
    history_kept: int
    dropped_history: int = 0
    dropped_memories: int = 0
    notes: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the fitted prompt, tokenized once


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_MEMORY_LINE_CHARS else flat[: MAX_MEMORY_LINE_CHARS - 1] + "…"


def render(parts: PromptParts, n_memories: int, history_from: int) -> list[Msg]:
    """Build chat messages with the first n_memories memories and history[history_from:]."""
    blocks: list[str] = []
    if parts.directives:
        blocks.append(STYLE_HEADER + "\n" + "\n".join("- " + d for d in parts.directives))
    mems = list(parts.memories[:n_memories])
    if mems:
        blocks.append(MEMORY_HEADER + "\n" + "\n".join("- " + _one_line(m) for m in mems))
    if parts.context:
        blocks.append(CONTEXT_HEADER + "\n" + "\n".join(parts.context))
    messages: list[Msg] = [{"role": "system", "content": parts.system.strip()}]
    for turn in parts.history[history_from:]:
        messages.append({"role": turn["role"], "content": turn["content"]})
    # one user message, not a second system message: many chat templates refuse a system
    # message after the first turn, or two user messages in a row
    user = "\n\n".join([*blocks, MESSAGE_HEADER + "\n" + parts.user_message]) if blocks else parts.user_message
    messages.append({"role": "user", "content": user})
    return messages


def _turn_starts(history: Sequence[Msg]) -> list[int]:
    """Indexes where a history turn starts (a user message, or any message after a non-user one)."""
    starts = [i for i, m in enumerate(history) if m["role"] == "user" or i == 0]
    return [*starts, len(history)]


def fit(parts: PromptParts, count_tokens: TokenCounter, budget: int) -> FittedPrompt:
    """Fit the prompt into `budget` tokens or raise ValidationError(status=413).

    Drops whole turns, oldest first, then memories, weakest (last) first. The number of
    turns to drop is found by binary search (token counts only grow with kept turns), so a
    long caller-supplied history costs O(log n) tokenizations.
    """
    starts = _turn_starts(parts.history)
    last = len(starts) - 1  # cut == last keeps no history

    def attempt(cut: int, n_mem: int) -> FittedPrompt | int:
        history_from = starts[cut]
        messages = render(parts, n_mem, history_from)
        counted = count_tokens(messages)
        ids = [] if isinstance(counted, int) else counted
        tokens = counted if isinstance(counted, int) else len(counted)
        if tokens > budget:
            return tokens
        return FittedPrompt(
            messages=messages,
            tokens=tokens,
            budget=budget,
            memories_kept=n_mem,
            history_kept=len(parts.history) - history_from,
            dropped_history=history_from,
            dropped_memories=len(parts.memories) - n_mem,
            token_ids=ids,
        )

    n_mem = len(parts.memories)
    first = attempt(0, n_mem)
    if isinstance(first, FittedPrompt):
        return first
    tokens = first
    if last > 0:
        bare = attempt(last, n_mem)
        if not isinstance(bare, FittedPrompt):
            tokens = bare
        else:
            lo, hi, best = 0, last, bare  # invariant: cut lo fails, cut hi fits
            while hi - lo > 1:
                mid = (lo + hi) // 2
                got = attempt(mid, n_mem)
                if isinstance(got, FittedPrompt):
                    hi, best = mid, got
                else:
                    lo = mid
            return best
    while n_mem > 0:
        n_mem -= 1
        got = attempt(last, n_mem)
        if isinstance(got, FittedPrompt):
            return got
        tokens = got
    raise ValidationError(
        f"the message is too long for the model: the prompt needs {tokens} tokens but only {budget} fit "
        "(the model's context minus max_tokens); shorten the message or lower max_tokens",
        param="message",
        status=413,
    )
