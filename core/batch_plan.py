"""How a batching verifier splits the forwards queued together into padded forwards: one rule, used by the
engine (``cloud.batching``) and replayed by the simulator (``simulate.batched``).

A forward costs ``overhead + rows x longest new tail`` (padding is paid for), so padding a 40-token prefill
onto 30 one-token decode steps costs more than a second forward. The split is an exact dynamic program over
the tails sorted by length: at most a few hundred jobs.
"""

from __future__ import annotations

# The fixed cost of one forward (Python, kernel launches, the output layer's weights read once), in padded
# tokens' worth of work: measured on the demo LLM on this CPU, one row took ~8 ms and 64 rows x 25 tokens
# ~95 ms, so a forward's overhead is worth ~150 tokens.
FORWARD_OVERHEAD_TOKENS = 128
# Rows per forward: past ~256 rows a forward's cost grows faster than linearly on this CPU (512 one-token rows
# took 359 ms vs 118 ms for 256), so two forwards are cheaper than one.
MAX_ROWS = 256


def plan_forwards(tails: list[int], max_tokens: int, overhead: int = FORWARD_OVERHEAD_TOKENS,
                  max_rows: int = MAX_ROWS) -> list[list[int]]:
    """Indices of ``tails`` grouped into forwards (shortest tails first) minimizing the summed
    ``overhead + rows * longest tail``; a forward of more than one row holds at most ``max_rows`` rows and
    ``max_tokens`` padded tokens."""
    order = sorted(range(len(tails)), key=lambda i: tails[i])
    lengths = [tails[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cheapest plan of the first j sorted jobs
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j - 1, -1, -1):  # the last forward takes sorted jobs i .. j-1 (longest: lengths[j-1])
            rows = j - i
            if rows > 1 and (rows * lengths[j - 1] > max_tokens or rows > max_rows):
                break
            cost = best[i] + overhead + rows * lengths[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
