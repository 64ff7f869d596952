"""The Ollama surface against a real daemon with the real default models, with the official client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from tests.conftest import MODELS_DIR, DaemonProc, http, requires_models
from tests.integration.test_openai_api import start_llm_daemon

pytestmark = requires_models()

MODEL = "smollm2-135m-instruct:q4_1"
EMBED = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Say hello."}]
SHORT = {"num_predict": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, str]]:
    tmp = tmp_path_factory.mktemp("ollama")
    # a models folder with the real models (linked) and one corrupt GGUF next to them
    models = tmp / "models"
    models.mkdir()
    for name in ("SmolLM2-135M-Instruct-Q4_1.gguf", EMBED):
        (models / name).symlink_to(MODELS_DIR / name)
    real = (MODELS_DIR / "SmolLM2-135M-Instruct-Q4_1.gguf").read_bytes()
    (models / "Broken-135M-Q4_1.gguf").write_bytes(real[: len(real) // 3])
    d, token = start_llm_daemon(tmp, args=["--models-dir", str(models)])
    yield d, token
    d.stop()


@pytest.fixture
def client(served: tuple[DaemonProc, str]) -> Iterator[ollama.Client]:
    d, token = served
    c = ollama.Client(host=d.url, headers={"Authorization": "Bearer " + token}, timeout=60)
    try:
        yield c
    finally:
        c.close()  # its keep-alive connection (the client has __exit__ but no __enter__)


def post(served: tuple[DaemonProc, str], path: str, body: Any) -> Any:
    d, token = served
    return http("POST", d.url + path, body, token=token)


def get(served: tuple[DaemonProc, str], path: str) -> Any:
    d, token = served
    return http("GET", d.url + path, token=token)


def test_chat_plain(client: ollama.Client) -> None:
    r = client.chat(model=MODEL, messages=HI, options=SHORT)
    assert r.model == MODEL and r.done and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and r.message.content
    assert r.eval_count is not None and 1 <= r.eval_count <= 8
    assert r.prompt_eval_count and r.prompt_eval_count > 5
    assert r.total_duration and r.eval_duration and r.total_duration >= r.eval_duration > 0


def test_chat_stream(client: ollama.Client) -> None:
    chunks = list(client.chat(model=MODEL, messages=HI, options=SHORT, stream=True))
    assert len(chunks) >= 2
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.message.content or "" for c in chunks).strip()
    assert chunks[-1].eval_count is not None and chunks[-1].eval_count <= 8


def test_generate_ndjson_wire_format(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 4}})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.body.decode().splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length")
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(lines[-1][key], int), key
    assert all(line["done"] is False and "response" in line and line["created_at"].endswith("Z") for line in lines[:-1])


def test_generate_json_format(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.generate(
        model=MODEL, prompt="Is the sky blue? Answer in JSON.", format=schema, options={"num_predict": 16, "temperature": 0}, stream=False
    )
    assert r.done_reason == "stop"
    assert isinstance(json.loads(r.response)["ok"], bool)


def test_embed_and_embeddings(client: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    r = client.embed(model="all-minilm", input=["a cat", "a dog"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 384
    single = client.embeddings(model=EMBED, prompt="a cat")
    assert max(abs(a - b) for a, b in zip(single.embedding, r.embeddings[0], strict=True)) < 1e-6
    openai_side = post(served, "/v1/embeddings", {"model": EMBED, "input": "a cat"}).json()["data"][0]["embedding"]
    assert max(abs(a - b) for a, b in zip(openai_side, r.embeddings[0], strict=True)) < 1e-6


def test_tags_show_version(client: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    tags = {m.model: m for m in client.list().models}
    # every id is tagged (Open WebUI rewrites untagged ids to ":latest"), the embedder has a digest
    assert MODEL in tags and EMBED + ":latest" in tags and "mongars:latest" in tags
    assert tags[EMBED + ":latest"].digest and len(tags[EMBED + ":latest"].digest or "") == 64
    details = tags[MODEL].details
    assert details is not None and details.format == "gguf" and details.family == "llama"
    assert details.quantization_level == "Q4_1" and details.parameter_size == "135M"
    assert tags[MODEL].size and tags[MODEL].digest and len(tags[MODEL].digest) == 64
    show = client.show(MODEL)
    assert show.details is not None and show.details.family == "llama"
    assert show.modelinfo is not None and show.modelinfo["general.architecture"] == "llama"
    assert show.template and "im_start" in show.template
    version = get(served, "/api/version").json()
    assert version["version"] and version["mongarsd"]


def test_ps_and_keep_alive(client: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    client.chat(model=MODEL, messages=HI, options={"num_predict": 1})
    loaded = [m.model for m in client.ps().models]
    assert loaded == [MODEL]
    # keep_alive 0 with no prompt unloads (Ollama's unload request)
    r = post(served, "/api/generate", {"model": MODEL, "keep_alive": 0})
    assert r.status == 200 and r.json()["done_reason"] == "unload"
    assert client.ps().models == []
    # the next request loads it again and says how long that took
    again = client.chat(model=MODEL, messages=HI, options={"num_predict": 1}, keep_alive="10m")
    assert again.load_duration and again.load_duration > 0
    ps = get(served, "/api/ps").json()["models"]
    assert [m["name"] for m in ps] == [MODEL] and ps[0]["slots"]["busy"] == 0
    assert not ps[0]["expires_at"].startswith("9999")  # 10 minutes from now
    # an empty chat loads without generating
    assert post(served, "/api/chat", {"model": MODEL, "messages": [], "keep_alive": -1}).json()["done_reason"] == "load"
    assert get(served, "/api/ps").json()["models"][0]["expires_at"].startswith("9999")


def test_keep_alive_zero_unloads_after_the_request(client: ollama.Client) -> None:
    client.chat(model=MODEL, messages=HI, options={"num_predict": 1}, keep_alive=0)
    deadline = time.monotonic() + 5
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ps().models == []
    client.chat(model=MODEL, messages=HI, options={"num_predict": 1}, keep_alive=-1)
    assert [m.model for m in client.ps().models] == [MODEL]


def test_short_keep_alive_unloads_when_idle(client: ollama.Client) -> None:
    client.chat(model=MODEL, messages=HI, options={"num_predict": 1}, keep_alive="1s")
    assert [m.model for m in client.ps().models] == [MODEL]
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.ps().models == []
    client.chat(model=MODEL, messages=HI, options={"num_predict": 1}, keep_alive=-1)


def test_unknown_model_is_404_in_ollama_shape(client: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/api/chat", {"model": "llama9:70b", "messages": HI})
    assert r.status == 404 and r.json() == {"error": "model 'llama9:70b' not found"}
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="hi")
    assert info.value.status_code == 404


def test_corrupt_model_is_a_clear_error_and_the_daemon_keeps_serving(client: ollama.Client, served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/api/generate", {"model": "broken-135m:q4_1", "prompt": "hi", "stream": False})
    assert r.status == 422
    assert "Broken-135M-Q4_1.gguf cannot be used" in r.json()["error"] and "past the end of the file" in r.json()["error"]
    assert client.chat(model=MODEL, messages=HI, options={"num_predict": 2}).message.content is not None


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/chat", {"model": MODEL, "messages": HI, "options": {"temperature": 50}}, "options.temperature"),
        ("/api/chat", {"model": MODEL, "messages": HI, "options": {"num_ctx": 16}}, "context holds 16 tokens"),
        ("/api/chat", {"model": MODEL, "messages": HI, "options": {"num_ctx": 0}}, "options.num_ctx"),
        ("/api/chat", {"model": MODEL, "messages": HI, "options": {"num_predict": 0}}, "num_predict"),
        ("/api/chat", {"model": MODEL, "messages": "hi"}, "'messages' must be a list"),
        ("/api/chat", {"model": MODEL, "messages": HI, "keep_alive": "5 parsecs"}, "keep_alive"),
        ("/api/generate", {"model": MODEL, "prompt": "x", "format": "yaml"}, "format"),
        ("/api/generate", {"prompt": "x"}, "'model' is required"),
        ("/api/embed", {"model": EMBED, "input": []}, "input"),
    ],
)
def test_bad_requests_are_400_in_ollama_shape(served: tuple[DaemonProc, str], path: str, body: dict[str, Any], needle: str) -> None:
    r = post(served, path, body)
    assert r.status == 400, r.body
    data = r.json()
    assert list(data) == ["error"] and isinstance(data["error"], str) and needle in data["error"]


def test_large_num_ctx_is_clamped_like_ollama(client: ollama.Client) -> None:
    # Home Assistant's Ollama integration sends num_ctx 8192 by default
    r = client.chat(model=MODEL, messages=HI, options={"num_ctx": 8192, "num_predict": 2})
    assert r.done and r.eval_count and r.eval_count <= 2


def test_malformed_json_and_oversized_prompt(served: tuple[DaemonProc, str]) -> None:
    r = post(served, "/api/chat", b"{not json")
    assert r.status == 400 and "not valid JSON" in r.json()["error"]
    long = "lorem ipsum dolor " * 1500
    r = post(served, "/api/generate", {"model": MODEL, "prompt": long, "stream": False, "options": {"num_predict": 4}})
    assert r.status == 400 and "prompt has" in r.json()["error"] and "tokens" in r.json()["error"]


def test_tagged_ids_and_an_empty_bearer_work_as_open_webui_sends_them(served: tuple[DaemonProc, str]) -> None:
    d, _ = served
    empty = {"Authorization": "Bearer "}
    emb = http("POST", d.url + "/api/embed", {"model": EMBED + ":latest", "input": ["a cat"]}, headers=empty)
    assert emb.status == 200, emb.body[:300]  # loopback without credentials: the local admin
    chat = http(
        "POST",
        d.url + "/api/chat",
        {"model": "mongars:latest", "messages": HI, "stream": False, "options": {"num_predict": 4}},
        headers=empty,
    )
    assert chat.status == 200, chat.body[:300]
    oa = http("POST", d.url + "/v1/embeddings", {"model": EMBED + ":latest", "input": "a cat"}, headers=empty)
    assert oa.status == 200, oa.body[:300]


def test_openai_errors_carry_openai_codes(served: tuple[DaemonProc, str]) -> None:
    unknown = post(served, "/v1/chat/completions", {"model": "no-such-model", "messages": HI})
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found", unknown.body[:300]
    too_long = post(served, "/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 100_000})
    assert too_long.status == 400 and too_long.json()["error"]["code"] == "context_length_exceeded", too_long.body[:300]
