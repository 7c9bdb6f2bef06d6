"""PNG plots of a sweep's frontier.csv (matplotlib, headless): one pair of plots per temperature."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

NAMES = {"uhlm": "uhlm (U-HLM estimator)", "perturb-mode": "perturb-mode"}


def _f(row, key):
    return float(row[key]) if row.get(key) not in ("", None) else float("nan")


def _baselines(ax, rows, x_key):
    for r in rows:
        if r["estimator"] == "llm-only":
            ax.axhline(_f(r, "accuracy"), color="black", ls="--", lw=1, label="LLM-only")
            ax.axhline(0.99 * _f(r, "accuracy"), color="grey", ls=":", lw=1, label="99% of LLM-only")
        if r["estimator"] == "slm-only":
            ax.axhline(_f(r, "accuracy"), color="red", ls="--", lw=1, label="SLM-only")


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for temp in sorted({float(r["temperature"]) for r in rows}):
        at_t = [r for r in rows if float(r["temperature"]) == temp]
        points = [r for r in at_t if r["estimator"] not in ("slm-only", "llm-only")]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = defaultdict(list)
        for r in points:
            if r["codec"] == "full32" or r["estimator"] != "uhlm":
                curves[(r["estimator"], r["codec"])].append(r)
        for (est, codec), rs in sorted(curves.items()):
            rs.sort(key=lambda r: _f(r, "transmission_rate"))
            label = "U-HLM (uhlm, full32)" if (est, codec) == ("uhlm", "full32") else f"{est} ({codec})"
            ax.plot([_f(r, "transmission_rate") for r in rs], [_f(r, "accuracy") for r in rs], "o-", ms=3,
                    label=label)
        hlm = [r for r in points if r["codec"] == "full32" and _f(r, "transmission_rate") == 1.0]
        if hlm:
            ax.plot([1.0], [_f(hlm[0], "accuracy")], "k*", ms=10, label="HLM (verify all)")
        _baselines(ax, at_t, "transmission_rate")
        ax.set(xlabel="transmission rate", ylabel="task accuracy", title=f"accuracy vs transmission, T={temp:g}")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / f"accuracy_vs_tr_T{temp:g}.png"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        by_codec = defaultdict(list)
        for r in points:
            by_codec[r["codec"]].append(r)
        for codec, rs in sorted(by_codec.items()):
            ax.scatter([max(_f(r, "uplink_bytes_per_token"), 1e-2) for r in rs], [_f(r, "accuracy") for r in rs],
                       s=10, label=codec)
        _baselines(ax, at_t, "uplink_bytes_per_token")
        ax.set_xscale("log")
        ax.set(xlabel="uplink bytes per generated token (log)", ylabel="task accuracy",
               title=f"accuracy vs uplink bytes, T={temp:g}")
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / f"accuracy_vs_bytes_T{temp:g}.png"))
    return written


def _frontier_curve(ax, frontier: list[dict], temp: float, x_key: str) -> None:
    """The default estimator's threshold sweep (max-prob, adaptive) as a line: at stop-and-wait a token-level
    Verify is one round trip, so its transmission rate is its round trips per token."""
    rs = sorted((r for r in frontier if float(r["temperature"]) == temp and r["estimator"] == "max-prob"
                 and r["codec"] == "adaptive"), key=lambda r: _f(r, x_key))
    if rs:
        ax.plot([max(_f(r, x_key), 1e-3) for r in rs], [_f(r, "accuracy") for r in rs], "-", color="lightgrey",
                lw=2, zorder=0, label="default's threshold sweep")


def plot_modes(rows: list[dict], out: Path, frontier: list[dict] | None = None) -> list[Path]:
    """The modes table (``python -m eval modes``) as two plots per temperature, accuracy (95% interval) vs round
    trips per token and vs uplink bytes per token; inexact modes are hollow markers. ``frontier`` (a sweep's
    rows) adds the default estimator's threshold curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for temp in sorted({float(r["temperature"]) for r in rows}):
        at_t = [r for r in rows if float(r["temperature"]) == temp]
        for x_key, frontier_key, label, name in (
                ("round_trips_per_token", "transmission_rate", "round trips per generated token (log)", "rt"),
                ("uplink_bytes_per_token", "uplink_bytes_per_token", "uplink bytes per generated token (log)",
                 "bytes")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            if frontier:
                _frontier_curve(ax, frontier, temp, frontier_key)
            for i, r in enumerate(at_t):
                color = f"C{i % 10}"
                ax.errorbar([max(r[x_key], 1e-3)], [r["accuracy"]], yerr=[r["ci95"]], fmt="o", ms=6, capsize=3,
                            color=color, mfc=color if r["exact"] else "none",
                            label=r["mode"] + ("" if r["exact"] else " (inexact)"))
            ax.set_xscale("log")
            ax.set(xlabel=label, ylabel="task accuracy", title=f"collaboration modes, T={temp:g}")
            ax.legend(fontsize=7)
            written.append(save_figure(fig, out / f"modes_accuracy_vs_{name}_T{temp:g}.png"))
    return written
