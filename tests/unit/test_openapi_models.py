"""The route models (api/schemas.py), the OpenAPI document built from the route table, and request validation."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

from mongarsd.api import (
    admin,
    curiosity,
    evolution,
    ingest,
    io,
    native,
    ollama,
    openai,
    openapi,
    ops,
    peers,
    schemas,
    self_training,
    social,
    sommeil,
    speech,
)
from mongarsd.api.io import read_json
from mongarsd.api.schemas import ROUTE_MODELS, RouteModel
from mongarsd.api.validation import check_body, declared_types, validation_middleware
from mongarsd.cognition.pipeline import SESSION_ID_RE
from mongarsd.errors import MongarsError, ValidationError
from mongarsd.inference.tools import MAX_DESCRIPTION_CHARS, TOOL_NAME_RE
from mongarsd.memory.tokens import USER_NAME_RE

# What the daemon registers: create_app's own routes (ops, openapi, admin), then daemon.py's surfaces.
ROUTE_SETUPS: list[Callable[[web.Application], None]] = [
    ops.setup_routes,
    openapi.setup_routes,
    admin.setup_routes,
    openai.setup_routes,
    speech.setup_routes,
    ollama.setup_routes,
    native.setup_routes,
    ingest.setup_routes,
    curiosity.setup_routes,
    social.setup_routes,
    sommeil.setup_routes,
    evolution.setup_routes,
    self_training.setup_routes,
    peers.setup_routes,
]
JSON_TYPES = {"string", "integer", "number", "boolean", "array", "object", "null"}


def daemon_app() -> web.Application:
    app = web.Application()
    for setup in ROUTE_SETUPS:
        setup(app)
    return app


# ---- the document --------------------------------------------------------------------------------


def test_every_registered_route_has_a_model_and_every_model_a_route() -> None:
    app = daemon_app()
    registered = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource is not None}
    assert registered == set(ROUTE_MODELS)
    doc = openapi.build_document(app)
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert documented == registered
    assert "/v1/models/{model}" in doc["paths"]  # the router's {model:.+} is documented as {model}


def test_an_undocumented_route_fails_the_build() -> None:
    app = daemon_app()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/api/v1/new-thing", handler)
    with pytest.raises(openapi.UndocumentedRouteError, match="POST /api/v1/new-thing"):
        openapi.build_document(app)


def test_document_is_valid_openapi_31_with_roles_from_the_handlers() -> None:
    doc = openapi.build_document(daemon_app(), version="9.9.9")
    validate_openapi(doc)
    assert doc["info"]["version"] == "9.9.9"
    paths = doc["paths"]
    assert paths["/health"]["get"]["security"] == [] and paths["/health"]["get"]["x-mongarsd-role"] == "public"
    assert paths["/openapi.json"]["get"]["security"] == [] and paths["/docs"]["get"]["security"] == []
    assert paths["/metrics"]["get"]["x-mongarsd-role"] == "admin" and "403" in paths["/metrics"]["get"]["responses"]
    assert paths["/api/v1/peer/load"]["get"]["x-mongarsd-role"] == "peer"
    assert paths["/api/v1/memory"]["get"]["security"] == [{"bearer": []}] and "429" in paths["/api/v1/memory"]["get"]["responses"]
    assert "Retry-After" in paths["/api/chat"]["post"]["responses"]["503"]["headers"]
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))


# ---- the models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "model"), sorted(ROUTE_MODELS.items()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_models_are_consistent(key: tuple[str, str], model: RouteModel) -> None:
    method, path = key
    assert model.tag in ("openai", "ollama", "native", "ops", "admin", "peers")
    assert sorted(p.name for p in model.path) == sorted(re.findall(r"{([^}:]+)}", path))
    assert all(200 <= s < 300 for s in model.responses if (path, s) != ("/ready", 503))
    assert all(s in schemas.ERROR_DESCRIPTIONS for s in model.errors)
    if model.request is None:
        assert not model.lenient
        return
    assert method in ("POST", "PUT")
    properties = model.request.get("properties", {})
    assert set(model.request.get("required", ())) <= set(properties)
    assert model.lenient <= set(properties)
    for name, prop in properties.items():
        assert set(declared_types(prop)) <= JSON_TYPES, name
    if model.stream is not None:
        assert "stream" in properties


def test_mirrored_limits_match_the_handlers() -> None:
    assert schemas.MAX_MODEL_NAME_CHARS == openai.MAX_MODEL_NAME_CHARS == ollama.MAX_MODEL_NAME_CHARS
    assert schemas.OPENAI_MAX_STOP == openai.OPENAI_MAX_STOP
    assert schemas.OLLAMA_MAX_STOP == ollama.OLLAMA_MAX_STOP
    assert schemas.MAX_HISTORY_LIMIT == native.MAX_HISTORY_LIMIT
    assert schemas.MAX_SEARCH_K == native.MAX_SEARCH_K
    assert schemas.MAX_QUERY_CHARS == native.MAX_QUERY_CHARS
    assert SESSION_ID_RE.pattern == schemas.SESSION_ID_PATTERN
    assert schemas.TOKEN_REQUEST["properties"]["user"]["pattern"] == USER_NAME_RE.pattern
    assert schemas.FUNCTION["properties"]["name"]["pattern"] == TOOL_NAME_RE.pattern
    assert schemas.FUNCTION["properties"]["description"]["maxLength"] == MAX_DESCRIPTION_CHARS


# ---- the validator -------------------------------------------------------------------------------

CHAT = ROUTE_MODELS["POST", "/v1/chat/completions"]
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"messages": MSG}, "model", "'model' is required"),
        ({"model": None, "messages": MSG}, "model", "'model' is required"),
        ({"model": 5, "messages": MSG}, "model", "'model' must be a string, got a number"),
        ({"model": "m"}, "messages", "'messages' is required"),
        ({"model": "m", "messages": MSG, "stream": "yes"}, "stream", "'stream' must be true or false, got a string"),
        ({"model": "m", "messages": MSG, "max_tokens": 2.5}, "max_tokens", "'max_tokens' must be an integer, got a number"),
        ({"model": "m", "messages": MSG, "max_tokens": True}, "max_tokens", "'max_tokens' must be an integer, got a boolean"),
        ({"model": "m", "messages": MSG, "stop": 3}, "stop", "'stop' must be a string or a list, got a number"),
        (
            {"model": "m", "messages": {}, "stream": 1},
            "stream",
            "'stream' must be true or false, got a number",
        ),  # the handlers read stream first
    ],
)
def test_check_body_names_the_first_wrong_field(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_body(body, CHAT.request or {}, lenient=CHAT.lenient)
    assert info.value.param == param and str(info.value) == message and info.value.status == 400


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_tokens": 3.0, "temperature": 1, "stream": None, "stop": ["a"], "user": 5, "unknown": {"x": [1]}},
        {"n": True, "logprobs": 0, "tool_choice": 5},  # lenient: the handler reads these as 1, false, and ignores the last
    ],
)
def test_check_body_accepts_what_the_handlers_accept(extra: dict[str, Any]) -> None:
    check_body({"model": "m", "messages": MSG, **extra}, CHAT.request or {}, lenient=CHAT.lenient)


# Values the property test draws from: the edges handlers treat specially, and valid ones.
ATOMS: list[Any] = [None, True, False, 0, 1, -1, 2, 1.0, 2.5, -0.0, "", "x", "json", "auto", "5m", [], {}, ["x"], [1], {"a": 1}]
VALID: Mapping[str, list[Any]] = {
    "model": ["m", "mongars"],
    "messages": [MSG, [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]],
    "prompt": ["hi", ["hi"]],
    "tools": [[{"type": "function", "function": {"name": "f"}}], [{"function": {"name": "g", "parameters": {"type": "object"}}}]],
    "tool_choice": ["none", "required", {"type": "function", "function": {"name": "f"}}],
    "functions": [[{"name": "f"}]],
    "function_call": [{"name": "f"}, "none"],
    "response_format": [{"type": "json_object"}, {"type": "text"}],
    "stream_options": [{"include_usage": True}],
    "options": [{"num_predict": 2, "temperature": 0.5}, {"stop": ["x"]}],
    "format": [{"type": "object"}],
    "keep_alive": [10, "1h"],
    "stop": [["a", "b"]],
    "modalities": [["text"]],
    "seed": [42, -5],
    "max_tokens": [8],
    "max_completion_tokens": [8],
}
PARSERS: list[tuple[tuple[str, str], Callable[[Mapping[str, Any]], object]]] = [
    (("POST", "/v1/chat/completions"), openai.parse_chat_request),
    (("POST", "/v1/completions"), openai.parse_completion_request),
    (("POST", "/api/chat"), ollama.parse_chat),
    (("POST", "/api/generate"), ollama.parse_generate),
]


def plausible(prop: Mapping[str, Any]) -> list[Any]:
    """Values of a property's declared kind that its handler will likely take (pure)."""
    if "const" in prop:
        return [prop["const"]]
    if "enum" in prop:
        return [v for v in prop["enum"] if v is not None]
    out: list[Any] = []
    for kind in declared_types(prop):
        if kind == "boolean":
            out += [True, False]
        elif kind in ("integer", "number"):
            lo, hi = prop.get("minimum", 1), prop.get("maximum", 8)
            out += [lo, hi] if kind == "integer" else [lo, (lo + hi) / 2]
        elif kind == "string":
            out += [""] if prop.get("maxLength") == 0 else ["x"]
        elif kind == "array":
            out += [[]]
        elif kind == "object":
            out += [{}]
    return out


