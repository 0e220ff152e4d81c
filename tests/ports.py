"""The one free-port helper of the tests and their service fixtures (tests/plugins/*): loopback only."""

from __future__ import annotations

import socket

from ditscale.distenv import free_port as _one_free_port


def free_port(consecutive: int = 1) -> int:
    """A loopback port p such that p .. p+consecutive-1 are all free right now (a run's exporters take
    log.metrics_port + local rank: consecutive ports)."""
    for _ in range(200):
        base = _one_free_port()
        if base + consecutive > 65535:
            continue
        ok = True
        for p in range(base + 1, base + consecutive):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no {consecutive} consecutive free loopback ports")
