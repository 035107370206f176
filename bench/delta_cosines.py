"""Cosines between real honest deltas of devices with different class mixes, per shared part.

The measurement behind the robust strategy's disagreement threshold (cloud_sync/strategies.py,
docs/sync.md "Merging defaults"): ``python -m bench.delta_cosines BANK WORKDIR``. Each of
bench/sync_bench.py's five devices (pi4 bundles, own classes and corruption) trains once.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np


def cosines(bank: Path, work: Path) -> dict[str, list[tuple[str, str, float]]]:
    """Per part, (device, device, cosine) for every pair of devices whose deltas carry it (zero deltas left out)."""
    from bench.sync_bench import _devices

    runs = _devices(bank, work)
    out: dict[str, list[tuple[str, str, float]]] = {}
    for a, b in itertools.combinations(runs, 2):
        for pid in sorted(set(a.message.parts) & set(b.message.parts)):
            names = sorted(set(a.message.parts[pid]) & set(b.message.parts[pid]))
            va = np.concatenate([a.message.tensors[n].ravel().astype(np.float64) for n in names])
            vb = np.concatenate([b.message.tensors[n].ravel().astype(np.float64) for n in names])
            denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
            if denom > 0:
                out.setdefault(pid, []).append((a.name, b.name, round(float(va @ vb) / denom, 3)))
    return out


def main() -> None:
    found = cosines(Path(sys.argv[1]), Path(sys.argv[2]))
    every = [c for rows in found.values() for _, _, c in rows]
    for pid, rows in found.items():
        print(pid, rows)
    print(f"{len(every)} pairs: cosine from {min(every):.3f} to {max(every):.3f}")


if __name__ == "__main__":
    main()
