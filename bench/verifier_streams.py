"""Recorded Verify streams for the verifier section (``bench/verifier.py``): what the real edge sent.

The real edge (``edge.hybrid.generate_hybrid``, the ``default`` policy of ``eval/policies.py`` at
``edge.hybrid.DEFAULT_THRESHOLD``, stop-and-wait, T = 1) runs held-out task problems (problem i with seed i)
against a verifier; a ``VerifierSession`` subclass keeps every EdgeMessage it sends (Open, the Verifies,
Close) as wire bytes, and every Verdict it takes. Generations that sent no Verify are dropped (they never
reach the verifier's model). The streams are saved as JSON (message bytes base64) under
``reports/bench_cache/verifier_streams/`` and reused while the key (the edge and verifier models'
weights, the policy, threshold, problems) is the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from edge.client import VerifierSession
from proto import hybrid_pb2 as pb

CACHE = Path("reports/bench_cache/verifier_streams")
POLICY = "default"
TEMPERATURE = 1.0
FORMAT = 1  # bump when the file layout changes


@dataclass(frozen=True)
class Stream:
    """One recorded generation: its messages as sent, and what each Verify decided."""

    problem: int
    open: bytes  # EdgeMessage{open}
    verifies: list[bytes]  # EdgeMessage{verify}, in order
    close: bytes  # EdgeMessage{close}
    verdicts: list[tuple]  # per Verify: (accepted, token_id, accepted_count, stale, epoch)
    tokens: list[int]  # per Verify: tokens it committed (pending ids + decided drafts; 0 when stale)


def verdict_key(v) -> tuple:
    """What a Verdict decided, comparable between a pb.Verdict and the client's VerdictResult."""
    if isinstance(v, pb.Verdict):
        return (bool(v.accepted), int(v.token_id), int(v.accepted_count), bool(v.stale), int(v.epoch))
    return (bool(v.accepted), int(v.token), int(v.accepted_count), bool(v.stale), int(v.epoch))


def committed_tokens(verify: pb.Verify, key: tuple) -> int:
    """Tokens a Verify made final on the verifier: its pending ids, the accepted drafts and the resample."""
    accepted, _, accepted_count, stale, _ = key
    return 0 if stale else len(verify.pending_ids) + accepted_count + (not accepted)


class RecordingSession(VerifierSession):
    """A VerifierSession that keeps what it sends (``_send`` is where every EdgeMessage goes out) and the
    Verdicts it hands to the loop."""

    def __init__(self, *args, **kwargs):
        self.sent: list[bytes] = []
        self.verdicts: list[tuple] = []
        super().__init__(*args, **kwargs)

    def _send(self, msg: pb.EdgeMessage) -> int:
        self.sent.append(msg.SerializeToString())
        return super()._send(msg)

    def next_verdict(self, wait: bool = True):
        verdict = super().next_verdict(wait)
        if verdict is not None:
            self.verdicts.append(verdict_key(verdict))
        return verdict


def to_stream(problem: int, session: RecordingSession) -> Stream | None:
    """The session's stream, or None when it sent no Verify."""
    msgs = [pb.EdgeMessage.FromString(b) for b in session.sent]
    kinds = [m.WhichOneof("kind") for m in msgs]
    verifies = [b for b, k in zip(session.sent, kinds) if k == "verify"]
    if not verifies:
        return None
    if any(m.verify.HasField("span") or m.verify.HasField("step") for m in msgs if m.HasField("verify")):
        raise RuntimeError(f"problem {problem}: a Verify with a span or step; the replay counts blocks only")
    if kinds[0] != "open" or kinds[-1] != "close" or len(verifies) != len(session.verdicts):
        raise RuntimeError(f"problem {problem}: unexpected stream {kinds}, {len(session.verdicts)} verdicts")
    tokens = [committed_tokens(m.verify, key) for m, key in
              zip((m for m, k in zip(msgs, kinds) if k == "verify"), session.verdicts)]
    return Stream(problem, session.sent[0], verifies, session.sent[-1], list(session.verdicts), tokens)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def cache_key(model: Path, llm: Path, problems: int, threshold: float) -> str:
    """Changes whenever a recorded stream could: either model's weights, the policy, threshold, problems."""
    parts = {"format": FORMAT, "policy": POLICY, "threshold": threshold, "temperature": TEMPERATURE,
             "problems": problems, "edge": _file_digest(Path(model) / "manifest.json"),
             "llm": _file_digest(Path(llm) / "model.safetensors")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def record(address: str, model: Path, problems: int, threshold: float, threads: int = 1,
           progress: bool = True) -> list[Stream]:
    """Run ``problems`` held-out problems through the real edge against the verifier at ``address``."""
    from core.sampling import SamplingSettings
    from edge.client import connect
    from edge.hybrid import generate_hybrid
    from edge.model import EdgeModel
    from eval.policies import POLICIES
    from models.task import held_out_problems

    edge = EdgeModel(model, providers="cpu", threads=threads)
    config = POLICIES[POLICY].config(SamplingSettings(temperature=TEMPERATURE), threshold)
    channel = connect(address, timeout=30)
    streams = []
    try:
        for i, problem in enumerate(tqdm(held_out_problems(problems), desc="recording Verify streams",
                                         unit="problem", leave=False, disable=not progress)):
            sessions: list[RecordingSession] = []

            def open_session(prompt_ids, settings, codec, seed=i):
                sessions.append(RecordingSession(channel, edge.manifest.fingerprint, prompt_ids, settings,
                                                 codec, seed=seed, timeout=120))
                return sessions[-1]

            generate_hybrid(edge, edge.encode(problem.prompt), config, seed=i, open_session=open_session)
            stream = to_stream(i, sessions[0])
            if stream is not None:
                streams.append(stream)
    finally:
        channel.close()
    return streams


def save(path: Path, key: str, streams: list[Stream]) -> None:
    def enc(b: bytes) -> str:
        return base64.b64encode(b).decode()

    rows = [{**asdict(s), "open": enc(s.open), "close": enc(s.close),
             "verifies": [enc(v) for v in s.verifies]} for s in streams]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "streams": rows}))
    tmp.replace(path)


def load(path: Path, key: str) -> list[Stream] | None:
    """The cached streams, or None when there are none for ``key``."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != key:
        return None
    dec = base64.b64decode
    return [Stream(r["problem"], dec(r["open"]), [dec(v) for v in r["verifies"]], dec(r["close"]),
                   [tuple(v) for v in r["verdicts"]], r["tokens"]) for r in data["streams"]]
