"""Replay recorded client request sequences (Home Assistant, Open WebUI) against a real daemon.

Each file in tests/fixtures/clients/ is one client's requests in order, with what the client
needs from each reply (its `conventions` block defines the notation). A test sends every step
exactly as recorded, over a real HTTP client, reads the reply the way that client does (NDJSON
line by line, SSE `data:` events until `[DONE]`, or one JSON document) and checks every
expectation, naming the step in each failure.

Only three things differ from the recording, all to keep the run short and stable on two
cores: model placeholders are filled from what the daemon lists, explicit output caps are
lowered to REPLAY_MAX_TOKENS (the key and its number type stay; an uncapped request is capped
by the daemon's own inference.max_tokens_default, set to the same value), and `temperature: 0`
is added where the client already sends sampling parameters (Ollama `options`, OpenAI top level)
but no temperature. The daemon runs llama.cpp on one thread: on two cores shared with other
jobs, two threads that wait on each other at every layer made single steps take minutes.

The default model (SmolLM2-135M) is too small to follow instructions, so what it says is never
asserted: a tool-call step passes with a well-formed call (an offered tool, arguments an object
matching the tool's JSON Schema) or with plain text, and the follow-up step then sends either
the call rebuilt as the client rebuilds it or the recorded fallback, so it always runs. Which
call or which JSON keys the model chose (tool_call_expected, content_json_keys) is reported as a
note, not a failure.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jsonschema
import pytest

from tests.conftest import REPO, DaemonProc, requires_models, start_daemon

FIXTURES = REPO / "tests" / "fixtures" / "clients"
REPLAY_MAX_TOKENS = 64
# The longest step evaluates a ~1,300-token prompt: about 20 s on one thread of a busy core.
STEP_TIMEOUT_S = 120.0
TEST_TIMEOUT_S = 300
PERSONA = "mongars"
EMBED = "all-minilm-l6-v2"
CALL_PLACEHOLDER = "{tool_call_from_previous}"
CALL_ID_PLACEHOLDER = "{tool_call_id_from_previous}"
_CAP_KEYS = ("num_predict", "max_tokens", "max_completion_tokens")
_MISSING = object()
_TYPES: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "bool": lambda v: isinstance(v, bool),
}
_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+|\*)\]")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    # No token: these clients send no credentials (or an empty bearer) and loopback is the local admin.
    # One llama.cpp thread: see the module docstring.
    env = {
        "MONGARSD_INFERENCE__MAX_TOKENS_DEFAULT": str(REPLAY_MAX_TOKENS),
        "MONGARSD_INFERENCE__THREADS": "1",
        "MONGARSD_INFERENCE__THREADS_BATCH": "1",
    }
    d = start_daemon(tmp_path_factory.mktemp("replay"), models=True, env=env)
    yield d
    d.stop()


# ---- Dotted paths: "models[*].model", "embeddings[0][0]", "choices[0].delta.tool_calls[*].index" ----


def _tokens(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    for name, index in _PATH_TOKEN.findall(path):
        tokens.append(name if name else ("*" if index == "*" else int(index)))
    return tokens


def resolve(doc: Any, path: str) -> list[tuple[str, Any]]:
    """Return (location, value) for each place PATH names in DOC; _MISSING where a key or index is absent."""
    found: list[tuple[str, Any]] = [("", doc)]
    for token in _tokens(path):
        following: list[tuple[str, Any]] = []
        for where, value in found:
            if value is _MISSING:
                following.append((where, value))
            elif token == "*":
                if isinstance(value, list):
                    following += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
                else:
                    following.append((f"{where}[*]", _MISSING))
            elif isinstance(token, int):
                ok = isinstance(value, list) and token < len(value)
                following.append((f"{where}[{token}]", value[token] if ok else _MISSING))
            else:
                ok = isinstance(value, dict) and token in value
                following.append((f"{where}.{token}" if where else token, value[token] if ok else _MISSING))
        found = following
    return found


def _show(value: Any) -> str:
    return "absent" if value is _MISSING else f"{type(value).__name__} {json.dumps(value)[:80]}"


def check_fields(doc: Any, paths: list[str], where: str) -> list[str]:
    return [f"{where}: {path} is missing" for path in paths if not any(v is not _MISSING for _, v in resolve(doc, path))]


def check_types(doc: Any, types: dict[str, str], where: str, *, required: bool) -> list[str]:
    """Check each path's type; REQUIRED: an absent or null value fails, else it is skipped (null = unset)."""
    problems = []
    for path, kind in types.items():
        for loc, value in resolve(doc, path):
            if (value is _MISSING or value is None) and not required:
                continue
            if value is _MISSING or not _TYPES[kind](value):
                problems.append(f"{where}: {loc} should be {kind}, is {_show(value)}")
    return problems