@st.composite
def bodies(draw: st.DrawFn, model: RouteModel) -> dict[str, Any]:
    """Bodies near the handler's accepted ones: mostly plausible values, some edge atoms."""
    properties: Mapping[str, Any] = (model.request or {}).get("properties", {})
    keys = draw(st.lists(st.sampled_from([*properties, "extra"]), unique=True, max_size=5))
    # required keys are nearly always there, so that the parsers get past them and reach the rest
    required = [k for k in (model.request or {}).get("required", ()) if draw(st.sampled_from([True] * 9 + [False]))]
    body: dict[str, Any] = {}
    for key in dict.fromkeys([*required, *keys]):
        good = VALID.get(key, []) + plausible(properties.get(key, {}))
        odds = 9 if key in required else 3  # one in odds+1 draws an edge atom instead
        plausible_value = bool(good) and draw(st.sampled_from([True] * odds + [False]))
        body[key] = draw(st.sampled_from(good if plausible_value else ATOMS))
    return body


@pytest.mark.parametrize(("key", "parse"), PARSERS, ids=[" ".join(k) for k, _ in PARSERS])
@given(data=st.data())
def test_validation_never_refuses_what_the_handler_parser_accepts(
    key: tuple[str, str], parse: Callable[[Mapping[str, Any]], object], data: st.DataObject
) -> None:
    model = ROUTE_MODELS[key]
    body = data.draw(bodies(model))
    try:
        parse(body)
    except MongarsError:
        return  # refused by the handler: the validator may refuse it too, in its own words
    check_body(body, model.request or {}, lenient=model.lenient)


