"""Writing the bench report: merge one section into reports/bench.json without touching the others, and
print the edge section as a plain-text table with its goals.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.edge_decode import GOAL_LOOP_OVERHEAD, GOAL_SPEEDUP

DEFAULT_OUT = Path("reports/bench.json")
TABLE_HEADER = (
    "model",
    "dtype",
    "onnx tok/s",
    "torch tok/s",
    "speedup",
    "loop ovh",
    "fwd ms/tok",
    "other ms/tok",
    "torch ms/tok",
)
BUSY_LOAD = 0.5  # 1-minute load average above which the table warns that numbers are depressed


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


# ---------------------------------------------------------------- the edge section as text


def _row_cells(r: dict) -> list[str]:
    """One measured row's cells, in TABLE_HEADER order."""
    return [
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


def _aligned(lines: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the two name columns left-aligned, the numbers right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER))]
    return [
        "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    ]


def _load_note(section: dict) -> list[str]:
    """A warning line when the machine was busy before the bench started, else nothing."""
    machine = section.get("machine")
    if not (machine and machine["load_avg_1min"] > BUSY_LOAD):
        return []
    return [
        f"note: load average {machine['load_avg_1min']:.2f} on {machine['cpu_count']} CPUs before the "
        "bench started: other processes compete for the cores, absolute numbers are depressed"
    ]


def _goal_lines(section: dict) -> list[str]:
    """A blank line, the headline it is judged on, then MET / NOT MET per goal."""
    head = section["headline"]
    met = section["goals"]
    return [
        "",
        f"goals ({head['model']} {head['dtype']}, {section['threads']} threads, "
        f"median of {section['repeats']} repeats):",
        f"  speedup {section['speedup']:.2f}x >= {GOAL_SPEEDUP}x: "
        f"{'MET' if met['speedup_ge_2.5'] else 'NOT MET'}",
        f"  loop overhead {section['loop_overhead']:.1%} <= {GOAL_LOOP_OVERHEAD:.0%}: "
        f"{'MET' if met['loop_overhead_le_0.10'] else 'NOT MET'}",
    ]


def format_table(section: dict) -> str:
    """The rows as a plain-text table, then one line per goal saying whether it is met."""
    lines = [list(TABLE_HEADER)]
    skipped = []
    for r in section["details"]:
        if "skipped" in r:
            skipped.append(f"{r['model']} {r['dtype']}: not timed, {r['skipped']}")
        else:
            lines.append(_row_cells(r))
    text = _aligned(lines) + skipped + _load_note(section) + _goal_lines(section)
    return "\n".join(text)
