"""One device's bundle re-derived from the bank, as the merger daemon sends it: a signed tar archive and its digest.

``eclm-cloud sync`` hands :func:`derive_bundle` (with the bank and signing key bound) to the daemon
(:class:`cloud_sync.ports.SyncHooks`), which imports neither torch nor this package.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from eclm.archive import tar_bundle
from eclm.manifest import bundle_digest


def derive_bundle(bank_dir: Path | str, signing_key: Path | None, device: str, profile: str,
                  importance: list[list[float]]) -> tuple[bytes, str]:
    """Export the sub-model for ``profile`` and ``importance`` from the bank's current versions, signed for
    ``device``; returns the bundle as a tar archive and its digest (the work folder is removed).

    The export machinery (torch, ONNX) is imported on the first call, in the daemon's derivation worker.
    """
    from exporter.export import ExportRequest, export_bundle
    from exporter.importance import write_importance_file

    work = Path(tempfile.mkdtemp(prefix="eclm-derive-"))
    try:
        imp_file = work / "importance.json"
        write_importance_file(imp_file, [np.asarray(r) for r in importance], samples=0)
        out = work / "bundle"
        export_bundle(ExportRequest(bank_dir=bank_dir, profile=profile, out_dir=out, importance_file=imp_file,
                                    measure=False, signing_key=signing_key, device_id=device))
        return tar_bundle(out), bundle_digest(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
