"""The router's error type, and how each kind of error reads over HTTP (OpenAI's shape) and gRPC.

Everything that goes wrong with a request becomes a RouterError with a kind; the HTTP layer turns
it into {"error": {"message", "type", "param", "code"}} with the kind's status, the gRPC layer into
the kind's status code. Pure: no grpc or fastapi import here.
"""

from __future__ import annotations

import enum

from engine.request import InvalidRequestError


class ErrorKind(enum.Enum):
    # (HTTP status, OpenAI error type, gRPC status code name)
    INVALID_REQUEST = (400, "invalid_request_error", "INVALID_ARGUMENT")
    UNAUTHENTICATED = (401, "authentication_error", "UNAUTHENTICATED")
    NOT_FOUND = (404, "not_found_error", "NOT_FOUND")
    OVERLOADED = (429, "rate_limit_error", "RESOURCE_EXHAUSTED")
    UNAVAILABLE = (503, "service_unavailable_error", "UNAVAILABLE")
    TIMEOUT = (504, "timeout_error", "DEADLINE_EXCEEDED")
    INTERNAL = (500, "internal_error", "INTERNAL")

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code_name(self) -> str:
        return self.value[2]


RETRY_AFTER_S = 1  # what an overloaded router asks clients to wait


class RouterError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> RouterError:
        return cls(ErrorKind.INVALID_REQUEST, message, param, code)

    @classmethod
    def from_invalid_request(cls, exc: InvalidRequestError) -> RouterError:
        return cls(ErrorKind.INVALID_REQUEST, str(exc), exc.param)

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind.openai_type,
                          "param": self.param, "code": self.code}}

    @property
    def retry_after_s(self) -> int | None:
        """Seconds a client should wait before trying again (Retry-After), for overload only."""
        return RETRY_AFTER_S if self.kind is ErrorKind.OVERLOADED else None

    def grpc_details(self) -> str:
        """The status details: the message, with the parameter named when there is one."""
        if self.param and self.param not in self.message:
            return f"{self.param}: {self.message}"
        return self.message


# Worker status codes (by name) -> what the client sees.
_WORKER_CODES = {
    "INVALID_ARGUMENT": ErrorKind.INVALID_REQUEST,
    "RESOURCE_EXHAUSTED": ErrorKind.OVERLOADED,
    "UNAVAILABLE": ErrorKind.UNAVAILABLE,
    "DEADLINE_EXCEEDED": ErrorKind.TIMEOUT,
}


def from_worker_status(code_name: str, details: str, role: str) -> RouterError:
    """A worker's gRPC failure as the router reports it."""
    kind = _WORKER_CODES.get(code_name, ErrorKind.INTERNAL)
    if kind is ErrorKind.INVALID_REQUEST:
        return RouterError(kind, details or f"the {role} worker refused the request")
    if kind is ErrorKind.OVERLOADED:
        return RouterError(kind, f"the cluster is out of capacity, retry later ({details})",
                           code="no_capacity")
    if kind is ErrorKind.TIMEOUT:
        return RouterError(kind, f"the {role} worker did not answer in time ({details})")
    return RouterError(kind, f"the {role} worker failed: {code_name}: {details}")
