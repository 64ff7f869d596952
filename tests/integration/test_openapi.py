"""The OpenAPI document, the /docs page and schemathesis runs against a real daemon with its models.

The schemathesis runs generate requests from /openapi.json (valid ones, and invalid ones that
break one rule of the schema) for every operation, send them to the daemon, and check that no
answer is a 5xx and that every status, content type and body is the documented one. A bounded
run in `make test` (SCHEMATHESIS_EXAMPLES examples per operation and mode); `make fuzz` sets a
long one. Runs are seeded (SCHEMATHESIS_SEED): a failure prints its request as a curl command and
the same seed finds it again.

Generation stays cheap: the daemon runs with a small context and reply cap, and the copy of the
document given to schemathesis caps reply lengths, string lengths and list sizes of generation
requests (cost_bounded); every operation still runs.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from openapi_spec_validator import validate as validate_openapi
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from mongarsd.api.schemas import ROUTE_MODELS
from tests.conftest import DaemonProc, http, requires_models, run_cli, start_daemon

pytestmark = requires_models()

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
BOUNDED_EXAMPLES = 4
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "200" if FUZZ else str(BOUNDED_EXAMPLES)))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "8642"))
# To reproduce one failure: the same seed, and only its operation, e.g. SCHEMATHESIS_OPERATIONS="POST /api/chat"
OPERATIONS = {op.strip() for op in os.environ.get("SCHEMATHESIS_OPERATIONS", "").split(",") if op.strip()}
CALL_TIMEOUT_S = 30.0  # one request's deadline; a slower answer is a failure
RUN_TIMEOUT_S = 110 if EXAMPLES <= BOUNDED_EXAMPLES else 3600  # the pytest timeout of one run
DOCS_MAX_BYTES = 100_000
# Test-side cost bounds for generation requests (the document itself states the handlers' limits).
GEN_MAX_TOKENS = 6
GEN_MAX_STRING = 160
GEN_MAX_ITEMS = 4
DAEMON_ENV = {
    "MONGARSD_AUTH__LOOPBACK_TRUSTED": "false",  # loopback is not the local admin: the anonymous run gets 401s
    "MONGARSD_AUTH__RATE_LIMIT_RPS": "100000",
    "MONGARSD_AUTH__RATE_LIMIT_BURST": "100000",
    "MONGARSD_INFERENCE__N_CTX": "512",
    "MONGARSD_INFERENCE__SLOTS": "1",
    "MONGARSD_INFERENCE__MAX_TOKENS_DEFAULT": "6",
    "MONGARSD_SOMMEIL__ENABLED": "false",
}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    tmp = tmp_path_factory.mktemp("openapi")
    (tmp / "none.toml").write_text("")
    created = run_cli(
        "token",
        "create",
        "--user",
        "schemathesis",
        "--role",
        "admin",
        "--state-dir",
        str(tmp / "state"),
        env={"MONGARSD_CONFIG": str(tmp / "none.toml")},
    )
    assert created.returncode == 0, created.stderr
    d = start_daemon(tmp, models=True, env=DAEMON_ENV)
    yield d, created.stdout.strip()
    d.stop()


@pytest.fixture(scope="module")
def document(served: tuple[DaemonProc, str]) -> dict[str, Any]:
    d, _ = served
    resp = d.get("/openapi.json")
    assert resp.status == 200, resp.body[:300]
    assert resp.headers["Content-Type"].startswith("application/json")
    doc: dict[str, Any] = resp.json()
    return doc


# ---- (a) the document and the page ---------------------------------------------------------------


def test_document_is_valid_openapi_31_and_covers_every_route(document: dict[str, Any]) -> None:
    validate_openapi(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"].startswith("3.1")
    # built from the daemon's own route table (an undocumented route fails the build): every
    # registered route is here, and every model describes a registered route
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert documented == set(ROUTE_MODELS)
    assert "HEAD" not in {m for m, _ in documented}
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert op["summary"] and op["tags"], (method, path)
            assert "401" in op["responses"], (method, path)
            assert any(code.startswith("2") for code in op["responses"]), (method, path)
            role = op["x-mongarsd-role"]
            assert (op["security"] == []) == (role == "public"), (method, path)


def test_streaming_routes_document_their_stream_media_types(document: dict[str, Any]) -> None:
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for path in ("/api/chat", "/api/generate", "/api/v1/conversation/chat"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "application/x-ndjson"}, path
    # each surface's error envelope
    assert (
        "code"
        in document["paths"]["/v1/embeddings"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["properties"]["error"][
            "properties"
        ]
    )
    assert document["paths"]["/api/embed"]["post"]["responses"]["400"]["content"]["application/json"]["schema"]["properties"]["error"] == {
        "type": "string"
    }


def test_docs_page_works_offline_and_needs_no_credentials(served: tuple[DaemonProc, str]) -> None:
    d, _ = served
    resp = d.get("/docs")  # no token, loopback not trusted: public like /health
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert len(resp.body) < DOCS_MAX_BYTES
    html = resp.body.decode()
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:)?//""", html, re.IGNORECASE), "external asset"
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html
    assert "openapi.json" in html
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert d.get("/openapi.json").status == 200
    assert d.get("/api/v1/status").status == 401  # the rest still needs a token


