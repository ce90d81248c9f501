"""API keys on the router's public API: HTTP bearer on /v1/*, gRPC `authorization` metadata on
baton.v1.Generation (the SDK sends it), 401 / UNAUTHENTICATED otherwise; probes and scrapes stay
open. Fake workers stand behind the router."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import baton
from router.auth import ApiKeys, read_keys_file
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory
from router.server import Router
from tests.support.fake_workers import FakeCluster, reply_script
from tests.support.tiny_tokenizer import byte_level_dir

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_level_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def router(model_dir):
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(model_dir)
    reply_ids = tokenizer.encode("Hello world!", add_special_tokens=False) + [
        tokenizer.eos_token_id]
    cluster = FakeCluster.start(reply_script(reply_ids), tokenizer.eos_token_ids,
                                num_decode=1, num_prefill=0)
    config = RouterConfig(model_name=MODEL, model_dir=str(model_dir), http_port=0, grpc_port=0,
                          request_timeout_s=20, graceful_shutdown_s=1, api_keys=KEYS)
    router = Router(config, StaticWorkerDirectory(cluster.infos()))
    router.start()
    yield router
    router.stop()
    cluster.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "key-one"}, {"Authorization": "Bearer"}])
def test_http_without_a_valid_key_is_401(router, headers):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    reply = httpx.post(f"{router.http_url}/v1/completions", json=body, headers=headers,
                       timeout=10)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert "wrong" not in error["message"]  # the key sent is never echoed
    assert httpx.get(f"{router.http_url}/v1/models", headers=headers, timeout=10).status_code == 401


@pytest.mark.parametrize("key", KEYS)
def test_http_with_any_configured_key_is_served(router, key):
    with openai.OpenAI(base_url=f"{router.http_url}/v1", api_key=key, max_retries=0,
                       timeout=10) as client:
        out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert out.choices[0].text == "Hello world!"


def test_probes_and_scrapes_need_no_key(router):
    assert httpx.get(f"{router.http_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{router.http_url}/metrics", timeout=10).status_code == 200
    with grpc.insecure_channel(router.grpc_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("api_key", [None, "wrong"])
def test_grpc_without_a_valid_key_is_unauthenticated(router, api_key, monkeypatch):
    monkeypatch.delenv("BATON_API_KEY", raising=False)
    with baton.Client(router.grpc_address, api_key=api_key, max_retries=0, timeout=10) as client:
        with pytest.raises(baton.AuthenticationError) as info:
            client.generate("Hi", max_tokens=4)
        assert info.value.code == "UNAUTHENTICATED"
        with pytest.raises(baton.AuthenticationError):
            client.list_models()
        with pytest.raises(baton.AuthenticationError):
            client.abort("nothing")


def test_grpc_with_a_key_from_the_argument_or_the_environment(router, monkeypatch):
    with baton.Client(router.grpc_address, api_key="key-two", timeout=10) as client:
        assert client.generate("Hi", max_tokens=4).text == "Hello world!"
        assert [m.id for m in client.list_models()] == [MODEL]
    monkeypatch.setenv("BATON_API_KEY", "key-one")
    with baton.Client(router.grpc_address, timeout=10) as client:
        assert client.generate("Hi", max_tokens=4).text == "Hello world!"


def test_async_client_sends_its_key(router):
    async def main():
        async with baton.AsyncClient(router.grpc_address, api_key="key-one",
                                     timeout=10) as client:
            assert (await client.generate("Hi", max_tokens=4)).text == "Hello world!"
        async with baton.AsyncClient(router.grpc_address, api_key="nope", max_retries=0,
                                     timeout=10) as client:
            with pytest.raises(baton.AuthenticationError):
                await client.generate("Hi", max_tokens=4)

    asyncio.run(main())


def test_keys_file_and_checks(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# clients\nkey-one\n\n  key-two  \n")
    assert read_keys_file(path) == ["key-one", "key-two"]
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(ValueError, match="holds no API key"):
        read_keys_file(tmp_path / "empty")
    keys = ApiKeys(["key-one"])
    assert keys.check("Bearer key-one") is None and keys.check("bearer key-one") is None
    assert keys.check("Bearer key-two") == "the API key is not valid"
    assert "required" in keys.check(None) and "required" in keys.check("Basic key-one")
    assert ApiKeys().check(None) is None  # no keys configured: open
    with pytest.raises(ValueError, match="api_keys"):
        RouterConfig(model_name="m", model_dir="d", api_keys=("has space",))
    assert "key-one" not in repr(RouterConfig(model_name="m", model_dir="d", api_keys=KEYS))


def test_the_cluster_config_gives_the_router_its_keys(tmp_path):
    from cluster.config import load_config
    from cluster.launcher import Cluster
    from tests.support.models import tiny_model

    path = tmp_path / "keys"
    path.write_text("key-one\n")
    cfg = load_config(None, {"router.api_keys_file": str(path)})
    assert Cluster(cfg, model_dir=str(tiny_model("llama-gqa")))._router_config().api_keys == (
        "key-one",)
    open_cfg = load_config(None, {})
    assert Cluster(open_cfg, model_dir=str(tiny_model("llama-gqa")))._router_config().api_keys == ()
