"""Refined module updates (issue 14, ``refine_updates``): a device fine-tunes a received update on its own
samples before judging it, serves the refined model if it is not worse, and sends the refinement's delta
counted from the received versions.

Real parts: the digits pi4 bundle served and trained by the edge runtime with ONNX Runtime, its state
directory and outbox on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from test_edge_support import make_service

from eclm.parts import ONNX_PREFIX, part_of
from edge_runtime.outbox import Outbox


def _module_update(svc: Any) -> tuple[str, dict[str, np.ndarray]]:
    """A layer module the device trains, and its serving values (bank names) as the cloud would send them,
    nudged. Which modules the sub-model holds and trains depends on what the bank learned on this machine:
    take the first one with parameters served here."""
    for part in (p for p in svc.serving.module_versions if p.startswith("L")):
        out = {}
        for name, arr in svc.serving.weights.items():
            bank = name.removeprefix(ONNX_PREFIX)
            if name.startswith(ONNX_PREFIX) and part_of(bank) == part and arr.dtype == np.float32:
                out[bank] = arr * np.float32(1.01)
        if out:
            return part, out
    raise AssertionError(f"no layer module with parameters among {sorted(svc.serving.module_versions)}")


def test_a_refined_update_serves_fine_tuned_and_sends_its_delta(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    # No holdout sample among the 200 (every 1000th is one): the refined model serves unjudged, so the test
    # does not depend on what the run happens to learn.
    svc = make_service(tmp_path / "s", pi4, device_id="board-r", refine_updates=True, environment="line-a",
                       holdout_every=1000)
    try:
        svc.add_samples(x[:200], y[:200].tolist())
        part, sent = _module_update(svc)
        result = svc.apply_module_update({part: 1}, sent, "line-a")
        assert result["refined"] is True and result["applied"] is True and "refined here" in result["reason"]
        assert svc.serving.module_versions[part] == 1 and svc.serving.line == "line-a"
        served = {b: svc.serving.weights[ONNX_PREFIX + b] for b in sent}
        assert any(not np.allclose(served[b], sent[b]) for b in sent)  # fine-tuned from what came
        entry = Outbox.read(svc.outbox.pending()[0])  # the refinement's delta, from the received versions
        assert entry.meta["parts"][part]["base_version"] == 1 and entry.meta["base_environment"] == "line-a"
        for b in entry.meta["parts"][part]["params"]:
            np.testing.assert_allclose(entry.tensors[b], served[b] - sent[b], atol=1e-5)
    finally:
        svc.close()
    again = make_service(tmp_path / "s", pi4, holdout_every=1000)  # the refined generation survives a restart
    try:
        assert again.serving.module_versions[part] == 1 and again.serving.line == "line-a"
        for b in sent:
            np.testing.assert_array_equal(again.serving.weights[ONNX_PREFIX + b], served[b])
    finally:
        again.close()


def test_without_refinement_or_samples_an_update_is_judged_as_it_came(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    for name, refine, samples in (("off", False, 200), ("few", True, 5)):
        svc = make_service(tmp_path / name, pi4, refine_updates=refine, min_train_samples=16)
        try:
            svc.add_samples(x[:samples], y[:samples].tolist())
            part, sent = _module_update(svc)
            result = svc.apply_module_update({part: 9}, sent, "")
            assert result["refined"] is False
            if result["applied"]:
                for b, arr in sent.items():
                    np.testing.assert_array_equal(svc.serving.weights[ONNX_PREFIX + b], arr)
            assert len(svc.outbox) == 0  # nothing trained here, nothing to send
        finally:
            svc.close()


def test_closing_waits_for_an_update_being_applied(pi4: Path, xy, tmp_path: Path) -> None:
    """A refined update trains for a while; closing the runtime meanwhile stops that run at its next batch and
    lets the update finish (judged as it came) instead of pulling the sample store from under it."""
    import threading
    import time

    x, y = xy
    svc = make_service(tmp_path / "s", pi4, refine_updates=True, epochs=8, resource_interval_s=0, drift=False)
    svc.add_samples(x[:300], y[:300].tolist())
    part, sent = _module_update(svc)
    outcome: dict[str, Any] = {}

    def apply() -> None:
        try:
            outcome["result"] = svc.apply_module_update({part: 9}, sent, "")
        except Exception as exc:  # what closing the store mid-update raised before the fix
            outcome["error"] = exc

    t = threading.Thread(target=apply)
    t.start()
    deadline = time.monotonic() + 30
    while not svc.generations.lock.locked() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert svc.generations.lock.locked()  # the update is being applied now
    t0 = time.monotonic()
    svc.close()
    assert time.monotonic() - t0 < 30  # not the whole run (8 epochs)
    t.join(60)
    assert "error" not in outcome, outcome.get("error")
    # Either the refinement stopped with the runtime and the update was judged as it came, or closing took
    # the lock first and the update found the runtime closed: never a closed store under a running update.
    assert outcome["result"].get("refined") is False or "closing" in outcome["result"]["reason"]


def test_an_update_after_closing_changes_and_reads_nothing(pi4: Path, xy, tmp_path: Path) -> None:
    """An update that arrives once the runtime has closed (a late MQTT message) is refused with a reason,
    never by reading the closed sample store; so is a bundle archive and a gauge refresh after it."""
    x, y = xy
    svc = make_service(tmp_path / "s", pi4, resource_interval_s=0, drift=False)
    svc.add_samples(x[:50], y[:50].tolist())
    part, sent = _module_update(svc)
    svc.close()
    for environment in ("", "line-b"):  # the environment is checked after the runtime's state, not before
        result = svc.apply_module_update({part: 9}, sent, environment)
        assert result["applied"] is False and "closing" in result["reason"]
    assert svc.learning.run_now()["reason"].startswith("the runtime is closing")