# ---- Reading replies as the clients do ------------------------------------------------------------


@dataclass
class Reply:
    status: int = 0
    media_type: str = ""
    latency_s: float = 0.0
    docs: list[Any] = field(default_factory=list)  # the JSON body, or each NDJSON line / SSE event
    problems: list[str] = field(default_factory=list)  # framing errors the client would choke on
    raw: str = ""  # the body, for error messages, when it was not a stream


async def read_ndjson(resp: aiohttp.ClientResponse, reply: Reply) -> None:
    """Parse every line as ollama-python (aiter_lines + json.loads) and Open WebUI do: a blank line is fatal."""
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line.strip():
            reply.problems.append(f"blank line {len(reply.docs) + 1} in an NDJSON stream")
            continue
        try:
            reply.docs.append(json.loads(line))
        except json.JSONDecodeError:
            reply.problems.append(f"line {len(reply.docs) + 1} is not JSON: {line[:120]!r}")


async def read_sse(resp: aiohttp.ClientResponse, reply: Reply) -> None:
    """Parse as Open WebUI's middleware: skip blank lines, strip `data:`, stop at [DONE], json.loads the rest."""
    done = False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line:
            continue
        if done:
            reply.problems.append(f"data after [DONE]: {line[:120]!r}")
            continue
        if not line.startswith("data:"):
            reply.problems.append(f"an SSE line that is not a data line: {line[:120]!r}")
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            done = True
            continue
        try:
            reply.docs.append(json.loads(payload))
        except json.JSONDecodeError:
            reply.problems.append(f"event {len(reply.docs) + 1} is not JSON: {payload[:120]!r}")
    if not done:
        reply.problems.append("the stream ended without data: [DONE]")


async def send(session: aiohttp.ClientSession, url: str, step: dict[str, Any], body: Any) -> Reply:
    """Send one step exactly as recorded (method, path, headers, JSON body) and read the reply its way."""
    reply = Reply()
    data = None if body is None else json.dumps(body).encode()
    start = time.monotonic()
    async with session.request(step["method"], url + step["path"], data=data, headers=step["headers"]) as resp:
        reply.status = resp.status
        reply.media_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if step["stream"] and resp.status == 200 and step["expect"].get("sse"):
            await read_sse(resp, reply)
        elif step["stream"] and resp.status == 200:
            await read_ndjson(resp, reply)
        else:
            reply.raw = (await resp.read()).decode(errors="replace")
            try:
                reply.docs.append(json.loads(reply.raw))
            except json.JSONDecodeError:
                reply.problems.append(f"the body is not one JSON document: {reply.raw[:200]!r}")
    reply.latency_s = time.monotonic() - start
    return reply


# ---- Tool calls: what the client reads, and what it sends back ---------------------------------------


@dataclass
class Calls:
    """The tool calls and text one reply carried, as the client accumulated them."""

    calls: list[dict[str, Any]] = field(default_factory=list)  # Ollama: each message.tool_calls[i]; OpenAI: merged deltas
    content: str = ""
    thinking: str = ""
    finish_reasons: list[str] = field(default_factory=list)


