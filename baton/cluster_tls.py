"""Mutual TLS between the cluster's components, optional: router -> workers, prefill -> decode.

From configured files (`tls: {ca_file, cert_file, key_file}` in the cluster config; BATON_TLS_CA,
BATON_TLS_CERT and BATON_TLS_KEY for a worker started on its own): every worker serves its gRPC
port with TLS and requires a client certificate signed by the CA; every internal channel presents
the component's certificate and checks the peer's against the same CA. Health checks go through
the same port, so probes need a certificate too (or use the metrics port).

One certificate may serve every component. Workers are dialed by IP, which certificates rarely
name, so channels check the peer's certificate against `server_name` (default "baton": issue the
certificates with that DNS name in their subjectAltName) instead of the dialed address.

The cluster token (baton/cluster_token.py) still applies on top: TLS says who may connect, the
token which cluster a call belongs to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_VARS = ("BATON_TLS_CA", "BATON_TLS_CERT", "BATON_TLS_KEY")
DEFAULT_SERVER_NAME = "baton"


@dataclass(frozen=True)
class ClusterTLS:
    ca_file: str
    cert_file: str
    key_file: str
    server_name: str = DEFAULT_SERVER_NAME  # the DNS name every component's certificate carries

    def __post_init__(self) -> None:
        if not self.server_name:
            raise ValueError("tls.server_name must not be empty")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if not path or not Path(path).is_file():
                raise ValueError(f"tls.{name} must be a readable PEM file, got {path!r}")

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return tuple(Path(p).read_bytes() for p in (self.ca_file, self.cert_file, self.key_file))

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)]


def from_env() -> ClusterTLS | None:
    """The TLS files named by BATON_TLS_CA/CERT/KEY, all three or none (ValueError otherwise)."""
    values = [os.environ.get(name) or "" for name in ENV_VARS]
    if not any(values):
        return None
    if not all(values):
        raise ValueError(f"set all of {', '.join(ENV_VARS)} or none of them")
    return ClusterTLS(*values)
