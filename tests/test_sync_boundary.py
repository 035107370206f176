"""The merger daemon runs without torch and without `exporter`: what it needs from them is injected.

A fresh interpreter with torch and every `exporter` module blocked imports the daemon's modules and merges
real deltas into a copy of the trained digits bank, with a numpy evaluation in the gate. Before the merge
pipeline took its evaluation, derivation and bank as hooks, importing ``cloud_sync.merger`` failed there.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from _eclm_testutil import ROOT, subprocess_env
from sync_messages import make_delta, make_profile

from eclm import topics, wire

CHILD = r"""
import json, sys
from pathlib import Path

blocked = ["torch", "exporter"] + ["exporter." + p.stem for p in Path("exporter").glob("*.py")]
for name in blocked:
    sys.modules[name] = None  # any import of these raises ImportError

import numpy as np

import cloud_sync.core, cloud_sync.merger, cloud_sync.daemon, cloud_sync.pipeline, cloud_sync.metrics
from cloud_sync.daemon import SyncDaemon, SyncSettings
from cloud_sync.merger import MergeSettings
from cloud_sync.ports import SyncHooks

work = Path(sys.argv[1])
calls = []

def numpy_evaluator(info, secret):
    assert len(secret) >= 16 and info.bank_id

    def evaluate(params):
        calls.append(len(params))
        moved = sum(float(np.abs(a.astype(np.float64)).sum()) for part in params.values() for a in part.values())
        return 0.9 + 1e-9 * (moved % 1.0)  # within the margin whatever merges
    return evaluate

daemon = SyncDaemon(SyncSettings(bank_dir=work / "bank", client_id="eclm-sync-boundary",
                                 merge=MergeSettings(strategy="weighted")),
                    None, SyncHooks(numpy_evaluator))
core = daemon.core
for line in (work / "messages.jsonl").read_text().splitlines():
    topic, hexdata = json.loads(line)
    core.handle(topic, bytes.fromhex(hexdata))
result, _ = core.run_round()
core.close()
print(json.dumps({
    "gate_problem": core.merger.gate_problem,
    "merged": result.merged if result else None,
    "versions": result.versions if result else None,
    "val_after": result.val_after if result else None,
    "evaluations": len(calls),
    "bank_versions": {pid: rec.version for pid, rec in core.bank.store.info().parts.items() if rec.version > 1},
    "loaded": sorted(m for m, v in sys.modules.items() if v is not None
                     and m.split(".")[0] in ("torch", "exporter")),
}))
"""


def test_a_merge_round_runs_with_torch_and_exporter_blocked(digits_bank: Any, tmp_path: Path) -> None:
    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    lines = []
    deltas = []
    for i, device in enumerate(("boundary-a", "boundary-b")):
        deltas.append(make_delta(bank, device, seed=i + 1))
        lines.append([topics.profile(device), wire.encode(make_profile(bank, device)).hex()])
        lines.append([topics.delta(device), wire.encode(deltas[-1]).hex()])
    (tmp_path / "messages.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         env=subprocess_env(), cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nmerged with torch and exporter blocked: {result}")
    assert result["gate_problem"] == ""
    assert sorted(result["merged"]) == sorted(d.delta_id for d in deltas)
    assert result["versions"] == {"head": 2} == result["bank_versions"]
    assert result["evaluations"] >= 3  # before, the part alone, the kept parts together
    assert result["loaded"] == []


def _imports(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_import_rule_cloud_sync_reaches_torch_and_exporter_only_through_the_cli() -> None:
    """docs/ARCHITECTURE: ``cloud_sync`` uses torch and ``exporter`` only through what the CLI injects."""
    allowed = {"cli.py"}  # builds the hooks (cloud_sync.cli.build_hooks) and runs `eclm-cloud train`
    offenders = {f"{path.name}: {name}" for path in sorted((ROOT / "cloud_sync").glob("*.py"))
                 if path.name not in allowed for name in _imports(path)
                 if name.split(".")[0] in ("torch", "exporter")}
    assert offenders == set()


def test_bundle_derivation_is_the_injected_function(digits_bank: Any, tmp_path: Path) -> None:
    """The daemon derives a bundle only through the hook it was given; without one it says so and queues none."""
    from cloud_sync.core import SyncCore, SyncSettings
    from cloud_sync.merger import MergeSettings
    from cloud_sync.ports import SyncHooks
    from eclm.signing import generate_keys, load_signer, load_verifier

    bank = Path(shutil.copytree(digits_bank[0], tmp_path / "bank"))
    priv, pub = generate_keys(tmp_path / "keys")
    settings = SyncSettings(bank_dir=bank, signing_key=priv, merge=MergeSettings(gate=False))
    asked: list[tuple[str, str, int]] = []

    def derive(device: str, profile: str, importance: list[list[float]]) -> tuple[bytes, str]:
        asked.append((device, profile, len(importance)))
        return b"an archive", "0" * 64

    plain = SyncCore(settings, load_signer(priv), SyncHooks())
    try:
        plain.request_bundle("dev-a", "pi4", [[1.0]], "requested")
        assert len(plain.derivations) == 0
    finally:
        plain.close()
    core = SyncCore(settings, load_signer(priv), SyncHooks(derive=derive))
    try:
        core.request_bundle("dev-a", "pi4", [[1.0]], "requested")
        assert core.derivations.run_once(now=10**12)
        assert asked == [("dev-a", "pi4", 1)]
        (topic, data), = core.published
        msg = wire.decode(data, verifier=load_verifier(pub))
        assert topic == topics.update("dev-a") and isinstance(msg, wire.BundleUpdateMessage)
        assert (msg.archive, msg.digest, msg.reason) == (b"an archive", "0" * 64, "requested")
    finally:
        core.close()
