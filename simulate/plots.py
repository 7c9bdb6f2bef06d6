"""PNG plots of a sweep (matplotlib, headless): throughput vs uplink rate per policy (log x), latency
CDFs at the reference point, uplink bytes per token, and the hybrid / cloud-only throughput ratio (the
crossover is where a curve crosses 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eval.plots import save_figure

CLOUD_ONLY = "llm-only"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(rows: list[dict]) -> dict:
    """One colour per policy, the same in every plot of a sweep."""
    cycle = [f"C{i}" for i in range(10)]
    return {p: cycle[i % 10] for i, p in enumerate(sorted({r["policy"] for r in rows}))}


def _groups(rows: list[dict]) -> list[tuple[float, int]]:
    return sorted({(r["rtt_s"], r["devices"]) for r in rows})


def _curve(rows, policy, rtt, devices, key="tokens_per_s"):
    pts = sorted((r["uplink_bps"], r[key]) for r in rows
                 if r["policy"] == policy and r["rtt_s"] == rtt and r["devices"] == devices)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_throughput(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    groups = _groups(rows)
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    colors = _colors(rows)
    for ax, (rtt, devices) in zip(axes.flat, groups):
        for policy, color in colors.items():
            x, y = _curve(rows, policy, rtt, devices)
            ax.plot(x, y, marker="o", ms=3, label=policy, color=color, ls="--" if policy == CLOUD_ONLY else "-")
        ax.set(xscale="log", yscale="log", xlabel="uplink rate (bit/s)", ylabel="aggregate tokens/s",
               title=f"RTT {rtt * 1000:g} ms, {devices} device(s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, out / "throughput_vs_uplink.png")


def plot_latency_cdf(cdfs: dict, ref: dict, colors: dict, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for policy, lat in sorted(cdfs.items()):
        if len(lat):
            ax.plot(lat * 1000, np.arange(1, len(lat) + 1) / len(lat), label=policy, color=colors.get(policy))
    ax.set(xscale="log", xlabel="per-token latency (ms)", ylabel="CDF",
           title=f"{ref['uplink_bps'] / 1e6:g} Mbit/s uplink, RTT {ref['rtt_s'] * 1000:g} ms, "
                 f"{ref['devices']} device(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "latency_cdf.png")


def plot_bytes(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    per_policy = {}
    for r in rows:
        per_policy.setdefault(r["policy"], (r["uplink_bytes_per_token"], r["uplink_grpc_bytes_per_token"]))
    names = sorted(per_policy)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 4.2))
    ax.bar(x - 0.2, [max(per_policy[n][0], 1e-3) for n in names], 0.4, label="on the link (framing included)")
    ax.bar(x + 0.2, [max(per_policy[n][1], 1e-3) for n in names], 0.4, label="gRPC messages (trace)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(yscale="log", ylabel="uplink bytes per generated token")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    return save_figure(fig, out / "bytes_per_token.png")


def plot_crossover(rows: list[dict], crossover: list[dict], out: Path) -> Path | None:
    if not any(r["policy"] == CLOUD_ONLY for r in rows):
        return None
    plt = _plt()
    groups = _groups(rows)
    cols = min(3, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    colors = _colors(rows)
    for ax, (rtt, devices) in zip(axes.flat, groups):
        cx, cy = _curve(rows, CLOUD_ONLY, rtt, devices)
        cloud = dict(zip(cx, cy))
        for policy in sorted({r["policy"] for r in rows} - {CLOUD_ONLY}):
            x, y = _curve(rows, policy, rtt, devices)
            ratio = [v / cloud[b] if cloud.get(b) else np.nan for b, v in zip(x, y)]
            (line,) = ax.plot(x, ratio, marker="o", ms=3, label=policy, color=colors[policy])
            for c in crossover:
                if (c["policy"], c["rtt_s"], c["devices"]) == (policy, rtt, devices) and c["beats_cloud_from_bps"]:
                    ax.axvline(c["beats_cloud_from_bps"], color=line.get_color(), ls=":", lw=1)
        ax.axhline(1.0, color="black", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="uplink rate (bit/s)", ylabel="tokens/s vs cloud-only",
               title=f"RTT {rtt * 1000:g} ms, {devices} device(s)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save_figure(fig, out / "crossover.png")


def write_plots(rows: list[dict], cdfs: dict, ref: dict, crossover: list[dict], out: Path) -> list[str]:
    paths = [plot_throughput(rows, out), plot_latency_cdf(cdfs, ref, _colors(rows), out), plot_bytes(rows, out),
             plot_crossover(rows, crossover, out)]
    return [str(p) for p in paths if p is not None]