def test_validation_speaks_each_surface_error_shape(served: tuple[DaemonProc, str]) -> None:
    d, token = served
    resp = d.post("/v1/chat/completions", {"model": "x", "messages": [], "parallel_tool_calls": "yes"}, token=token)
    assert resp.status == 400 and resp.json()["error"]["param"] == "parallel_tool_calls", resp.body
    resp = d.post("/api/chat", {"model": "x", "stream": "no"}, token=token)
    assert resp.status == 400 and resp.json() == {"error": "'stream' must be true or false, got a string"}
    resp = d.post("/api/v1/memory", {"text": 5}, token=token)
    assert resp.status == 400 and resp.json()["error"]["param"] == "text", resp.body
    resp = d.post("/api/v1/memory", {"text": 5})  # unauthenticated callers learn nothing about bodies
    assert resp.status == 401


# ---- (b) schemathesis ------------------------------------------------------------------------------


def _cap(schema: Any, *, max_string: int, max_items: int) -> None:
    """Tighten string lengths and list sizes everywhere in SCHEMA, in place."""
    if isinstance(schema, list):
        for item in schema:
            _cap(item, max_string=max_string, max_items=max_items)
        return
    if not isinstance(schema, dict):
        return
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types or []
    if "string" in types and "enum" not in schema and "pattern" not in schema:
        schema["maxLength"] = min(schema.get("maxLength", max_string), max_string)
        schema["minLength"] = min(schema.get("minLength", 0), max_string)
    if "array" in types:
        schema["maxItems"] = min(schema.get("maxItems", max_items), max_items)
        schema["minItems"] = min(schema.get("minItems", 0), max_items)
    for value in schema.values():
        _cap(value, max_string=max_string, max_items=max_items)


