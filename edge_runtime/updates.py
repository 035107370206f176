"""Updates from the cloud: new module versions and whole bundles, each served only if the holdout does not get worse."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import BundleError, DataError, TrainingUnavailableError
from eclm.parts import onnx_name
from eclm.signing import Verifier
from edge_runtime.events import EventSink
from edge_runtime.generations import CLOSING, Generations, with_values
from edge_runtime.learning import Refinement
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.state import Pointer
from edge_runtime.store import SampleStore


class Updates:
    """Applies what the cloud sends through the generations' one commit-or-roll-back path."""

    def __init__(self, generations: Generations, store: SampleStore, metrics: EdgeMetrics, events: EventSink,
                 refine: Callable[[ServingModel], Refinement | None] | None = None) -> None:
        self.generations, self.store, self.metrics, self.events = generations, store, metrics, events
        self.refine = refine  # set: a module update is fine-tuned here before it is judged (refine_updates)
        self.last_update: dict[str, Any] | None = None

    def _rolled_back(self, result: dict[str, Any]) -> dict[str, Any]:
        self.metrics.update_rollbacks.inc()
        self.last_update = result
        self.events.notify("rollback", result)
        return result

    def apply_module_update(self, versions: dict[str, int], tensors: dict[str, np.ndarray],
                            environment: str = "") -> dict[str, Any]:
        """Load new module versions of ``environment``'s lines into the serving weights; kept only if the
        holdout does not get worse. Versions of another line than the serving one are all new here.
        """
        gens = self.generations
        with gens.changing() as open_:
            if not open_:
                return {"applied": False, "reason": CLOSING}
            here = self.store.get_meta("environment", "") or ""
            if environment != here:
                return {"applied": False, "reason": f"update for environment {environment!r}; this device works in "
                                                    f"{here!r}"}
            serving = gens.serving
            if not serving.trainable:
                raise TrainingUnavailableError(
                    f"module updates need a bundle this device can train: {serving.training_reason}",
                    hint="the cloud sends inference-only devices whole bundles")
            current = serving.module_versions if serving.line == environment else {}
            fresh = {pid: v for pid, v in versions.items() if v > current.get(pid, 0)}
            if not fresh:
                return {"applied": False, "reason": "already at these versions or newer"}
            wanted = {onnx_name(name): arr for name, arr in tensors.items()}
            unknown = sorted(set(wanted) - set(serving.weights))
            if unknown:
                raise DataError(f"update names parameters this bundle lacks: {unknown[:3]}",
                                hint="the cloud must send modules of this device's sub-model")
            for name, arr in wanted.items():
                if serving.weights[name].shape != arr.shape:
                    raise DataError(f"update for {name} has shape {arr.shape}", hint="refused")
            candidate = with_values(serving, {n: np.array(a, dtype=np.float32) for n, a in wanted.items()})
            candidate.versions = {**serving.module_versions, **fresh}
            candidate.line = environment
            refined = self.refine(candidate) if self.refine is not None else None
            record: dict[str, Any] = {"update": fresh}
            if refined is not None:  # judged after fine-tuning from it; its delta is kept only if it serves
                candidate = refined.model
                record["delta_id"] = refined.outcome.delta_id
            trial = gens.trial(candidate, self.store.holdout_set(), record=record, unjudged_serves=True,
                               keep=(lambda t: refined.keep(t.served)) if refined is not None else None)
            reason = (("refined here, " if refined is not None else "")
                      + (f"module update {trial.verdict.reason}" if trial.verdict else "no holdout samples yet"))
            if not trial.served:
                assert trial.verdict is not None
                return self._rolled_back({"applied": False, "rolled_back": True, **trial.verdict.to_dict(),
                                          "versions": fresh, "reason": reason, "refined": refined is not None})
            result = {"applied": True, "generation": candidate.generation, "versions": fresh, **trial.detail(),
                      "reason": reason, "refined": refined is not None}
            self.last_update = result
        return result

    def install_bundle_archive(self, archive: bytes, verifier: Verifier | None) -> dict[str, Any]:
        """Unpack a bundle sent by the cloud, check its signature, hashes, device, profile and that it is newer
        than every bundle served here, and swap it in if not worse.
        """
        from eclm.archive import untar_bundle
        from eclm.manifest import bundle_digest

        gens = self.generations
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=gens.state.root / "bundles"))
        try:
            if verifier is None:
                raise BundleError("a bundle update must be signed, and this device has no trust key",
                                  hint="start eclm-edge serve with --trust-key (the cloud's signing.pub)")
            untar_bundle(archive, tmp / "b")
            if bundle_digest(tmp / "b") == gens.serving.digest:
                return {"applied": False, "bundle": gens.serving.digest, "reason": "already serving this bundle"}
            with gens.changing() as open_:
                if not open_:
                    return {"applied": False, "reason": CLOSING}
                digest, _ = gens.state.install_bundle(tmp / "b", verifier, gens.made_for(update=True),
                                                      newer_only=True)
                candidate = gens.open(Pointer(digest, 0))
                trial = gens.trial(candidate, self.store.holdout_set(), record=None, unjudged_serves=True)
                detail = {**trial.detail(),
                          "reason": f"bundle {trial.verdict.reason}" if trial.verdict else "no holdout samples yet"}
                if trial.served:
                    result = {"applied": True, "bundle": digest, **detail}
                else:
                    result = self._rolled_back({"applied": False, "rolled_back": True, "bundle": digest, **detail})
            self.last_update = result
        except BundleError:
            self.metrics.bundle_rejections.inc()
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result
