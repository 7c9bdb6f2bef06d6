"""Load: 32 concurrent sessions × 200 verified tokens against one (batched) verifier. All finish, every verdict
is well-formed, their forwards were batched, and afterwards the verifier holds no session and no KV cache and
its memory is back near the baseline."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.process import VerifierProcess
from edge.client import VerifierSession, connect
from core.sampling import SamplingSettings, softmax
from proto.distribution import CodecSpec, compress
from proto.payload import encode
from tests.conftest import DEMO_PAIR
from tests.verifier_clients import metric

pytestmark = pytest.mark.load
SESSIONS, TOKENS, V = 32, 200, 32000
CODEC = CodecSpec("adaptive")
MEMORY_MARGIN_MB = 64


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_session(channel, fingerprint, seed: int, out: dict) -> None:
    rng = np.random.default_rng(seed)
    p_tilde = compress(softmax(rng.normal(size=V) * 4), CODEC)  # one edge distribution, reused
    payload = encode(p_tilde, CODEC, V)
    session = VerifierSession(channel, fingerprint, [5, 6, 7, 8], SamplingSettings(temperature=1.0), CODEC,
                              seed=seed, timeout=120)
    tokens = []
    for _ in range(TOKENS):
        draft = p_tilde.sample(rng)
        tokens.append(session.verify([], draft, payload).token)
    session.close()
    out[seed] = tokens


def run_sessions(address: str, fingerprint: dict, n: int) -> dict:
    channel = connect(address)
    out: dict = {}
    threads = [threading.Thread(target=one_session, args=(channel, fingerprint, s, out), daemon=True)
               for s in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)  # a bound, not a timing assertion: a stuck session fails the test instead of hanging it
    channel.close()
    return out


def test_32_concurrent_sessions_of_200_tokens(slm_onnx):
    from edge.manifest import load_manifest

    fingerprint = load_manifest(slm_onnx).fingerprint
    with VerifierProcess(str(DEMO_PAIR / "llm"), extra_args=("--metrics-port", "0")) as verifier:
        run_sessions(verifier.address, fingerprint, 2)  # warm up: first-call allocations are not a leak
        time.sleep(0.5)
        baseline = rss_mb(verifier.proc.pid)
        t0 = time.perf_counter()
        out = run_sessions(verifier.address, fingerprint, SESSIONS)
        seconds = time.perf_counter() - t0
        assert len(out) == SESSIONS and all(len(t) == TOKENS and all(0 <= x < V for x in t) for t in out.values())
        url = verifier.metrics_url
        for _ in range(50):  # sessions end asynchronously after Close; bounded wait
            if metric(url, "verifier_sessions") == 0:
                break
            time.sleep(0.1)
        assert metric(url, "verifier_sessions") == 0
        assert metric(url, "verifier_verifies_total") == (SESSIONS + 2) * TOKENS
        # The batched engine ran: more session forwards than model forwards, and no cache outlives its session.
        assert metric(url, "verifier_forward_rows_total") > metric(url, "verifier_forwards_total")
        assert metric(url, "verifier_kv_bytes") == 0
        after = rss_mb(verifier.proc.pid)
    print(f"\nload: {SESSIONS} sessions x {TOKENS} tokens in {seconds:.1f} s "
          f"({SESSIONS * TOKENS / seconds:.0f} verifies/s); verifier RSS {baseline:.0f} MB -> {after:.0f} MB")
    assert after - baseline < MEMORY_MARGIN_MB