def cost_bounded(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of DOCUMENT whose generation requests stay cheap: short prompts, a few tokens."""
    doc = copy.deepcopy(document)
    for item in doc["paths"].values():
        for op in item.values():
            if "x-mongarsd-stream" not in op:
                continue
            body = op["requestBody"]["content"]["application/json"]["schema"]
            _cap(body, max_string=GEN_MAX_STRING, max_items=GEN_MAX_ITEMS)
            props = body.get("properties", {})
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    props[key]["maximum"] = GEN_MAX_TOKENS
            options = props.get("options", {}).get("properties", {})
            if "num_predict" in options:
                options["num_predict"].update(minimum=1, maximum=GEN_MAX_TOKENS)
    return doc


def run_schemathesis(url: str, document: dict[str, Any], headers: dict[str, str]) -> tuple[list[str], dict[str, float]]:
    """Run every operation in both generation modes; return the failures (with curl reproductions) and seconds per operation.

    After each operation that changes state, every GET without parameters (models, loaded models,
    status, tokens, peers, ...) is called once: a request can leave state behind that breaks
    another route (that is how a huge keep_alive broke /api/ps).
    """
    # no crash cache in the work tree: a failure is reproduced from this report (seed, curl command)
    schema = schemathesis.openapi.from_dict(cost_bounded(document), config=schemathesis.Config.from_dict({"cache": {"enabled": False}}))
    operations = [result.ok() for result in schema.get_all_operations()]
    observers = [op for op in operations if op.method.upper() == "GET" and not (op.query or op.path_parameters)]
    # a fresh connection per request: the HTTP parser closes the connection after a request line
    # it refuses, and reusing a closing connection is a client-side race, not a finding
    call = {"base_url": url, "headers": {**headers, "Connection": "close"}, "checks": CHECKS, "timeout": CALL_TIMEOUT_S}
    failures: list[str] = []
    seconds: dict[str, float] = {}
    with requests.Session() as session:

        def attempt(label: str, run: Callable[[], None]) -> None:
            try:
                run()
            except (Exception, BaseExceptionGroup) as err:  # every operation runs; failures are reported together
                if interrupted(err):
                    raise  # pytest's timeout (hypothesis reports it as a flaky failure), ^C: not a finding
                failures.append(label + " " + describe(err))

        for op in operations:
            if OPERATIONS and op.label not in OPERATIONS:
                continue
            # Negative data needs something to break: operations without inputs run positive cases only.
            modes = [GenerationMode.POSITIVE]
            if op.body or op.query or op.path_parameters:
                modes.append(GenerationMode.NEGATIVE)
            t0 = time.monotonic()
            for mode in modes:

                @seed(SEED)
                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    database=None,
                    phases=[Phase.generate, Phase.shrink] if FUZZ else [Phase.generate],
                    suppress_health_check=list(HealthCheck),
                    report_multiple_bugs=False,
                )
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case: schemathesis.Case) -> None:
                    case.call_and_validate(session=session, **call)

                attempt(f"{op.label} [{mode.value}]", check)
            if op.method.upper() != "GET":
                for observer in observers:
                    attempt(f"{observer.label} [after {op.label}]", lambda o=observer: o.Case().call_and_validate(session=session, **call))
            seconds[op.label] = round(time.monotonic() - t0, 2)
    return failures, seconds


def _inner(err: BaseException) -> list[BaseException]:
    """The members of a group, and the cause (hypothesis wraps a FailureGroup that failed only once)."""
    subs = list(err.exceptions) if isinstance(err, BaseExceptionGroup) else []
    return [*subs, err.__cause__] if err.__cause__ is not None else subs


def interrupted(err: BaseException, depth: int = 0) -> bool:
    """Tell whether ERR is, or carries, pytest's timeout or an interrupt."""
    if isinstance(err, (pytest.fail.Exception, pytest.skip.Exception, KeyboardInterrupt, SystemExit)):
        return True
    return depth < 4 and any(interrupted(sub, depth + 1) for sub in _inner(err))


def describe(err: BaseException, depth: int = 0) -> str:
    """An exception with everything it carries (schemathesis' failures carry the curl reproduction)."""
    text = type(err).__name__ + ": " + str(err)
    if depth >= 4:
        return text
    return text + "".join("\n  -> " + describe(sub, depth + 1).replace("\n", "\n     ") for sub in _inner(err))


def _report(name: str, failures: list[str], seconds: dict[str, float], tmp_path: Path) -> str:
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    text = f"schemathesis {name} (seed {SEED}, {EXAMPLES} examples per operation and mode): {len(failures)} failing operations\n"
    text += "slowest: " + json.dumps(dict(slowest)) + "\n\n" + "\n\n".join(failures)
    (tmp_path / f"schemathesis-{name}.txt").write_text(text)
    return text


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_schemathesis_with_an_admin_token(served: tuple[DaemonProc, str], document: dict[str, Any], tmp_path: Path) -> None:
    d, token = served
    failures, seconds = run_schemathesis(d.url, document, {"Authorization": "Bearer " + token})
    assert d.proc.poll() is None, d.log()[-3000:]
    assert not failures, _report("admin", failures, seconds, tmp_path)
    assert http("GET", d.url + "/health").status == 200


@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_schemathesis_without_credentials(served: tuple[DaemonProc, str], document: dict[str, Any], tmp_path: Path) -> None:
    d, _ = served
    failures, seconds = run_schemathesis(d.url, document, {})
    assert not failures, _report("anonymous", failures, seconds, tmp_path)
