"""Edge decode benchmark: ONNX Runtime edge loop vs PyTorch eager ``generate``, same weights, same CPU threads.

Models: the demo SLM and a ~50M-parameter Llama built locally from a config with random weights (hidden
512, 8 layers, 32k vocabulary: the size class where per-token edge costs look like a real small model's).
Each is exported to ONNX fp32 and int8 with ``models.export.export_model``; PyTorch runs fp32 eager.

How a decode step is timed, identically on both sides: a step is one forward pass of one new token
through the KV cache plus choosing the next token. Prefill is excluded.
- PyTorch: ``generate`` has no per-step hook, so time-per-step = (t(N new tokens) - t(1 new token)) /
  (N - 1). ``generate(max_new_tokens=1)`` is prefill + first argmax + generate's own setup, so the
  difference is exactly N - 1 cached decode steps.
- ONNX: ``GenerationResult.decode_seconds`` (prefill excluded) covers the same N - 1 forward passes,
  plus N token choices (one more than PyTorch's difference holds). Dividing it by N - 1 charges that
  extra argmax to ONNX, so the comparison errs against the edge, never for it.
The edge loop's time is further split into ORT forward (``forward_seconds``) and everything else in the
loop (``loop_overhead``). Repeats are interleaved (onnx fp32, onnx int8, torch, onnx fp32, ...) so that a
load change on the machine hits all variants alike; every number reported is a median over repeats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SLM_DIR = Path("models/demo_pair/slm")
DEFAULT_CACHE_DIR = Path("reports/bench_cache")
DEFAULT_OUT = Path("reports/bench.json")
PROMPT = "Q:7+5-3+8 A:"  # a fixed demo-task prompt: both runtimes decode after the same ids
DTYPES = ("fp32", "int8")
HEADLINE = ("llama-50m", "fp32")  # the (model, dtype) row behind edge.onnx_tok_s & co.
GOAL_SPEEDUP = 2.5
GOAL_LOOP_OVERHEAD = 0.10
STAMP_NAME = "bench_stamp.json"


@dataclass
class BenchModel:
    """One model under test: its transformers folder (PyTorch side) and one ONNX export per dtype."""

    name: str
    hf_dir: Path
    onnx_dirs: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # dtype -> why there is no export to time


# ---------------------------------------------------------------- building and caching the models


def llama_50m_config(tokenizer_source: str | Path):
    """The ~50M random Llama of the issue (about 42M parameters, 16M of them the tied 32k embedding)."""
    return small_llama_config(tokenizer_source, hidden=512, layers=8, heads=8, intermediate=1376)


def small_llama_config(tokenizer_source: str | Path, hidden: int, layers: int, heads: int, intermediate: int):
    """A LlamaConfig with the demo tokenizer's vocabulary and special ids (so EOS/pad mean the same)."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_source))
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _read_stamp(folder: Path) -> dict | None:
    path = folder / STAMP_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _write_stamp(folder: Path, stamp: dict) -> None:
    (folder / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _files_digest(folder: Path, names: tuple[str, ...]) -> str:
    """sha256 of the named files: a retrained demo SLM must invalidate its cached exports."""
    digest = hashlib.sha256()
    for name in names:
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def build_random_llama(config, out_dir: Path, tokenizer_source: str | Path, seed: int = 0) -> Path:
    """Random-weight LlamaForCausalLM + the demo tokenizer saved in ``out_dir``; reused when unchanged."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    from proto.fingerprint import tokenizer_hash

    # By content, not path: the same tokenizer copied elsewhere must not force a rebuild and re-export.
    tok_hash = tokenizer_hash(Path(tokenizer_source) / "tokenizer.json")
    stamp = {"config": config.to_json_string(use_diff=True), "seed": seed, "tokenizer": tok_hash}
    if _read_stamp(out_dir) == stamp and (out_dir / "model.safetensors").is_file():
        return out_dir
    if out_dir.exists():
        shutil.rmtree(out_dir)
    torch.manual_seed(seed)  # random weights, but the same ones on every build
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out_dir))
    _write_stamp(out_dir, stamp)
    return out_dir


def export_cached(hf_dir: Path, out_dir: Path, dtype: str) -> Path:
    """ONNX export of ``hf_dir`` in ``dtype`` (fp32 | int8) into ``out_dir``, redone only if the weights changed."""
    from models.export import export_model

    stamp = {"weights": _files_digest(hf_dir, ("config.json", "model.safetensors")), "dtype": dtype}
    if _read_stamp(out_dir) == stamp and (out_dir / "manifest.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    export_model(str(hf_dir), out_dir, int8=(dtype == "int8"))
    _write_stamp(out_dir, stamp)
    return out_dir


def prepare_model(name: str, hf_dir: Path, cache_dir: Path, dtypes: tuple[str, ...] = DTYPES) -> BenchModel:
    """A BenchModel whose ONNX exports exist in ``cache_dir`` (exporting what is missing or stale).

    An export that fails its parity check (int8 can, on a small trained model with large logits) is
    not timed: a fast but wrong model proves nothing. Its row says why instead of aborting the bench.
    """
    from models.export import ExportError

    bench_model = BenchModel(name, Path(hf_dir))
    for dtype in dtypes:
        try:
            bench_model.onnx_dirs[dtype] = export_cached(
                Path(hf_dir), Path(cache_dir) / f"{name}_onnx_{dtype}", dtype
            )
        except ExportError as exc:
            bench_model.skipped[dtype] = f"export failed: {exc}"
    return bench_model


def prepare_default_models(
    slm_dir: Path, cache_dir: Path, dtypes: tuple[str, ...] = DTYPES
) -> list[BenchModel]:
    """The issue's two models: the demo SLM and the 50M random Llama (built with the SLM's tokenizer)."""
    slm_dir, cache_dir = Path(slm_dir), Path(cache_dir)
    if not (slm_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"demo SLM not found at {slm_dir} (build it with `python -m models demo-pair`)"
        )
    llama_dir = build_random_llama(llama_50m_config(slm_dir), cache_dir / "llama-50m", slm_dir)
    return [
        prepare_model("demo-slm", slm_dir, cache_dir, dtypes),
        prepare_model("llama-50m", llama_dir, cache_dir, dtypes),
    ]


# ---------------------------------------------------------------- one timed run of each runtime


def onnx_decode_run(edge_model, prompt_ids: list[int], n_tokens: int) -> dict:
    """Greedy edge loop for exactly ``n_tokens`` tokens; seconds per decode step, split forward vs the rest."""
    from edge.generate import generate_local
    from core.sampling import SamplingSettings

    result = generate_local(
        edge_model, prompt_ids, n_tokens, SamplingSettings(temperature=0.0), seed=0, stop_at_eos=False
    )
    steps = n_tokens - 1  # forward passes in the loop: the last token needs none (see module docstring)
    return {
        "step_s": result.decode_seconds / steps,
        "forward_s": result.forward_seconds / steps,
        "loop_overhead": result.loop_overhead,
    }


def torch_generate_seconds(model, input_ids, n_tokens: int) -> float:
    """Wall time of one greedy ``generate`` producing exactly ``n_tokens`` new tokens (EOS suppressed)."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,  # never stop early at EOS: every run decodes the same count
            use_cache=True,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        )
        return time.perf_counter() - t0