def ollama_calls(reply: Reply) -> Calls:
    out = Calls()
    for doc in reply.docs:
        message = doc.get("message") if isinstance(doc, dict) else None
        if not isinstance(message, dict):
            continue
        out.content += message.get("content") or ""
        out.thinking += message.get("thinking") or ""
        out.calls += [c for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        if doc.get("done_reason"):
            out.finish_reasons.append(doc["done_reason"])
    return out


def openai_calls(reply: Reply) -> Calls:
    """Merge streamed deltas by index as Open WebUI (and the openai SDK) do; a delta without index is dropped."""
    out = Calls()
    by_index: dict[int, dict[str, Any]] = {}
    for doc in reply.docs:
        choices = doc.get("choices") if isinstance(doc, dict) else None
        for choice in choices if isinstance(choices, list) else []:
            delta = choice.get("delta") or {}
            out.content += delta.get("content") or ""
            if choice.get("finish_reason"):
                out.finish_reasons.append(choice["finish_reason"])
            for piece in delta.get("tool_calls") or []:
                index = piece.get("index")
                if not isinstance(index, int):
                    continue
                call = by_index.setdefault(
                    index, {"index": index, "id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] = call["id"] or piece.get("id")
                fn = piece.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
    out.calls = [by_index[i] for i in sorted(by_index)]
    return out


def check_calls(calls: Calls, body: dict[str, Any], where: str, *, openai: bool) -> list[str]:
    """Check each call names an offered tool and carries arguments its client can use, valid for the tool's schema."""
    tools = {t["function"]["name"]: t["function"].get("parameters") or {} for t in body.get("tools") or []}
    problems = []
    indexes = []
    for n, call in enumerate(calls.calls):
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        name, args = fn.get("name"), fn.get("arguments")
        if name not in tools:
            problems.append(f"{where}: call {n} names {name!r}, not an offered tool ({sorted(tools)})")
            continue
        if openai:
            if not (isinstance(call.get("id"), str) and call["id"]):
                problems.append(f"{where}: call {n} has no id")
            try:
                args = json.loads(args) if isinstance(args, str) else _MISSING
            except json.JSONDecodeError:
                args = _MISSING
        if not isinstance(args, dict):
            problems.append(f"{where}: call {n} to {name}: arguments {_show(args)} are not a JSON object")
            continue
        problems += [
            f"{where}: call {n} to {name}: {err.message}"
            for err in jsonschema.validators.validator_for(tools[name])(tools[name]).iter_errors(args)
        ]
        indexes.append(call.get("index", fn.get("index", 0)))
    if not openai and len(set(indexes)) < len(indexes):
        # Open WebUI merges Ollama calls by index: two calls with one index become one broken call
        problems.append(f"{where}: {len(indexes)} calls share indexes {indexes}")
    return problems


@dataclass
class Rebuilt:
    message: dict[str, Any]
    call_ids: list[str | None]  # one per call: the tool_call_id the client sends back (None: it sends none)


def _ha_clean(args: dict[str, Any]) -> dict[str, Any]:
    """Drop null and empty values and decode JSON-looking strings, as HA's entity.py does before running a tool."""
    out = {}
    for key, value in args.items():
        if value is None or value == "":
            continue
        out[key] = value
        if isinstance(value, str) and value[:1] + value[-1:] in ("[]", "{}"):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                pass  # not JSON after all: HA keeps the string
    return out


def rebuild_home_assistant(calls: Calls) -> Rebuilt:
    message: dict[str, Any] = {"role": "assistant"}
    if calls.content:
        message["content"] = calls.content
    if calls.thinking:
        message["thinking"] = calls.thinking
    message["tool_calls"] = [
        {"function": {"name": c["function"]["name"], "arguments": _ha_clean(c["function"]["arguments"] or {})}} for c in calls.calls
    ]
    return Rebuilt(message, [None] * len(calls.calls))


def rebuild_open_webui_ollama(calls: Calls) -> Rebuilt:
    ids = [c.get("id") or f"call_{uuid.uuid4()}" for c in calls.calls]
    tool_calls = [
        {
            "index": c.get("index", c["function"].get("index", 0)),
            "id": i,
            "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
        }
        for c, i in zip(calls.calls, ids, strict=True)
    ]
    return Rebuilt({"role": "assistant", "content": "", "tool_calls": tool_calls}, list(ids))


def rebuild_open_webui_openai(calls: Calls) -> Rebuilt:
    return Rebuilt({"role": "assistant", "content": calls.content, "tool_calls": calls.calls}, [c["id"] for c in calls.calls])


# ---- Requests: placeholders, caps -----------------------------------------------------------------


def substitute(obj: Any, values: dict[str, str]) -> Any:
    if isinstance(obj, str):
        for key in sorted(values, key=len, reverse=True):
            obj = obj.replace(key, values[key])
        return obj
    if isinstance(obj, list):
        return [substitute(v, values) for v in obj]
    if isinstance(obj, dict):
        return {k: substitute(v, values) for k, v in obj.items()}
    return obj


def fill_call(messages: list[Any], rebuilt: Rebuilt) -> list[Any]:
    """Put the rebuilt assistant turn in place of its placeholder and one tool result per call after it."""
    out: list[Any] = []
    i = 0
    while i < len(messages):
        if messages[i] != CALL_PLACEHOLDER:
            out.append(messages[i])
            i += 1
            continue
        out.append(rebuilt.message)
        template = messages[i + 1] if i + 1 < len(messages) else None
        if isinstance(template, dict) and template.get("role") == "tool":
            out += [substitute(template, {CALL_ID_PLACEHOLDER: call_id or ""}) for call_id in rebuilt.call_ids]
            i += 1
        i += 1
    return out


def tame(body: Any, path: str) -> Any:
    """Lower explicit output caps to REPLAY_MAX_TOKENS and add temperature 0 where sampling params are already sent."""
    if not isinstance(body, dict):
        return body
    body = copy.deepcopy(body)
    options = body.get("options")
    for holder in (body, options):
        if isinstance(holder, dict):
            for key in _CAP_KEYS:
                if isinstance(holder.get(key), int | float) and holder[key] > REPLAY_MAX_TOKENS:
                    holder[key] = type(holder[key])(REPLAY_MAX_TOKENS)
    if isinstance(options, dict):
        options.setdefault("temperature", 0)
    elif path == "/v1/chat/completions":
        body.setdefault("temperature", 0)
    return body


# ---- One step -------------------------------------------------------------------------------------


def final_doc(step: dict[str, Any], reply: Reply) -> tuple[Any, list[str]]:
    """Return the document expect.fields/types/equals apply to, with any problem finding it."""
    if not step["stream"]:
        return (reply.docs[0] if reply.docs else {}), []
    if step["expect"].get("sse"):
        with_choices = [d for d in reply.docs if isinstance(d, dict) and d.get("choices")]
        return (with_choices[-1] if with_choices else {}), ([] if with_choices else ["no event has choices"])
    last = reply.docs[-1] if reply.docs else {}
    problems = [] if isinstance(last, dict) and last.get("done") is True else ["the last line is not the done line"]
    problems += [
        f"line {n + 1} of {len(reply.docs)} says done" for n, d in enumerate(reply.docs[:-1]) if isinstance(d, dict) and d.get("done")
    ]
    return last, problems


def check_step(step: dict[str, Any], body: Any, reply: Reply) -> list[str]:
    """Return every way REPLY fails STEP's expectations, each prefixed by where."""
    expect = step["expect"]
    problems = list(reply.problems)
    if reply.status != expect["status"]:
        return [*problems, f"status {reply.status}, expected {expect['status']}: {reply.raw[:300]}"]
    media = expect.get("content_type") or ("application/x-ndjson" if step["stream"] and not expect.get("sse") else None)
    if media and reply.media_type != media:
        problems.append(f"Content-Type {reply.media_type!r}, expected {media!r}")
    if "max_latency_s" in expect and reply.latency_s > expect["max_latency_s"]:
        problems.append(f"took {reply.latency_s:.1f}s, the client gives up after {expect['max_latency_s']}s")
    final, found = final_doc(step, reply)
    problems += found
    problems += check_fields(final, expect.get("fields", []), "reply")
    problems += check_types(final, expect.get("types", {}), "reply", required=True)
    for path, want in expect.get("equals", {}).items():
        got = [v for _, v in resolve(final, path)]
        if got != [want]:
            problems.append(f"reply: {path} is {got}, expected {want!r}")
    for path, pattern in expect.get("matches", {}).items():
        problems += [
            f"reply: {loc} {_show(v)} does not match {pattern}"
            for loc, v in resolve(final, path)
            if not (isinstance(v, str) and re.search(pattern, v))
        ]
    for n, doc in enumerate(reply.docs):
        where = f"{'event' if expect.get('sse') else 'line'} {n + 1}" if step["stream"] else "reply"
        if isinstance(doc, dict) and doc.get("error"):
            problems.append(f"{where}: error {doc['error']!r}")  # ollama-python raises ResponseError on it
        rules = expect.get("each_chunk") or expect.get("each_event") or {}
        if step["stream"]:
            problems += check_fields(doc, rules.get("fields", []), where)
            problems += check_types(doc, rules.get("types", {}), where, required=True)
        problems += check_types(doc, expect.get("if_present", {}), where, required=False)
        for path in expect.get("required_when_tool_calls", []):
            head = path.split("[*]")[0]
            if any(isinstance(v, list) and v for _, v in resolve(doc, head)):
                problems += check_types(doc, {path: "int"}, where, required=True)
    if "equal_length" in expect:
        left, right = expect["equal_length"]
        sizes = [
            len(v) if isinstance(v, list) else -1
            for side in (left, right)
            for _, v in resolve(body if side.startswith("body.") else final, side.removeprefix("body."))
        ]
        if len(set(sizes)) != 1:
            problems.append(f"{left} and {right} differ in length: {sizes}")
    when = expect.get("usage_event_expected_when")
    if when and any(v is True for _, v in resolve(body, when)):
        usage = [d for d in reply.docs if isinstance(d, dict) and d.get("choices") == [] and isinstance(d.get("usage"), dict)]
        if not usage:
            problems.append(f"no choices-less usage event although the request sets {when}")
        else:
            problems += check_types(
                usage[-1],
                {f"usage.{k}": "int" for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
                "usage event",
                required=True,
            )
    return problems


def content_notes(step: dict[str, Any], final: Any, calls: Calls) -> tuple[list[str], list[str]]:
    """Check what content the client parses; return (problems, notes). The tiny model's choices are notes."""
    expect = step["expect"]
    problems: list[str] = []
    notes: list[str] = []
    if expect.get("concatenated_content_is_json"):
        # Constrained by the format schema: it must parse unless the cap cut it short.
        try:
            doc = json.loads(calls.content)
        except json.JSONDecodeError:
            if calls.finish_reasons[-1:] == ["length"] and calls.content.lstrip().startswith("{"):
                # still a bare document (no fence, no prose) as far as it goes
                notes.append(f"JSON cut by the {REPLAY_MAX_TOKENS}-token cap: {calls.content[:120]!r}")
            else:
                problems.append(f"content is not one JSON document (HA json_loads fails): {calls.content[:200]!r}")
        else:
            schema = expect.get("concatenated_content_schema") or {}
            problems += [f"content JSON: {e.message}" for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(doc)]
    if "content_json_keys" in expect:
        text = next(
            (v for _, v in resolve(final, "choices[0].message.content") + resolve(final, "message.content") if isinstance(v, str)), ""
        )
        found: Any = None
        if "{" in text and "}" in text:
            try:
                found = json.loads(text[text.index("{") : text.rindex("}") + 1])  # Open WebUI: first '{' to last '}'
            except json.JSONDecodeError:
                pass  # the client then leaves the chat untitled: a model quality matter
        keys = expect["content_json_keys"]
        if not (isinstance(found, dict) and all(k in found for k in keys)):
            notes.append(f"no JSON object with {keys} in the reply: {text[:100]!r}")
    wanted = expect.get("tool_call_expected")
    if wanted:
        if not calls.calls:
            notes.append(f"answered in text, not a call to {wanted['name_one_of']}: {calls.content[:100]!r}")
        for call in calls.calls:
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            name, args = fn.get("name"), fn.get("arguments")
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass  # check_calls has reported it
            subset = wanted.get("arguments_subset", {})
            if name not in wanted["name_one_of"] or not (isinstance(args, dict) and all(args.get(k) == v for k, v in subset.items())):
                notes.append(f"called {name}({json.dumps(args)}), the recorded user wanted {wanted['name_one_of']} with {subset}")
    return problems, notes


# ---- A whole recording ----------------------------------------------------------------------------


async def model_ids(session: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """Map the placeholders to ids the daemon lists: tagged for Ollama (/api/tags), bare for OpenAI (/v1/models)."""
    async with session.get(url + "/api/tags") as resp:
        tags = [m["model"] for m in (await resp.json())["models"]]
    async with session.get(url + "/v1/models") as resp:
        listed = {m["id"] for m in (await resp.json())["data"]}
    chat = [t for t in tags if t.split(":")[0] not in (PERSONA, EMBED)]
    embed = [t for t in tags if t.split(":")[0] == EMBED]
    assert len(chat) == 1 and len(embed) == 1, tags
    assert chat[0] in listed and EMBED in listed, listed
    # "{chat_model}:latest" stands for a /api/tags id as HA and Open WebUI send it, whatever its tag.
    return {"{chat_model}:latest": chat[0], "{embed_model}:latest": embed[0], "{chat_model}": chat[0], "{embed_model}": EMBED}


async def replay(d: DaemonProc, name: str, rebuild: Callable[[Calls], Rebuilt]) -> None:
    recording = json.loads(await asyncio.to_thread((FIXTURES / name).read_text))
    failures: list[str] = []
    notes: list[str] = []
    previous: Calls | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT_S)) as session:
        ids = await model_ids(session, d.url)
        for step in recording["steps"]:
            where = f"{name} step {step['name']}"
            body = tame(substitute(step["body"], ids), step["path"])
            if isinstance(body, dict) and CALL_PLACEHOLDER in body.get("messages", []):
                rebuilt = None
                if previous is not None and previous.calls:
                    try:
                        rebuilt = rebuild(previous)
                    except (KeyError, TypeError, AttributeError) as err:  # a malformed call, already reported
                        failures.append(f"{where}: cannot rebuild the previous call ({err!r}); sent the fallback")
                if rebuilt is None:
                    fallback = step["placeholder_fallback"]
                    rebuilt = Rebuilt(fallback[CALL_PLACEHOLDER], [fallback.get(CALL_ID_PLACEHOLDER)])
                    notes.append(f"{where}: no call from the previous step to send back; sent the recorded fallback")
                body["messages"] = fill_call(body["messages"], rebuilt)
            try:
                reply = await send(session, d.url, step, body)
            except (aiohttp.ClientError, TimeoutError) as err:  # the step fails; the next ones still run
                failures.append(f"{where}: {type(err).__name__}: {err}")
                previous = None
                continue
            problems = check_step(step, body, reply)
            sse = bool(step["expect"].get("sse"))
            previous = openai_calls(reply) if sse else ollama_calls(reply)
            if reply.status == 200 and isinstance(body, dict) and body.get("tools"):
                problems += check_calls(previous, body, "reply", openai=sse)
            if reply.status == 200:
                more, said = content_notes(step, final_doc(step, reply)[0], previous)
                problems += more
                notes += [f"{where}: {n}" for n in said]
            failures += [f"{where}: {p}" for p in problems]
    print("\n".join(["", *notes]))  # what the model chose to say: shown with -s or on failure
    assert not failures, "\n".join(failures)


@requires_models()
@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_home_assistant(served: DaemonProc) -> None:
    await replay(served, "home_assistant.json", rebuild_home_assistant)


@requires_models()
@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_open_webui_ollama(served: DaemonProc) -> None:
    await replay(served, "open_webui_ollama.json", rebuild_open_webui_ollama)


@requires_models()
@pytest.mark.timeout(TEST_TIMEOUT_S)
async def test_open_webui_openai(served: DaemonProc) -> None:
    await replay(served, "open_webui_openai.json", rebuild_open_webui_openai)


def test_every_expectation_key_is_understood() -> None:
    """Fail when a recording grows an expectation this replayer would silently ignore."""
    known = {
        *("status", "fields", "types", "if_present", "equals", "each_chunk", "each_event", "content_type", "max_latency_s", "matches"),
        *("tool_call_expected", "concatenated_content_is_json", "concatenated_content_schema", "content_json_keys", "equal_length"),
        *("sse", "done_marker", "usage_event_expected_when", "required_when_tool_calls"),
    }
    for path in sorted(FIXTURES.glob("*.json")):
        for step in json.loads(path.read_text())["steps"]:
            assert set(step["expect"]) <= known, (path.name, step["name"], set(step["expect"]) - known)
            assert step["expect"].get("done_marker", "[DONE]") == "[DONE]"


def test_calls_are_rebuilt_as_each_client_rebuilds_them() -> None:
    """Check the replay's own rebuilding on replies the tiny model rarely gives: real calls."""
    line = {
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_a",
                    "function": {
                        "index": 0,
                        "name": "HassTurnOn",
                        "arguments": {"name": "Kitchen Light", "area": "", "floor": None, "domain": '["light"]'},
                    },
                }
            ],
        }
    }
    calls = ollama_calls(Reply(docs=[line, {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"}]))
    ha = rebuild_home_assistant(calls)
    assert ha.message == {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "HassTurnOn", "arguments": {"name": "Kitchen Light", "domain": ["light"]}}}],
    }
    assert ha.call_ids == [None]
    ow = rebuild_open_webui_ollama(calls)
    assert ow.message["content"] == "" and ow.message["tool_calls"][0]["index"] == 0 and ow.call_ids == ["call_a"]
    template = {"role": "tool", "tool_call_id": CALL_ID_PLACEHOLDER, "content": "21"}
    assert fill_call([{"role": "user", "content": "q"}, CALL_PLACEHOLDER, template], ow)[1:] == [
        ow.message,
        {**template, "tool_call_id": "call_a"},
    ]
    deltas = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok "}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call_b", "type": "function", "function": {"name": "get_current_weather", "arguments": ""}}
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "dropped"}}]}}]},
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "finish_reason": "tool_calls"}
            ]
        },
    ]
    merged = openai_calls(Reply(docs=deltas))
    assert merged.calls == [
        {"index": 0, "id": "call_b", "type": "function", "function": {"name": "get_current_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert rebuild_open_webui_openai(merged).message == {"role": "assistant", "content": "ok ", "tool_calls": merged.calls}
    tools = {
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_current_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                },
            }
        ]
    }
    assert check_calls(merged, tools, "r", openai=True) == []
    merged.calls[0]["function"]["arguments"] = '{"town": 1}'
    assert check_calls(merged, tools, "r", openai=True) == ["r: call 0 to get_current_weather: 'city' is a required property"]
