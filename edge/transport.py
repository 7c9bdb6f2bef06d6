"""How the edge reaches a verifier: plaintext (loopback, or explicitly allowed), TLS, mutual TLS, and a
bearer token sent as ``authorization`` metadata on every call.

The plaintext rule is ``proto.addresses.check_plaintext_allowed``, the same one the verifier applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from core.cli import split_host_port
from proto.addresses import check_plaintext_allowed

MAX_RECEIVE_BYTES = 1 << 20


@dataclass(frozen=True)
class Transport:
    tls_ca: str | None = None  # PEM roots to trust (a private CA); implies TLS
    tls_cert: str | None = None  # PEM client certificate (mutual TLS), with tls_key
    tls_key: str | None = None
    tls: bool = False  # TLS with the system's roots
    token: str | None = None  # bearer token of this device
    insecure: bool = False  # allow plaintext to a non-loopback address

    def __post_init__(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate and its key go together (--tls-cert and --tls-key)")

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca), private_key=_read(self.tls_key),
                                            certificate_chain=_read(self.tls_cert))

    def channel(self, address: str) -> grpc.Channel:
        """A (lazy) channel to ``address``; ValueError when this transport may not be used there."""
        host, _ = split_host_port(address)
        options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]
        if self.secure:
            channel = grpc.secure_channel(address, self.credentials(), options=options)
        else:
            check_plaintext_allowed(host, self.insecure, "edge")
            channel = grpc.insecure_channel(address, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _BearerToken(self.token))
        return channel


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)
