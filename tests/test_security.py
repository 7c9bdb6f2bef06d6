"""Transport security: TLS with mutual client certificates and per-device bearer tokens. Clients without
the right certificate, or without a valid token, are refused with the right status; with them, a
generation works end to end. Plaintext off loopback needs an explicit --insecure."""

from __future__ import annotations

import datetime
import ipaddress
import json

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud.auth import add_token
from core.process import VerifierProcess
from edge.client import VerifierError, connect
from edge.hybrid import generate_hybrid
from edge.model import EdgeModel
from edge.resilient import Failover, ResilientSession
from edge.transport import Transport
from tests.conftest import DEMO_PAIR, run_module
from tests.verifier_clients import GOOD_CONFIG, PROMPT, is_serving, raw_session

pytestmark = pytest.mark.security


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder, name: str, cert, key) -> tuple[str, str]:
    c, k = folder / f"{name}.crt", folder / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate it signed, and a rogue CA's client."""
    folder = tmp_path_factory.mktemp("pki")
    keys = {n: ec.generate_private_key(ec.SECP256R1()) for n in ("ca", "server", "client", "rogue", "mallory")}
    ca = _cert("test CA", keys["ca"], "test CA", keys["ca"], ca=True)
    files = {"ca": _write(folder, "ca", ca, keys["ca"])[0]}
    files["server"] = _write(folder, "server", _cert("verifier", keys["server"], "test CA", keys["ca"], False, True),
                             keys["server"])
    files["client"] = _write(folder, "client", _cert("jetson-01", keys["client"], "test CA", keys["ca"], False),
                             keys["client"])
    files["mallory"] = _write(folder, "mallory", _cert("mallory", keys["mallory"], "rogue CA", keys["rogue"], False),
                              keys["mallory"])
    tokens = folder / "tokens.json"
    files["token"] = add_token(tokens, "jetson-01", ["Session", "Generate"])
    files["generate_only"] = add_token(tokens, "dashboard", ["Generate"])
    files["tokens"] = str(tokens)
    return files


@pytest.fixture(scope="module")
def verifier(pki):
    args = ("--tls-cert", pki["server"][0], "--tls-key", pki["server"][1], "--tls-client-ca", pki["ca"],
            "--tokens", pki["tokens"])
    with VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def model(slm_onnx):
    return EdgeModel(slm_onnx, providers="cpu")


def _session_status(verifier, transport: Transport, model) -> grpc.StatusCode:
    """Status of a minimal Open over ``transport`` (OK when the session opened)."""
    from proto import hybrid_pb2 as pb
    from proto.messages import codec_to_msg, fingerprint_to_msg

    channel = transport.channel(verifier.address)
    open_msg = pb.EdgeMessage(open=pb.Open(fingerprint=fingerprint_to_msg(model.manifest.fingerprint),
                                           sampling=pb.Sampling(temperature=1), prompt_ids=[5, 6],
                                           codec=codec_to_msg(GOOD_CONFIG.codec)))
    code, details, _ = raw_session(channel, [open_msg], timeout=10)
    channel.close()
    return code, details


def test_tokens_file_keeps_only_hashes(pki):
    text = open(pki["tokens"]).read()
    assert pki["token"] not in text and len(json.loads(text)["devices"]) == 2


def test_plaintext_client_is_refused(verifier, model):
    code, _ = _session_status(verifier, Transport(token="x"), model)
    assert code == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_certificate_is_refused(verifier, model, pki):
    code, _ = _session_status(verifier, Transport(tls=True, tls_cert=pki["client"][0], tls_key=pki["client"][1]),
                              model)
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", [None, "mallory"], ids=["no client certificate", "certificate of a rogue CA"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(verifier, model, pki, client):
    cert = pki[client] if client else (None, None)
    code, _ = _session_status(verifier, Transport(tls_ca=pki["ca"], tls_cert=cert[0], tls_key=cert[1],
                                                  token=pki["token"]), model)
    assert code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "not-a-token"], ids=["no token", "unknown token"])
def test_missing_or_unknown_token_is_unauthenticated(verifier, model, pki, token):
    code, details = _session_status(verifier, Transport(tls_ca=pki["ca"], tls_cert=pki["client"][0],
                                                        tls_key=pki["client"][1], token=token), model)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details


def test_device_without_the_method_is_permission_denied(verifier, model, pki):
    code, details = _session_status(verifier, Transport(tls_ca=pki["ca"], tls_cert=pki["client"][0],
                                                        tls_key=pki["client"][1], token=pki["generate_only"]), model)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "dashboard" in details


def test_with_certificate_and_token_a_generation_works(verifier, model, pki):
    transport = Transport(tls_ca=pki["ca"], tls_cert=pki["client"][0], tls_key=pki["client"][1], token=pki["token"])
    channel = connect(verifier.address, transport=Transport(tls_ca=pki["ca"], tls_cert=pki["client"][0],
                                                            tls_key=pki["client"][1]))
    assert is_serving(channel)  # health stays open to probes without a token
    channel.close()

    def open_session(prompt_ids, settings, codec):
        return ResilientSession(Failover((verifier.address,)), model.manifest.fingerprint, prompt_ids,
                                settings, codec, seed=3, transport=transport)

    result = generate_hybrid(model, model.encode(PROMPT), GOOD_CONFIG, seed=3, open_session=open_session)
    assert result.sent > 0 and len(result.token_ids) > 5


def test_plaintext_off_loopback_needs_explicit_insecure(model):
    with pytest.raises(VerifierError, match="--insecure"):
        connect("10.255.255.1:50051", timeout=1)
    proc = run_module("cloud", "serve", "--model", str(DEMO_PAIR / "llm"), "--host", "0.0.0.0", "--port", "0")
    assert proc.returncode == 2 and "--insecure" in proc.stderr and "Traceback" not in proc.stderr