# ---- the middleware ------------------------------------------------------------------------------


async def test_middleware_refuses_before_the_handler_and_parses_the_body_once(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    parses: list[str] = []
    real_parse = io.parse_json_text

    def counting_parse(text: str) -> Any:
        parses.append(text)
        return real_parse(text)

    monkeypatch.setattr(io, "parse_json_text", counting_parse)

    async def handler(request: web.Request) -> web.Response:
        seen.append(await read_json(request))
        return web.json_response({"ok": True})

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except ValidationError as err:
            return web.json_response({"param": err.param, "message": str(err)}, status=err.status)
        return response

    app = web.Application(middlewares=[errors, validation_middleware])

    async def no_body(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_post("/api/v1/feedback", handler)
    app.router.add_get("/api/v1/profile", no_body)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/api/v1/feedback", json={"rating": True})
        assert resp.status == 400 and await resp.json() == {
            "param": "rating",
            "message": "'rating' must be an integer or a string, got a boolean",
        }
        assert not seen  # the handler never ran
        resp = await client.post("/api/v1/feedback", data=b"[1]")
        assert resp.status == 400 and (await resp.json())["param"] == "body"
        resp = await client.post("/api/v1/feedback", json={"rating": "up", "extra": [1]})
        assert resp.status == 200 and seen == [{"rating": "up", "extra": [1]}]
        assert len(parses) == 3  # one parse per request: the handler's read_json reused the middleware's
        resp = await client.get("/api/v1/profile")  # a route without a request model: no body is read
        assert resp.status == 200 and len(parses) == 3
