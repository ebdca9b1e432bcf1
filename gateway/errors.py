"""Errors at the HTTP edge, always in the OpenAI envelope: {"error": {message, type, param, code}}.

    GatewayError(status, message)          any error the gateway answers itself
     ├── BadRequest        400  invalid_request_error
     ├── Unauthorized      401  authentication_error
     ├── Forbidden         403  permission_error
     ├── ModelNotFound     404  model_not_found
     ├── RouteNotFound     404  invalid_request_error (an unknown URL, worded as OpenAI words it)
     ├── MethodNotAllowed  405  invalid_request_error (with Allow)
     ├── RequestTimeout    408  invalid_request_error (a request head or body not received in time)
     ├── PayloadTooLarge   413  invalid_request_error
     ├── UriTooLong        414  invalid_request_error
     ├── HeadersTooLarge   431  invalid_request_error
     ├── RateLimited       429  type "requests" | "tokens", code rate_limit_exceeded (with Retry-After),
     │                         as OpenAI answers a key over its RPM / TPM
     ├── NoCapacity        503  service_unavailable (no READY instance can take it; with Retry-After)
     ├── ServerBusy        503  service_unavailable (an edge budget is spent: connections, body bytes;
     │                         with Retry-After)
     ├── UpstreamFailed    502  upstream_error (every attempt failed before the first byte)
     └── UpstreamTimeout   504  upstream_timeout
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An error the gateway answers itself, with the OpenAI envelope."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> bytes:
    """The OpenAI error envelope as JSON bytes."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


_ENVELOPE_KEYS = frozenset(("message", "type", "param", "code"))
MAX_ENGINE_MESSAGE = 2000   # characters of an engine's own error text kept when it is re-wrapped


def as_envelope(status: int, body: bytes) -> bytes | None:
    """An engine's error answer in the OpenAI envelope; None when it is one already.

    vLLM and SGLang answer in the envelope; other servers (a crashed handler's text/plain page,
    an older flat ``{"object": "error", "message": ...}``) do not, and a client must still get
    one shape for every error. The engine's message, type, param and code are kept.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict) and inner.keys() == _ENVELOPE_KEYS:
            return None
        source = inner if isinstance(inner, dict) else payload
        message = source.get("message")
        text = message if isinstance(message, str) else (inner if isinstance(inner, str) else body.decode(
            "utf-8", "replace"))
        kind, param, code = source.get("type"), source.get("param"), source.get("code")
        return error_body(text[:MAX_ENGINE_MESSAGE], kind if isinstance(kind, str) else "upstream_error",
                          param if isinstance(param, str) else None,
                          code if isinstance(code, (str, int)) and not isinstance(code, bool) else None)
    text = body.decode("utf-8", "replace").strip()
    return error_body(f"the engine answered {status}: {text[:MAX_ENGINE_MESSAGE]}", "upstream_error")


class BadRequest(GatewayError):
    status, type = 400, "invalid_request_error"


class Unauthorized(GatewayError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RouteNotFound(GatewayError):
    status, type = 404, "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status, type = 405, "invalid_request_error"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UriTooLong(GatewayError):
    status, type, code = 414, "invalid_request_error", "uri_too_long"


class HeadersTooLarge(GatewayError):
    status, type, code = 431, "invalid_request_error", "headers_too_large"


class RateLimited(GatewayError):
    status, type, code = 429, "requests", "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests", retry_after_s: int = 1,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "Retry-After": str(retry_after_s)})
        self.type = kind   # OpenAI's error.type names the limit: "requests" or "tokens"
        self.retry_after_s = retry_after_s


class NoCapacity(GatewayError):
    status, type, code = 503, "service_unavailable", "no_capacity"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None,
                 retry_after_s: int = 1) -> None:
        # a 503 is temporary by definition here: say when to come back
        super().__init__(message, param=param, headers={"Retry-After": str(retry_after_s), **(headers or {})})


class ServerBusy(GatewayError):
    """The gateway is at one of its edge budgets; the client should come back shortly."""

    status, type, code = 503, "service_unavailable", "server_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class UpstreamFailed(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_failed"


class UpstreamTimeout(GatewayError):
    status, type, code = 504, "upstream_error", "upstream_timeout"
