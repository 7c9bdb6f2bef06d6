"""Record one real trace per policy from the demo pair: the simulator's inputs.

The real ONNX edge (``edge/hybrid.py``) runs held-out demo problems against a real verifier subprocess on
loopback, under every configuration of the policy table (``eval/policies.py``; same code, same calibration
rule): slm-only, llm-only, hlm, u-hlm, cu-hlm, default and default-pipelined (the default policy drafting
``lookahead`` tokens past the oldest unresolved Verify: a protocol-v2 pipelined trace, with its rolled-back
drafts), plus the default estimator at extra thresholds (``default@U``) for threshold sweeps; with
``coarse`` also the span and step modes (route ``coarse``, ``edge/coarse.py``: traces of mode coarse, span,
step and block round trips). Each generation is followed by a ``task`` line (exact answer). The testbed's edge (``edge_run.py --lookahead N``)
records pipelined traces of any policy over a shaped link.

Cloud-only (llm-only) is the verifier's own ``Generate`` stream; its trace times every chunk at the
client (``chunk_s``: since the request for the first chunk, since the previous chunk after that), i.e.
the verifier's per-token time as seen over loopback. These are the cloud-only service times the
simulator fits (``simulate/compute.py``).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from eval.policies import COARSE, GENERATE, POLICIES, Policy, on_slm

DEFAULT_OUT = Path("reports/sim/traces")


def record_stream(channel, model, problem, settings, seed: int, out) -> bool:
    """Cloud-only: GenerateRequest up, chunks down, each chunk timed at the client; returns correctness."""
    from models.task import MAX_SOLUTION_TOKENS, is_correct
    from proto import hybrid_pb2 as pb
    from proto import hybrid_pb2_grpc as pb_grpc
    from proto import trace as tr
    from proto.messages import fingerprint_to_msg, sampling_to_msg, wire_size

    prompt = model.encode(problem.prompt)
    request = pb.GenerateRequest(fingerprint=fingerprint_to_msg(model.manifest.fingerprint),
                                 sampling=sampling_to_msg(settings), prompt_ids=prompt,
                                 max_new_tokens=MAX_SOLUTION_TOKENS, stop_ids=sorted(model.eos_ids), seed=seed)
    rows, tokens, down = [], [], 0
    t0 = t_prev = time.perf_counter()
    for chunk in pb_grpc.VerifierStub(channel).Generate(request, timeout=120):
        now = time.perf_counter()
        for token in chunk.token_ids:
            rows.append((len(prompt) + len(tokens), token, now - t_prev, wire_size(chunk)))
            tokens.append(token)
            t_prev = now
        down += wire_size(chunk)
    text = model.decode(tokens)
    tr.write_open(out, len(prompt), "llm-only", None, None, settings.temperature, True, wire_size(request), 0,
                  mode="stream")
    for row in rows:
        tr.write_stream_token(out, *row)
    tr.write_close(out, len(tokens), wire_size(request), down, t_prev - t0, text)
    correct = is_correct(problem, text)
    tr.write_task(out, correct)
    return correct


def policies_to_record(names: tuple[str, ...], extra_thresholds: list[float], coarse: bool = False) -> list[Policy]:
    """The named policies of the table (the span and step modes only with ``coarse``), plus ``default`` at each
    extra threshold (``default@U``)."""
    chosen = [p for n, p in on_slm("demo").items() if n in names and (coarse or p.route != COARSE)]
    if "default" in names:
        chosen += [POLICIES["default"].at(th) for th in extra_thresholds]
    return chosen


def record_policy(runner, policy: Policy, threshold: float, problems, path: Path) -> float:
    """One policy's trace file; returns its accuracy."""
    with path.open("w") as out:
        if policy.route == GENERATE:
            ok = [record_stream(runner.channel, runner.model, p, runner.settings, runner.seed + i, out)
                  for i, p in enumerate(tqdm(problems, desc=policy.name, unit="problem", leave=False))]
            return sum(ok) / len(ok)
        if policy.route == COARSE:  # the span/step loop writes its own lines (mode coarse)
            from eval.taskeval import summarize

            return summarize(policy.name, runner.coarse(policy, problems, threshold, trace=out))["accuracy"]
        row = runner.policy(policy, problems, threshold, trace=out)
    return row["accuracy"]


def record_all(out: Path, problems: int, calibration_problems: int, seed: int, temperature: float,
               extra_thresholds: list[float], policies: tuple[str, ...] = tuple(POLICIES),
               model_dir: Path | None = None, coarse: bool = False) -> dict:
    """Record every policy's trace into ``out``; returns the manifest (also written as manifest.json)."""
    from core.process import VerifierProcess
    from core.sampling import SamplingSettings
    from edge.client import connect
    from edge.model import EdgeModel
    from eval.pair import LLM_DIR, calibrate, ensure_export
    from eval.taskeval import Runner
    from models.task import held_out_problems

    out.mkdir(parents=True, exist_ok=True)
    model = EdgeModel(model_dir or ensure_export(), providers="cpu")
    settings = SamplingSettings(temperature=temperature)
    tasks = held_out_problems(problems)
    manifest = {"problems": problems, "seed": seed, "temperature": temperature, "policies": {},
                "command": shlex.join(["python", "-m", "simulate", *sys.argv[1:]])}
    chosen = policies_to_record(policies, extra_thresholds, coarse)
    with VerifierProcess(str(LLM_DIR)) as verifier:
        channel = connect(verifier.address)
        runner = Runner(model, channel, settings, seed)
        cal = calibrate(runner, calibration_problems)
        manifest["thresholds"] = {f"{p.estimator}_{p.threshold}": p.threshold_from(cal)
                                  for p in POLICIES.values() if p.calibrated}
        for policy in tqdm(chosen, desc="policies", unit="policy"):
            path = out / f"{policy.name}.jsonl"
            threshold = policy.threshold_from(cal)
            accuracy = record_policy(runner, policy, threshold, tasks, path)
            shown = None if policy.route == GENERATE else threshold
            manifest["policies"][policy.name] = {
                "file": str(path), "accuracy": accuracy, "exact": policy.exact,
                "threshold": str(shown) if shown is not None and not math.isfinite(shown) else shown}
        channel.close()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