def torch_decode_run(model, input_ids, n_tokens: int) -> dict:
    """Seconds per decode step of PyTorch eager: (t(N) - t(1)) / (N - 1), which cancels the prefill."""
    t_one = torch_generate_seconds(model, input_ids, 1)
    t_all = torch_generate_seconds(model, input_ids, n_tokens)
    return {"step_s": max(t_all - t_one, 1e-9) / (n_tokens - 1)}


# ---------------------------------------------------------------- measuring one model


def load_runtimes(bench_model: BenchModel, threads: int):
    """(edge models per dtype, PyTorch fp32 eager model), both limited to ``threads`` CPU threads."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge.model import EdgeModel

    torch.set_num_threads(threads)  # same intra-op thread count as ORT: a fair fight on the same cores
    edge = {
        dtype: EdgeModel(folder, providers="cpu", threads=threads)
        for dtype, folder in bench_model.onnx_dirs.items()
    }
    torch_model = AutoModelForCausalLM.from_pretrained(str(bench_model.hf_dir), dtype=torch.float32).eval()
    return edge, torch_model


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(name: str, dtype: str, onnx_runs: list[dict], torch_runs: list[dict]) -> dict:
    """One table row from the per-repeat runs: medians, and the speedup as the ratio of median tokens/s."""
    onnx_step, torch_step = _median(onnx_runs, "step_s"), _median(torch_runs, "step_s")
    forward = _median(onnx_runs, "forward_s")
    return {
        "model": name,
        "dtype": dtype,
        "torch_dtype": "fp32",
        "onnx_tok_s": 1.0 / onnx_step,
        "torch_tok_s": 1.0 / torch_step,
        "speedup": torch_step / onnx_step,
        "loop_overhead": _median(onnx_runs, "loop_overhead"),
        "forward_ms_per_token": forward * 1e3,
        "other_ms_per_token": max(onnx_step - forward, 0.0) * 1e3,
        "torch_ms_per_token": torch_step * 1e3,
    }


def measure_model(bench_model: BenchModel, repeats: int, n_tokens: int, threads: int) -> list[dict]:
    """Rows (one per ONNX dtype) for ``bench_model``: interleaved repeats, one untimed warm-up each."""
    import torch
    from tqdm import tqdm

    if n_tokens < 2:
        raise ValueError("need at least 2 new tokens: decode time is a difference over N - 1 steps")
    skipped = [
        {"model": bench_model.name, "dtype": dtype, "skipped": why}
        for dtype, why in bench_model.skipped.items()
    ]
    if not bench_model.onnx_dirs:
        return skipped
    edge, torch_model = load_runtimes(bench_model, threads)
    prompt_ids = next(iter(edge.values())).encode(PROMPT)
    input_ids = torch.tensor([prompt_ids])
    onnx_runs: dict[str, list[dict]] = {dtype: [] for dtype in edge}
    torch_runs: list[dict] = []
    for dtype in edge:  # warm-up: first runs pay for allocations and lazy initialization
        onnx_decode_run(edge[dtype], prompt_ids, n_tokens)
    torch_decode_run(torch_model, input_ids, n_tokens)
    bar = tqdm(range(repeats), desc=f"{bench_model.name} decode", unit="repeat", leave=False)
    for _ in bar:
        for dtype in edge:
            onnx_runs[dtype].append(onnx_decode_run(edge[dtype], prompt_ids, n_tokens))
        torch_runs.append(torch_decode_run(torch_model, input_ids, n_tokens))
    params = sum(p.numel() for p in torch_model.parameters())
    rows = [summarize(bench_model.name, dtype, runs, torch_runs) for dtype, runs in onnx_runs.items()]
    for row in rows:
        row["params_m"] = params / 1e6
    return rows + skipped


# ---------------------------------------------------------------- report


def goals(row: dict) -> dict:
    """Which of the issue's goals the headline row meets (as measured; nothing rounded in its favour)."""
    return {
        "speedup_ge_2.5": row["speedup"] >= GOAL_SPEEDUP,
        "loop_overhead_le_0.10": row["loop_overhead"] <= GOAL_LOOP_OVERHEAD,
    }


