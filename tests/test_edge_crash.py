"""`kill -9` of `eclm-edge serve` at different moments of a fine-tuning run: the restart serves a whole model.

The serve process is killed with SIGKILL (no handler runs) while it trains, writes the delta, commits a
generation or swaps the pointer; a new `serve` on the same state dir must answer predictions from a
generation whose files verify, hold every acknowledged sample, and leave no half-written folder behind.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_edge_support import EdgeServer, generation_problems, temporaries

from eclm.manifest import BundleManifest, bundle_digest, verify_bundle
from edge_runtime.outbox import Outbox
from edge_runtime.state import PARAMS

Bundles = dict[str, tuple[Path, BundleManifest]]
SERVE_ARGS = ["--train-every", "0", "--epochs", "8"]  # a run of ~0.5 s: long enough to be hit at a delay


def _rows(x: np.ndarray) -> list:
    return x.reshape(len(x), -1).tolist()


def _post_samples(srv: EdgeServer, x: np.ndarray, y: np.ndarray) -> None:
    for i in range(0, len(y), 200):
        r = srv.request("POST", "/v1/samples", {"inputs": _rows(x[i : i + 200]), "labels": y[i : i + 200].tolist()})
        assert r.status == 200, r.body


def _gens(state: Path) -> list[Path]:
    return sorted(p for p in (state / "gens").iterdir() if p.name.isdigit())


def _wait_for(condition: Any, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _train_and_kill(srv: EdgeServer, state: Path, phase: str) -> str:
    """POST /v1/train, then SIGKILL at ``phase``; returns what the state dir showed at the kill."""
    deltas, gens = len(Outbox(state / "outbox")), len(_gens(state))
    r = srv.request("POST", "/v1/train")
    assert r.status in (202, 409), r.body  # 409: a run (started by drift on the samples) is already going
    work = state / "gens"
    if phase.startswith("delay-"):
        delay = float(phase.removeprefix("delay-"))
        if delay:
            time.sleep(delay)
    elif phase == "workdir":  # training has begun in its temporary folder
        _wait_for(lambda: any(work.glob(".tmp-*")))
    elif phase == "exported":  # the trained model is written, the holdout gate is about to run
        _wait_for(lambda: any(work.glob(f".tmp-*/{PARAMS}")))
    elif phase == "delta-written":  # the delta is in the outbox; the commit and the pointer swap follow
        _wait_for(lambda: len(list((state / "outbox").glob("*.delta"))) > deltas)
    elif phase == "committed":  # the work folder was renamed into gens/ (or dropped): the pointer swap is next
        _wait_for(lambda: len(list((state / "outbox").glob("*.delta"))) > deltas and not any(work.glob(".tmp-*")))
    elif phase == "finished":  # the run is over and the new generation (if any) serves
        srv.wait_training()
    else:
        raise AssertionError(phase)
    srv.kill()
    seen = [f"tmp={len(temporaries(state))}", f"deltas+={len(Outbox(state / 'outbox')) - deltas}",
            f"gens+={len(_gens(state)) - gens}",
            f"pointer-gen={json.loads((state / 'current.json').read_text())['generation']}"]
    return " ".join(seen)


def _check_recovered(state: Path, bundle: Path, held: int, x: np.ndarray) -> dict[str, Any]:
    """Restart on ``state``: whole generation, every sample, no temporaries, readable outbox."""
    srv = EdgeServer(state, bundle, SERVE_ARGS).start()
    try:
        st = srv.status()
        assert temporaries(state) == [], temporaries(state)
        digest = bundle_digest(bundle)
        gen = st["bundle"]["generation"]
        assert st["bundle"]["digest"] == digest
        assert json.loads((state / "current.json").read_text()) == {"bundle": digest, "generation": gen}
        if gen:
            assert generation_problems(state, gen) == []
        for folder in _gens(state):  # a committed generation is whole, even one the pointer never reached
            assert generation_problems(state, int(folder.name)) == [], folder
        verify_bundle(state / "bundles" / digest)
        assert st["samples"]["held"] == held
        for path in Outbox(state / "outbox").pending():
            Outbox.read(path)  # no torn delta
        r = srv.request("POST", "/v1/predict", {"inputs": _rows(x[:8])})
        assert r.status == 200, r.body
        out = r.json()
        assert out["generation"] == gen and np.allclose(np.asarray(out["probabilities"]).sum(axis=1), 1, atol=1e-4)
        return st
    finally:
        srv.kill()


PHASES = ["delay-0", "delay-0.05", "delay-0.2", "delay-0.5", "workdir", "exported", "delta-written", "committed",
          "finished"]


@pytest.mark.parametrize("phase", PHASES)
def test_kill_during_training_then_restart(phase: str, pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    state = tmp_path / "state"
    srv = EdgeServer(state, pi4, SERVE_ARGS).start()
    try:
        _post_samples(srv, x, y)
        seen = _train_and_kill(srv, state, phase)
    finally:
        srv.kill()
    st = _check_recovered(state, pi4, len(y), x)
    print(f"\nkilled at {phase}: {seen}; restarted on generation {st['bundle']['generation']}")


def test_repeated_kills_on_one_state_dir(pi4: Path, xy, tmp_path: Path) -> None:
    """Each round adds samples, trains and is killed at another moment; generations build on each other."""
    x, y = xy
    state = tmp_path / "state"
    rounds = ["finished", "exported", "committed", "delta-written"]
    chunk = len(y) // len(rounds)
    held = 0
    report = []
    for i, phase in enumerate(rounds):
        srv = EdgeServer(state, pi4, SERVE_ARGS).start()
        try:
            _post_samples(srv, x[i * chunk : (i + 1) * chunk], y[i * chunk : (i + 1) * chunk])
            held += chunk
            seen = _train_and_kill(srv, state, phase)
        finally:
            srv.kill()
        st = _check_recovered(state, pi4, held, x)
        report.append(f"{phase}: {seen} -> gen {st['bundle']['generation']}")
    print("\n" + "\n".join(report))

    # after all that, a run that is left alone finishes normally
    srv = EdgeServer(state, pi4, SERVE_ARGS).start()
    try:
        assert srv.request("POST", "/v1/train").status == 202
        last = srv.wait_training()["training"]["last"]
        assert last.get("delta_id"), last
        if last["accepted"]:
            assert last["generation"] == max(int(p.name) for p in _gens(state))
            info = json.loads((state / "gens" / f"{last['generation']:06d}" / "generation.json").read_text())
            assert info["parent"] < last["generation"]
    finally:
        srv.kill()
    _check_recovered(state, pi4, held, x)


def test_kill_while_samples_arrive(pi4: Path, xy, tmp_path: Path) -> None:
    """Every acknowledged sample survives; at most the one batch in flight may or may not be stored."""
    x, y = xy
    state = tmp_path / "state"
    srv = EdgeServer(state, pi4, SERVE_ARGS).start()
    acked = 0
    batch = 7
    stop = threading.Event()

    def feed() -> None:
        nonlocal acked
        i = 0
        while not stop.is_set():
            lo = (i * batch) % (len(y) - batch)
            try:
                r = srv.request("POST", "/v1/samples",
                                {"inputs": _rows(x[lo : lo + batch]), "labels": y[lo : lo + batch].tolist()}, timeout=5)
            except OSError:
                return
            if r.status != 200:
                return
            acked += batch
            i += 1

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert _wait_for(lambda: acked >= 10 * batch, timeout=30)
    finally:
        srv.kill()
        stop.set()
        feeder.join(timeout=30)
    srv = EdgeServer(state, pi4, SERVE_ARGS).start()
    try:
        held = srv.status()["samples"]["held"]
        assert acked <= held <= acked + batch, (acked, held)
        assert srv.request("POST", "/v1/predict", {"inputs": _rows(x[:2])}).status == 200
    finally:
        srv.kill()
    print(f"\n{acked} samples acknowledged before the kill, {held} held after the restart")


def test_leftover_temporaries_are_removed_on_start(pi4: Path, xy, tmp_path: Path) -> None:
    """What a kill during a bundle install or a training run leaves behind is cleared by the next start."""
    state = tmp_path / "state"
    srv = EdgeServer(state, pi4, SERVE_ARGS).start()
    srv.kill()
    half_bundle = state / "bundles" / ".tmp-abc123"
    half_bundle.mkdir()
    (half_bundle / "model.onnx").write_bytes(b"half")
    half_gen = state / "gens" / ".tmp-def456"
    half_gen.mkdir()
    (half_gen / PARAMS).write_bytes(b"half")
    _check_recovered(state, pi4, 0, xy[0])
    assert not half_bundle.exists() and not half_gen.exists()
