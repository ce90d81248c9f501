"""The HTTP API's validation: every bad input answers 400 in OpenAI's error shape, naming the
parameter, before any worker is involved. Runs the FastAPI app in-process (no sockets, no
workers: a request that passes validation gets 503 "no decode worker")."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from router.config import RouterConfig
from router.http_api import create_app
from router.registry import StaticWorkerDirectory
from router.server import Router
from tests.support.tiny_tokenizer import MAX_MODEL_LEN, byte_level_dir

pytestmark = pytest.mark.unit

MODEL = "tiny"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model_dir = byte_level_dir(tmp_path_factory.mktemp("tok"))
    directory = StaticWorkerDirectory([])
    router = Router(RouterConfig(model_name=MODEL, model_dir=str(model_dir)), directory)
    app = create_app(router.service, directory, lambda: ["127.0.0.1:8000"])
    with TestClient(app) as test_client:
        yield test_client


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw}


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "Hi", **kw}


LONG_PROMPT = "Hello world! " * MAX_MODEL_LEN

BAD_REQUESTS = [
    # (path, body, param, text expected in the message)
    ("/v1/completions", completion(temperature=-0.5), "temperature", ">= 0"),
    ("/v1/completions", completion(top_p=0), "top_p", "(0, 1]"),
    ("/v1/completions", completion(top_p=1.5), "top_p", "(0, 1]"),
    ("/v1/completions", completion(max_tokens=0), "max_tokens", "> 0"),
    ("/v1/completions", completion(max_tokens=-3), "max_tokens", "> 0"),
    ("/v1/completions", completion(model="gpt-4"), "model", "does not exist"),
    ("/v1/completions", {"prompt": "Hi"}, "model", "model"),
    ("/v1/completions", {"model": MODEL}, "prompt", "required"),
    ("/v1/completions", completion(prompt=""), "prompt", "empty"),
    ("/v1/completions", completion(prompt=[]), "prompt", "empty"),
    ("/v1/completions", completion(prompt=LONG_PROMPT), "prompt", f"context is {MAX_MODEL_LEN}"),
    ("/v1/completions", completion(prompt=[1] * MAX_MODEL_LEN), "prompt", f"has {MAX_MODEL_LEN} tokens"),
    ("/v1/completions", completion(prompt=[1, 10**6]), "prompt", "outside the vocabulary"),
    ("/v1/completions", completion(prompt=["a", "b"]), "prompt", "one prompt"),
    ("/v1/completions", completion(prompt=12), "prompt", "string or a list of token ids"),
    ("/v1/completions", completion(temperature="hot"), "temperature", "valid number"),
    ("/v1/completions", completion(max_tokens=1.5), "max_tokens", "valid integer"),
    ("/v1/completions", completion(stream="yes"), "stream", "valid boolean"),
    ("/v1/completions", completion(n=0), "n", "n must be in [1, 128]"),
    ("/v1/completions", completion(n=129), "n", "n must be in [1, 128]"),
    ("/v1/completions", completion(n=1.5), "n", "valid integer"),
    ("/v1/completions", completion(stop=5), "stop", "string or a list of strings"),
    ("/v1/completions", completion(stop=[""]), "stop", "empty"),
    ("/v1/completions", completion(seed=-1), "seed", "seed must be in"),
    ("/v1/completions", completion(top_k=-1), "top_k", ">= 0"),
    ("/v1/completions", completion(presence_penalty=2.5), "presence_penalty", "[-2, 2]"),
    ("/v1/completions", completion(presence_penalty=-2.1), "presence_penalty", "[-2, 2]"),
    ("/v1/completions", completion(frequency_penalty=3), "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", completion(frequency_penalty="x"), "frequency_penalty", "valid number"),
    ("/v1/completions", completion(repetition_penalty=0), "repetition_penalty", "> 0"),
    ("/v1/completions", completion(repetition_penalty=-1.0), "repetition_penalty", "> 0"),
    ("/v1/completions", completion(min_p=1.5), "min_p", "[0, 1]"),
    ("/v1/completions", completion(min_p=-0.1), "min_p", "[0, 1]"),
    ("/v1/completions", completion(logprobs=6), "logprobs", "[0, 5]"),
    ("/v1/completions", completion(logprobs=-1), "logprobs", "[0, 5]"),
    ("/v1/completions", completion(stop_token_ids=[10**6]), "stop_token_ids", "vocabulary"),
    ("/v1/completions", completion(stop_token_ids=["a"]), "stop_token_ids", "valid integer"),
    ("/v1/completions", completion(best_of=3), "best_of", "best_of"),
    ("/v1/completions", completion(logit_bias={"1": 5}), "logit_bias", "not supported"),
    ("/v1/completions", completion(echo=True), "echo", "not supported"),
    ("/v1/chat/completions", chat(temperature=-1), "temperature", ">= 0"),
    ("/v1/chat/completions", chat(top_p=2.0), "top_p", "(0, 1]"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens", "> 0"),
    ("/v1/chat/completions", chat(max_completion_tokens=0), "max_completion_tokens", "> 0"),
    ("/v1/chat/completions", chat(model="nope"), "model", "does not exist"),
    ("/v1/chat/completions", {"model": MODEL}, "messages", "required"),
    ("/v1/chat/completions", chat(messages=[]), "messages", "empty"),
    ("/v1/chat/completions", chat(messages="Hi"), "messages", "list"),
    ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), "messages", "role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), "messages", "content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": LONG_PROMPT}]), "messages",
     f"context is {MAX_MODEL_LEN}"),
    ("/v1/chat/completions", chat(n=0), "n", "n must be in [1, 128]"),
    ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs", "requires logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=-1), "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", chat(logprobs=3), "logprobs", "valid boolean"),
    ("/v1/chat/completions", chat(presence_penalty=-3), "presence_penalty", "[-2, 2]"),
    ("/v1/chat/completions", chat(frequency_penalty=2.01), "frequency_penalty", "[-2, 2]"),
    ("/v1/chat/completions", chat(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    ("/v1/chat/completions", chat(min_p=2), "min_p", "[0, 1]"),
    ("/v1/chat/completions", chat(ignore_eos="yes"), "ignore_eos", "valid boolean"),
    ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools", "not supported"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": "y"}), "stream_options", "boolean"),
]


@pytest.mark.parametrize("path, body, param, text", BAD_REQUESTS)
def test_bad_request_is_400_in_openai_shape(client, path, body, param, text) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert text in error["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion(n=3, logprobs=5, presence_penalty=-2, frequency_penalty=2,
                                   repetition_penalty=1.3, min_p=0.1, top_k=5, seed=7,
                                   stop_token_ids=[3], ignore_eos=True)),
    ("/v1/chat/completions", chat(n=2, logprobs=True, top_logprobs=20, min_p=1.0,
                                  repetition_penalty=0.5)),
    ("/v1/chat/completions", chat(logprobs=False)),
])
def test_valid_sampling_passes_validation(client, path, body) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 503, response.text  # no worker: past validation
    assert response.json()["error"]["code"] == "no_worker"


def test_unknown_model_has_model_not_found_code(client) -> None:
    error = client.post("/v1/completions", json=completion(model="gpt-4")).json()["error"]
    assert error["code"] == "model_not_found"
    assert "'tiny'" in error["message"]  # says what is served


def test_long_prompt_message_states_limit_and_length(client) -> None:
    error = client.post("/v1/completions", json=completion(prompt=[1] * 300)).json()["error"]
    assert error["message"] == (f"the prompt has 300 tokens, but the model's context is "
                                f"{MAX_MODEL_LEN} tokens and at least one must be left for the output")


@pytest.mark.parametrize("content, headers", [
    (b"{bad json", {"content-type": "application/json"}),
    (b'{"model": "tiny", "prompt": "Hi",}', {"content-type": "application/json"}),
    (b"[1, 2]", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
    (b"prompt=Hi", {"content-type": "text/plain"}),
])
def test_malformed_bodies(client, content, headers) -> None:
    response = client.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert "JSON" in error["message"]


def test_valid_request_without_workers_is_503(client) -> None:
    for path, body in (("/v1/completions", completion()), ("/v1/chat/completions", chat()),
                       ("/v1/completions", completion(stream=True))):
        response = client.post(path, json=body)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert "no decode worker is ready" in error["message"]
        assert error["code"] == "no_worker"


def test_unknown_route_is_404_in_openai_shape(client) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_operational_endpoints_without_workers(client) -> None:
    assert client.get("/health").status_code == 503
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert client.get("/cluster").json()["workers"] == []
    targets = client.get("/prometheus/targets").json()
    assert targets == [{"targets": ["127.0.0.1:8000"], "labels": {
        "job": "baton", "role": "router", "model": MODEL, "__metrics_path__": "/metrics"}}]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "baton_requests_total" in metrics.text