def edge_section(
    rows: list[dict],
    command: str,
    threads: int,
    repeats: int,
    n_tokens: int,
    headline: tuple[str, str] = HEADLINE,
) -> dict:
    """The ``edge`` section of bench.json: the headline row's four keys, then every row in ``details``."""
    measured = [r for r in rows if "skipped" not in r]
    if not measured:
        raise RuntimeError("no (model, dtype) could be measured: " + "; ".join(r["skipped"] for r in rows))
    head = next((r for r in measured if (r["model"], r["dtype"]) == headline), measured[0])
    return {
        "onnx_tok_s": head["onnx_tok_s"],
        "torch_tok_s": head["torch_tok_s"],
        "speedup": head["speedup"],
        "loop_overhead": head["loop_overhead"],
        "headline": {"model": head["model"], "dtype": head["dtype"]},
        "goals": goals(head),
        "details": rows,
        "command": command,
        "threads": threads,
        "repeats": repeats,
        "new_tokens": n_tokens,
        "prompt": PROMPT,
        "method": "median over interleaved repeats; decode step = (t(N)-t(1))/(N-1) for torch, "
        "decode_seconds/(N-1) for onnx; prefill excluded; greedy; CPU",
    }


def merge_report(path: Path, name: str, section: dict) -> dict:
    """Write ``section`` under ``name`` in the JSON report at ``path``, keeping every other section."""
    path = Path(path)
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[name] = section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)  # atomic: an interrupted bench never leaves a half-written report behind
    return report


