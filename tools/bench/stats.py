"""What the benchmarks (hostd_bench, fw_bench) report their samples with."""

from __future__ import annotations

import math
from pathlib import Path


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile of seconds, in ms."""
    s = sorted(xs)
    return round(s[min(len(s), max(1, math.ceil(p / 100 * len(s)))) - 1] * 1000, 3)


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": pct(xs, 50), "p99_ms": pct(xs, 99), "max_ms": pct(xs, 100)}


def fs_type(path: Path) -> str:
    """The file system under path (from /proc/mounts): tmpfs or a disk's."""
    best, kind = "", "?"
    real = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, typ, *_ = line.split()
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, typ
    return kind
