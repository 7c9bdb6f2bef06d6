"""Address rules shared by the edge and the verifier: where plaintext is allowed.

Plaintext gRPC (no TLS) is used only when explicitly asked for, except on loopback, where nothing leaves
the machine. Both sides apply this one rule.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext_allowed(host: str, insecure: bool, who: str) -> None:
    """ValueError unless plaintext to/on ``host`` is allowed: loopback, or ``insecure`` explicitly set."""
    if not insecure and not is_loopback(host):
        raise ValueError(f"{who}: plaintext to {host} would cross the network; configure TLS "
                         "(see README, 'Security') or pass --insecure to allow plaintext explicitly")