def format_table(section: dict) -> str:
    """The rows as a plain-text table, then one line per goal saying whether it is met."""
    header = [
        "model",
        "dtype",
        "onnx tok/s",
        "torch tok/s",
        "speedup",
        "loop ovh",
        "fwd ms/tok",
        "other ms/tok",
        "torch ms/tok",
    ]
    lines = [header]
    skipped = []
    for r in section["details"]:
        if "skipped" in r:
            skipped.append(f"{r['model']} {r['dtype']}: not timed, {r['skipped']}")
            continue
        lines.append(
            [
                r["model"],
                r["dtype"],
                f"{r['onnx_tok_s']:.1f}",
                f"{r['torch_tok_s']:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['loop_overhead']:.1%}",
                f"{r['forward_ms_per_token']:.3f}",
                f"{r['other_ms_per_token']:.3f}",
                f"{r['torch_ms_per_token']:.3f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text += skipped
    machine = section.get("machine")
    if machine and machine["load_avg_1min"] > 0.5:
        text.append(
            f"note: load average {machine['load_avg_1min']:.2f} on {machine['cpu_count']} CPUs before the "
            "bench started: other processes compete for the cores, absolute numbers are depressed"
        )
    head = section["headline"]
    met = section["goals"]
    text.append("")
    text.append(
        f"goals ({head['model']} {head['dtype']}, {section['threads']} threads, "
        f"median of {section['repeats']} repeats):"
    )
    text.append(
        f"  speedup {section['speedup']:.2f}x >= {GOAL_SPEEDUP}x: "
        f"{'MET' if met['speedup_ge_2.5'] else 'NOT MET'}"
    )
    text.append(
        f"  loop overhead {section['loop_overhead']:.1%} <= {GOAL_LOOP_OVERHEAD:.0%}: "
        f"{'MET' if met['loop_overhead_le_0.10'] else 'NOT MET'}"
    )
    return "\n".join(text)


def machine_state() -> dict:
    """CPU count, load and library versions: a busy machine depresses (and skews) every number."""
    import onnxruntime
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
    }


def run(
    models: list[BenchModel],
    repeats: int,
    n_tokens: int,
    threads: int,
    command: str,
    headline: tuple[str, str] = HEADLINE,
) -> dict:
    """Measure every model and return the ``edge`` section (not yet written anywhere)."""
    before = machine_state()  # the load *before* we add ours: what other jobs were doing
    rows = [row for model in models for row in measure_model(model, repeats, n_tokens, threads)]
    section = edge_section(rows, command, threads, repeats, n_tokens, headline)
    section["machine"] = before
    return section
