"""Record one real trace per policy from the demo pair: the simulator's inputs.

The real ONNX edge (``edge/hybrid.py``) runs held-out demo problems against a real verifier subprocess on
loopback, under the six configurations ``make demo`` compares (same code, same calibration rule):
slm-only, llm-only, hlm, u-hlm, cu-hlm and default, plus the default estimator at extra thresholds
(``default@U``) for threshold sweeps. Each generation is followed by a ``task`` line (exact answer).

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
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

DEFAULT_OUT = Path("reports/sim/traces")
POLICIES = ("slm-only", "llm-only", "hlm", "u-hlm", "cu-hlm", "default")


def record_stream(channel, model, problem, settings, seed: int, out) -> bool:
    """Cloud-only: GenerateRequest up, chunks down, each chunk timed at the client; returns correctness."""
    from models.task import MAX_SOLUTION_TOKENS, is_correct
    from proto import hybrid_pb2 as pb
    from proto import hybrid_pb2_grpc as pb_grpc
    from proto.messages import sampling_to_msg, wire_size

    prompt = model.encode(problem.prompt)
    request = pb.GenerateRequest(fingerprint=pb.Fingerprint(**model.manifest.fingerprint),
                                 sampling=sampling_to_msg(settings), prompt_ids=prompt,
                                 max_new_tokens=MAX_SOLUTION_TOKENS, stop_ids=sorted(model.eos_ids), seed=seed)
    rows, tokens, down = [], [], 0
    t0 = t_prev = time.perf_counter()
    for chunk in pb_grpc.VerifierStub(channel).Generate(request, timeout=120):
        now = time.perf_counter()
        for token in chunk.token_ids:
            rows.append({"kind": "token", "position": len(prompt) + len(tokens), "token": token,
                         "chunk_s": now - t_prev, "down_bytes": wire_size(chunk)})
            tokens.append(token)
            t_prev = now
        down += wire_size(chunk)
    text = model.decode(tokens)
    head = {"kind": "open", "mode": "stream", "prompt_tokens": len(prompt), "estimator": "llm-only", "codec": None,
            "threshold": None, "temperature": settings.temperature, "verifier": True,
            "uplink_bytes": wire_size(request), "downlink_bytes": 0}
    tail = {"kind": "close", "tokens": len(tokens), "uplink_bytes": wire_size(request), "downlink_bytes": down,
            "seconds": t_prev - t0, "text": text}
    correct = is_correct(problem, text)
    for row in [head, *rows, tail, {"kind": "task", "correct": correct}]:
        out.write(json.dumps(row) + "\n")
    return correct


def policy_configs(settings, u_hlm_th: float, default_th: float, extra: list[float]) -> dict:
    """name -> (HybridConfig, talks to the verifier); the demo's six, plus default at ``extra`` thresholds."""
    from edge.hybrid import HybridConfig
    from edge.uncertainty import DEFAULT_ESTIMATOR
    from models.task import MAX_SOLUTION_TOKENS
    from proto.codec import CodecSpec

    base = HybridConfig(settings=settings, max_new_tokens=MAX_SOLUTION_TOKENS)
    out = {
        "slm-only": (replace(base, threshold=math.inf, codec=CodecSpec("full32")), False),
        "hlm": (replace(base, threshold=-math.inf, codec=CodecSpec("full32")), True),
        "u-hlm": (replace(base, threshold=u_hlm_th, estimator="uhlm", codec=CodecSpec("full32")), True),
        "cu-hlm": (replace(base, threshold=u_hlm_th, estimator="uhlm", codec=CodecSpec("topk")), True),
        "default": (replace(base, threshold=default_th, estimator=DEFAULT_ESTIMATOR, codec=CodecSpec("adaptive")),
                    True),
    }
    for th in extra:
        out[f"default@{th:g}"] = (replace(out["default"][0], threshold=th), True)
    return out


def record_hybrid(runner, config, verify: bool, problems, path: Path, desc: str) -> float:
    from edge.hybrid import generate_hybrid
    from models.task import is_correct

    correct = 0
    with path.open("w") as out:
        for i, problem in enumerate(tqdm(problems, desc=desc, unit="problem", leave=False)):
            seed = runner.seed + i
            opener = runner.session_opener(config, seed) if verify else None
            result = generate_hybrid(runner.model, runner.model.encode(problem.prompt), config, seed=seed,
                                     open_session=opener, trace=out)
            ok = is_correct(problem, result.text)
            correct += ok
            out.write(json.dumps({"kind": "task", "correct": ok}) + "\n")
    return correct / len(problems)


def record_all(out: Path, problems: int, calibration_problems: int, seed: int, temperature: float,
               extra_thresholds: list[float], policies: tuple[str, ...] = POLICIES, model_dir: Path | None = None) -> dict:
    """Record every policy's trace into ``out``; returns the manifest (also written as manifest.json)."""
    from cloud.launch import VerifierProcess
    from demo.__main__ import BUILD, calibrate, ensure_export
    from edge.client import connect
    from edge.model import EdgeModel
    from edge.sampling import SamplingSettings
    from edge.taskeval import Runner
    from edge.uncertainty import DEFAULT_ESTIMATOR
    from models.demo_pair import COMMITTED_PAIR
    from models.task import held_out_problems

    out.mkdir(parents=True, exist_ok=True)
    model = EdgeModel(model_dir or ensure_export(COMMITTED_PAIR / "slm", BUILD / "slm-onnx"), providers="cpu")
    settings = SamplingSettings(temperature=temperature)
    tasks = held_out_problems(problems)
    manifest = {"problems": problems, "seed": seed, "temperature": temperature, "policies": {},
                "command": shlex.join(["python", "-m", "simulate", *sys.argv[1:]])}
    with VerifierProcess(str(COMMITTED_PAIR / "llm")) as verifier:
        channel = connect(verifier.address)
        runner = Runner(model, channel, settings, seed)
        cal = calibrate(runner, calibration_problems)
        manifest["thresholds"] = {"uhlm_averse": cal["uhlm"]["averse"],
                                  f"{DEFAULT_ESTIMATOR}_empirical": cal[DEFAULT_ESTIMATOR]["empirical"]}
        configs = policy_configs(settings, cal["uhlm"]["averse"], cal[DEFAULT_ESTIMATOR]["empirical"],
                                 extra_thresholds)
        wanted = [p for p in configs if p in policies or p.split("@")[0] in policies]
        for name in tqdm(["llm-only", *wanted] if "llm-only" in policies else wanted, desc="policies", unit="policy"):
            path = out / f"{name}.jsonl"
            if name == "llm-only":
                with path.open("w") as f:
                    ok = [record_stream(channel, model, p, settings, seed + i, f)
                          for i, p in enumerate(tqdm(tasks, desc=name, unit="problem", leave=False))]
                accuracy = sum(ok) / len(ok)
            else:
                config, verify = configs[name]
                accuracy = record_hybrid(runner, config, verify, tasks, path, name)
            threshold = None if name == "llm-only" else float(configs[name][0].threshold)
            manifest["policies"][name] = {"file": str(path), "accuracy": accuracy,
                                          "threshold": str(threshold) if threshold is not None and
                                          not math.isfinite(threshold) else threshold}
        channel.close()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
