"""Small models are served from the session's own optimized copy of the weights, large ones read them in place.

Both must answer with the generation's values (trained or received), never the bundle file's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_edge_support import make_service

from eclm.errors import BundleError
from eclm.onnx_weights import model_with_initializers, read_initializers
from eclm.train_step import open_session
from edge_runtime.generations import with_values


def _changed(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (a * rng.uniform(0.5, 1.5, a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a
            for n, a in weights.items()}


def test_the_own_copy_session_answers_with_the_given_values_not_the_files(pi4: Path, xy) -> None:
    path = pi4 / "model.onnx"
    changed = _changed(read_initializers(path))
    shared, _kept = open_session(path, changed)
    own, kept = open_session(path, changed, own_copy=True)
    from_file, _ = open_session(path, read_initializers(path), own_copy=True)
    name = shared.get_inputs()[0].name
    x = xy[0][:16]
    got, want = own.run(None, {name: x})[0], shared.run(None, {name: x})[0]
    assert kept == []  # nothing shared: the session holds its copy
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(from_file.run(None, {name: x})[0] - want).max() > 1e-2  # the values did change the answer


def test_a_value_of_another_size_is_refused(pi4: Path) -> None:
    path = pi4 / "model.onnx"
    weights = read_initializers(path)
    name = next(n for n, a in weights.items() if a.dtype.kind == "f" and a.size > 1)
    with pytest.raises(BundleError, match="bytes"):
        model_with_initializers(path, {name: weights[name][:1]})


@pytest.mark.parametrize("copy_max_mb", [0.0, 16.0])
def test_both_ways_serve_a_candidates_values(pi4: Path, xy, tmp_path: Path, copy_max_mb: float) -> None:
    svc = make_service(tmp_path / "state", pi4, serving_copy_max_mb=copy_max_mb)
    try:
        serving = svc.serving
        assert serving.own_copy is (copy_max_mb > 0)  # the digits model is far below 16 MB
        candidate = with_values(serving, {n: a for n, a in _changed(serving.weights).items() if n in serving.weights})
        assert candidate.own_copy is serving.own_copy
        reference, _kept = open_session(serving.model_path, candidate.weights)
        x = xy[0][:16]
        want = reference.run(None, {reference.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(candidate.logits(x), want, rtol=1e-4, atol=1e-4)
        probs = candidate.predict(x)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        assert (probs.argmax(axis=1) == want.argmax(axis=1)).all()
    finally:
        svc.close()
