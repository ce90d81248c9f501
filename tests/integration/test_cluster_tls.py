"""Mutual TLS between the components (baton/cluster_tls.py): with certificates configured, the
router reaches the workers and the prefill worker pushes KV to the decode worker over TLS; a
plaintext client, a client without a certificate and one whose certificate another CA signed are
all refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import baton
from baton.cluster_tls import ClusterTLS, from_env
from baton.cluster_token import token_channel
from cluster.config import ConfigError, TLSSection
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.tls import make_tls
from tests.support.workers import running_cluster

pytestmark = pytest.mark.integration

TOKEN = "cluster-secret"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    return make_tls(root / "ours"), make_tls(root / "theirs", ca_name="another-ca")


@pytest.fixture(scope="module")
def cluster(certificates):
    ours, _ = certificates
    model_dir = tiny_model("llama-gqa")
    with running_cluster(model_dir, cluster_token=TOKEN, tls=ours) as (router, prefill, decode):
        yield model_dir, router, prefill[0], decode[0]


def health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_the_cluster_serves_over_mutual_tls(cluster):
    model_dir, router, _, decode = cluster
    prompt = [(5 * j) % 200 + 3 for j in range(30)]
    with baton.Client(router.grpc_address, timeout=60) as client:
        result = client.generate(token_ids=prompt, temperature=0, max_tokens=8, ignore_eos=True)
    assert list(result.token_ids) == hf_generate_greedy(model_dir, prompt, 8)
    assert decode.registry.get_sample_value(  # the KV came from the prefill worker, over TLS
        "baton_kv_transfer_bytes_total",
        {"model": "tiny", "role": "decode", "worker": "decode-0"}) > 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_only_clients_with_a_certificate_of_our_ca_get_through(cluster, certificates, role):
    _, _, prefill, decode = cluster
    address = (prefill if role == "prefill" else decode).address
    ours, theirs = certificates
    with token_channel(address, TOKEN, ours) as channel:
        assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    no_client_cert = grpc.ssl_channel_credentials(root_certificates=Path(ours.ca_file).read_bytes())
    refused = [
        grpc.insecure_channel(address),  # plaintext
        token_channel(address, TOKEN, theirs),  # a certificate another CA signed
        grpc.secure_channel(address, no_client_cert, options=ours.channel_options()),
    ]
    for channel in refused:
        with channel, pytest.raises(grpc.RpcError) as info:
            health(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_configuration_errors_name_the_key(tmp_path, certificates, monkeypatch):
    ours, _ = certificates
    with pytest.raises(ConfigError, match="ca_file, cert_file and key_file together"):
        TLSSection(ca_file=ours.ca_file)
    with pytest.raises(ConfigError, match="tls.key_file must be a readable PEM file"):
        TLSSection(ca_file=ours.ca_file, cert_file=ours.cert_file,
                   key_file=str(tmp_path / "missing.pem"))
    assert TLSSection().cluster_tls() is None
    section = TLSSection(ca_file=ours.ca_file, cert_file=ours.cert_file, key_file=ours.key_file)
    assert section.cluster_tls() == ClusterTLS(ours.ca_file, ours.cert_file, ours.key_file)
    monkeypatch.setenv("BATON_TLS_CA", ours.ca_file)
    with pytest.raises(ValueError, match="set all of BATON_TLS_CA"):
        from_env()
    monkeypatch.setenv("BATON_TLS_CERT", ours.cert_file)
    monkeypatch.setenv("BATON_TLS_KEY", ours.key_file)
    assert from_env() == ClusterTLS(ours.ca_file, ours.cert_file, ours.key_file)
