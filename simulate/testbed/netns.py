"""Two network namespaces joined by a veth pair, the edge's egress (the uplink) shaped by ``tc tbf``.

    [edge ns] sve<id> 10.203.0.1  ==veth==  10.203.0.2 svc<id> [cloud ns]
               tbf rate R (uplink)            unshaped (downlink)

Both namespaces get ``net.ipv4.tcp_slow_start_after_idle = 0``: the hybrid loop idles between Verifies,
and Linux would otherwise shrink the congestion window back to its initial size after every idle
period longer than an RTO, which a fluid link model does not describe. Setup needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import shutil
import subprocess

EDGE_IP, CLOUD_IP = "10.203.0.1", "10.203.0.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def unavailable_reason() -> str | None:
    """Why a testbed cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    probe = f"svprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Testbed:
    """Context manager: the namespaces and veth exist inside ``with``; ``shape`` sets the uplink rate."""

    def __init__(self):
        tag = str(os.getpid())[-6:]
        self.edge_ns, self.cloud_ns = f"svedge{tag}", f"svcloud{tag}"
        self.edge_if, self.cloud_if = f"sve{tag}", f"svc{tag}"

    def __enter__(self) -> Testbed:
        try:
            for ns in (self.edge_ns, self.cloud_ns):
                _ip("netns", "add", ns)
                self.run(ns, "ip", "link", "set", "lo", "up")
                self.run(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
            _ip("link", "add", self.edge_if, "netns", self.edge_ns, "type", "veth", "peer", "name", self.cloud_if,
                "netns", self.cloud_ns)
            for ns, dev, addr in ((self.edge_ns, self.edge_if, EDGE_IP), (self.cloud_ns, self.cloud_if, CLOUD_IP)):
                self.run(ns, "ip", "addr", "add", f"{addr}/30", "dev", dev)
                self.run(ns, "ip", "link", "set", dev, "up")
        except subprocess.CalledProcessError as exc:
            self.__exit__()
            raise RuntimeError(f"testbed setup failed: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.edge_ns, self.cloud_ns):
            _ip("netns", "del", ns, check=False)  # removes the veth end inside it too

    def run(self, ns: str, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, check=True)

    def prefix(self, ns: str) -> list[str]:
        """Command prefix that runs a program inside ``ns``."""
        return ["ip", "netns", "exec", ns]

    def unshape(self) -> None:
        """Back to the bare veth (no qdisc of ours)."""
        subprocess.run([*self.prefix(self.edge_ns), "tc", "qdisc", "del", "dev", self.edge_if, "root"],
                       capture_output=True, text=True)

    def shape(self, rate_bps: float) -> dict:
        """Shape the edge's egress with tbf; returns the qdisc parameters used.

        burst: at least two full frames, else ~1 ms of traffic: small enough that the link drains at the
        configured rate (a fluid link), large enough that tbf never stalls a single frame."""
        burst = max(2 * 1514, int(rate_bps / 8 * 0.001))
        limit = max(burst * 4, int(rate_bps / 8 * 2.0))  # up to ~2 s of queue: TCP, not the qdisc, paces
        self.run(self.edge_ns, "tc", "qdisc", "replace", "dev", self.edge_if, "root", "tbf", "rate", f"{int(rate_bps)}bit",
                 "burst", str(burst), "limit", str(limit))
        return {"qdisc": "tbf", "rate_bps": rate_bps, "burst_bytes": burst, "limit_bytes": limit}
