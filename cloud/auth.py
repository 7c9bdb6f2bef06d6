"""Who may talk to the verifier: TLS server credentials (optionally mutual TLS) and bearer tokens per device.

Tokens file (JSON), made with ``python -m cloud add-token``; only SHA-256 hashes are stored, so the file
does not leak the tokens themselves:

    {"devices": {"jetson-01": {"sha256": "<hex>", "methods": ["Session", "Generate"]}}}

A call without ``authorization: Bearer <token>`` metadata, or with a token that matches no device, is
refused with UNAUTHENTICATED; a known device calling a method it is not allowed is refused with
PERMISSION_DENIED. grpc.health.v1 stays open so that load balancers can probe without a token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

METHODS = ("Session", "Generate")
_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Device:
    name: str
    sha256: str
    methods: frozenset[str]


class TokenStore:
    """The devices allowed in, from a tokens file; raises ValueError naming what is wrong with the file."""

    def __init__(self, devices: list[Device]):
        self.devices = devices

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read tokens file {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
            raise ValueError(f'tokens file {path}: expected {{"devices": {{NAME: {{"sha256": ..., "methods": [...]}}}}}}')
        return cls([_device_from_json(path, name, entry) for name, entry in data["devices"].items()])

    def find(self, token: str) -> Device | None:
        digest = token_hash(token)
        # compare_digest over every entry: the time taken does not reveal how much of a hash matched.
        found = [d for d in self.devices if hmac.compare_digest(d.sha256, digest)]
        return found[0] if found else None


def _device_from_json(path, name: str, entry) -> Device:
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64:
        raise ValueError(f"tokens file {path}: device {name!r} needs a 64-hex-digit 'sha256'")
    methods = entry.get("methods", list(METHODS))
    unknown = set(methods) - set(METHODS) if isinstance(methods, list) else {repr(methods)}
    if unknown:
        raise ValueError(f"tokens file {path}: device {name!r} has unknown methods {sorted(unknown)}; "
                         f"known: {', '.join(METHODS)}")
    return Device(name, entry["sha256"].lower(), frozenset(methods))


def add_token(path: str | Path, device: str, methods: list[str]) -> str:
    """Create (or replace) ``device``'s token in the tokens file; returns the token, which is shown once."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    token = secrets.token_urlsafe(32)
    data["devices"][device] = {"sha256": token_hash(token), "methods": sorted(set(methods))}
    path.write_text(json.dumps(data, indent=2) + "\n")
    path.chmod(0o600)
    return token


def bearer_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only aborts with ``code``."""
    def abort(request, context):
        context.abort(code, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token of every call (but health checks) before any handler runs."""

    def __init__(self, store: TokenStore, on_refusal=None):
        self.store = store
        self.on_refusal = on_refusal or (lambda reason: None)  # metrics hook

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_SERVICES):
            return handler
        token = bearer_token(details.invocation_metadata)
        device = self.store.find(token) if token else None
        if device is None:
            self.on_refusal("unauthenticated")
            what = "no bearer token" if token is None else "an unknown bearer token"
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            f"{what}: send metadata 'authorization: Bearer <token>' with a token made by "
                            "`python -m cloud add-token`")
        method = details.method.rsplit("/", 1)[-1]
        if method not in device.methods and details.method.startswith("/hybrid.v1."):
            self.on_refusal("permission_denied")
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED,
                            f"device {device.name!r} may call {', '.join(sorted(device.methods)) or 'nothing'}, "
                            f"not {method}")
        return handler


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with ``client_ca``, mutual TLS: clients must present a
    certificate signed by that CA."""
    def read(p: str) -> bytes:
        try:
            return Path(p).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {p}: {exc.strerror}") from None

    ca = read(client_ca) if client_ca else None
    return grpc.ssl_server_credentials([(read(key), read(cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)
