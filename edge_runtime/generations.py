"""Which generation serves: open and recover bundles and generations, and the one path by which a candidate
(a training run, a module update, a bundle update) is judged on the holdout and committed or rolled back.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from eclm.errors import BundleError, EclmError, TrainingUnavailableError
from eclm.manifest import MadeFor
from eclm.signing import Verifier
from eclm.train_step import release_memory
from edge_runtime.config import EdgeConfig
from edge_runtime.judge import Holdout, Judgement, judge
from edge_runtime.metrics import EdgeMetrics
from edge_runtime.model import ServingModel
from edge_runtime.outbox import Outbox
from edge_runtime.state import Pointer, StateDir, read_params, write_params
from edge_runtime.store import SampleStore
from edge_runtime.trainer import open_runner

log = logging.getLogger("eclm.edge")

CLOSING = "the runtime is closing; nothing was changed (the samples and the serving model stay for the next start)"


@dataclass(frozen=True)
class Trial:
    """What the holdout said of a candidate, and whether the candidate now serves."""

    before: float  # holdout accuracy of what served (NaN without holdout samples)
    after: float  # holdout accuracy of the candidate
    verdict: Judgement | None  # None without holdout samples
    served: bool

    def detail(self) -> dict[str, Any]:
        """Holdout figures for a result: accuracies before and after, and what decided."""
        return {"holdout_before": self.before, "holdout_after": self.after,
                **(self.verdict.to_dict() if self.verdict else {})}


def with_values(serving: ServingModel, values: dict[str, np.ndarray]) -> ServingModel:
    """A candidate of ``serving`` with ``values`` in place of some parameters; the others stay shared."""
    return replace(serving, weights={**serving.weights, **values}, changed=serving.changed | frozenset(values))


class Generations:
    """The serving model and how it changes. ``lock`` is held by whoever changes it (training, updates)."""

    def __init__(self, cfg: EdgeConfig, state: StateDir, verifier: Verifier | None, metrics: EdgeMetrics) -> None:
        self.cfg, self.state, self.verifier, self.metrics = cfg, state, verifier, metrics
        self.copy_max_bytes = int(cfg.serving_copy_max_mb * 2**20)
        self.lock = threading.Lock()  # taken through :meth:`changing` and :meth:`close`
        # Set when the runtime starts closing: no change starts after it, and a training run or refinement in
        # progress ends at its next batch (run_training's ``stop``).
        self.closing = threading.Event()
        self._training_problems: dict[str, str] = {}
        self.serving = self._open_initial(cfg.bundle)

    # -- who may change the model
    @contextmanager
    def changing(self) -> Iterator[bool]:
        """Hold the lock while changing the model or reading the stores; yields False once the runtime is
        closing (then change and read nothing: the stores are being closed).
        """
        with self.lock:
            yield not self.closing.is_set()

    def close(self, then: Callable[[], None], timeout: float = 60) -> None:
        """Mark the runtime closing, wait up to ``timeout`` for a change in progress and call ``then`` (which
        closes the stores) holding the lock; a change that waits for the lock finds the runtime closing.
        """
        self.closing.set()
        locked = self.lock.acquire(timeout=timeout)
        if not locked:
            log.warning("a model change did not finish within %.0f s; closing anyway", timeout)
        try:
            then()
        finally:
            if locked:
                self.lock.release()

    # -- opening
    def recover(self, store: SampleStore, outbox: Outbox) -> None:
        """After a crash: roll a committed generation whose delta was kept forward, discard the others,
        and never retrain samples a kept delta already used.
        """
        upto = max(int(store.get_meta("trained_upto", "0") or 0), outbox.max_trained_upto())
        store.set_meta("trained_upto", str(upto))
        pointer = self.state.read_pointer()
        if pointer is None:
            return
        kept = outbox.known_ids()
        for n in self.state.generations():
            if n <= pointer.generation:
                continue
            try:
                info = self.state.verify_generation(n)
            except BundleError:
                info = {}
            if (info.get("bundle") == pointer.bundle and info.get("parent") == pointer.generation
                    and info.get("delta_id") in kept):
                log.warning("rolling forward to generation %d (its delta was kept before a crash)", n)
                pointer = Pointer(pointer.bundle, n)
                self.state.write_pointer(pointer)
                self.serving = self.open(pointer)
            else:
                log.warning("discarding generation %d, left unfinished by a crash", n)
                self.state.discard_generation(n)

    def open(self, pointer: Pointer) -> ServingModel:
        """The model of ``pointer``'s generation; a generation that cannot serve falls back to its parent."""
        bundle_dir = self.state.bundle_dir(pointer.bundle)
        from eclm.manifest import verify_bundle
        from eclm.onnx_weights import read_initializers

        manifest = verify_bundle(bundle_dir, self.verifier)
        base = read_initializers(bundle_dir / "model.onnx")
        gen = pointer.generation
        while gen > 0:
            try:
                info = self.state.verify_generation(gen)
                if info.get("bundle") != pointer.bundle:
                    raise BundleError(f"generation {gen} belongs to another bundle", hint="skipped")
                own = read_params(self.state.gen_dir(gen), base)
                versions = info.get("module_versions")
                return self._checked(ServingModel(
                    manifest, bundle_dir, pointer.bundle, gen, bundle_dir / "model.onnx", {**base, **own},
                    frozenset(own), {k: int(v) for k, v in versions.items()} if versions else None,
                    str(info.get("line", "")), copy_max_bytes=self.copy_max_bytes))
            except BundleError as exc:
                log.error("cannot serve generation %d (%s); falling back to its parent", gen, exc.message)
                gen = int(self._parent_of(gen))
        return self._checked(ServingModel(manifest, bundle_dir, pointer.bundle, 0, bundle_dir / "model.onnx", base,
                                          copy_max_bytes=self.copy_max_bytes))

    def current(self) -> ServingModel:
        """The serving model now (for components that hold this getter and read it later)."""
        return self.serving

    def _checked(self, serving: ServingModel) -> ServingModel:
        """Whether this runtime can train ``serving``'s bundle: its step graph is loaded once per bundle."""
        if not serving.manifest.training.get("available"):
            return serving
        problems = self._training_problems
        if serving.digest not in problems:
            if not serving.manifest.training.get("step"):
                problems[serving.digest] = ("the bundle carries no training step graph (made by an older "
                                            "eclm-export); re-export it to train on this device")
            else:
                try:
                    open_runner(serving)
                    problems[serving.digest] = ""
                except TrainingUnavailableError as exc:
                    problems[serving.digest] = exc.message
                    log.error("this bundle serves but cannot train here: %s", exc.message)
                release_memory()
        serving.training_problem = problems[serving.digest]
        return serving

    def _parent_of(self, gen: int) -> int:
        try:
            return int(json.loads((self.state.gen_dir(gen) / "generation.json").read_text()).get("parent", 0))
        except (OSError, ValueError):
            return 0

    def _open_initial(self, bundle: Path | None) -> ServingModel:
        pointer = self.state.read_pointer()
        if bundle is not None:
            try:
                digest, manifest = self.state.install_bundle(bundle, self.verifier, self.made_for(update=False))
            except BundleError as exc:
                self.metrics.bundle_rejections.inc()
                if pointer is None:
                    raise
                log.error("refusing bundle %s: %s; serving the previous one", bundle, exc.message)
            else:
                replaced = self.state.replay_reason(digest, manifest) if pointer is not None else None
                if replaced is not None and pointer is not None:
                    try:  # the bundle argument was replaced by an update since: what replaced it serves on
                        serving = self.open(pointer)
                        log.warning("not serving --bundle %s: %s; serving %s", bundle, replaced, pointer.bundle)
                        return serving
                    except BundleError as exc:
                        log.error("the bundle that replaced --bundle cannot serve (%s); serving --bundle", exc.message)
                if pointer is None or pointer.bundle != digest:
                    pointer = Pointer(digest, 0)
                    self.state.write_pointer(pointer)
        if pointer is None:
            raise BundleError(
                f"nothing to serve: no --bundle given and no bundle installed in {self.cfg.state_dir}",
                hint="pass --bundle DIR (a folder made by eclm-export)",
            )
        return self.open(pointer)

    def made_for(self, update: bool) -> MadeFor:
        """Who a bundle must be made for: an update from the cloud names this device and its profile; a local
        bundle may name no device, and its profile is checked only when profile_name is configured.
        """
        profile = self.cfg.profile_name or (self.serving.manifest.profile_name if update else None)
        return MadeFor(self.cfg.device_id, profile or None, require_device=update)

    def install_bundle(self, bundle: Path) -> dict[str, Any]:
        """Verify and swap in a new bundle; a bad one is refused and the current one keeps serving."""
        try:
            digest, _ = self.state.install_bundle(bundle, self.verifier, self.made_for(update=False))
            new = self.open(Pointer(digest, 0))
        except BundleError:
            self.metrics.bundle_rejections.inc()
            raise
        with self.changing() as open_:
            if not open_:
                raise EclmError(CLOSING, hint="install it again once the runtime has restarted")
            self.state.write_pointer(Pointer(digest, 0))
            self.serving = new
        return {"bundle": digest, "generation": 0}

    # -- the one commit-or-roll-back path
    def trial(self, candidate: ServingModel, holdout: Holdout, *, record: dict[str, Any] | None,
              unjudged_serves: bool, keep: Callable[[Trial], None] | None = None) -> Trial:
        """Judge ``candidate`` against what serves on ``holdout``; serve it if not worse, else keep serving.

        ``record`` (the generation's own fields) makes the candidate a new generation of the serving bundle,
        stored with the values it holds apart from the bundle's; without it the candidate is generation 0 of
        its own bundle. Without holdout samples nothing is judged and ``unjudged_serves`` decides. ``keep``
        runs after a served generation is committed and before the pointer moves (a training run keeps its
        delta there). Call it holding :attr:`lock`.
        """
        serving = self.serving
        work = self.state.new_generation_workdir() if record is not None else None
        try:
            if work is not None:
                write_params(work, candidate.trained)  # the generation's files first, then the holdout gate
            before = serving.accuracy(holdout.x, holdout.y)
            after = candidate.accuracy(holdout.x, holdout.y)
            verdict = judge(serving, candidate, holdout) if len(holdout) else None
            trial = Trial(before, after, verdict, verdict.not_worse if verdict is not None else unjudged_serves)
            # Order for kill -9 at any point: the generation is committed, then what ``keep`` keeps (a delta
            # records the samples it used), then the pointer moves. On restart a committed generation whose
            # delta was kept is rolled forward; one without is discarded and its samples retrained.
            if trial.served and work is not None and record is not None:
                n = self.state.next_generation()
                self.state.commit_generation(work, n, {
                    "bundle": serving.digest, "parent": serving.generation, **record,
                    "holdout_before": before, "holdout_after": after, "module_versions": candidate.module_versions,
                    "line": candidate.line,
                })
                candidate.generation = n
            if keep is not None:
                keep(trial)
            if trial.served:
                self.state.write_pointer(Pointer(candidate.digest, candidate.generation))
                self.serving = candidate  # requests in flight keep the session object they already hold
            value = after if trial.served else before  # the holdout accuracy of what serves now
            if value == value:
                self.metrics.holdout_accuracy.set(float(value))
            return trial
        finally:
            if work is not None and work.exists():
                shutil.rmtree(work, ignore_errors=True)
