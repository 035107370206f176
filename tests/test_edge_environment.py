"""Environment lines on the device (issue 14): where it works, what its deltas say, which updates it takes.

Real parts: the digits pi4 bundle served and trained by the edge runtime with ONNX Runtime, its state
directory on disk, `eclm-edge serve` over a socket for the HTTP endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_edge_support import EdgeServer, make_service

from eclm.errors import ConfigError, DataError
from edge_runtime.config import load_config
from edge_runtime.outbox import Outbox
from edge_runtime.sync import delta_message


def _head(svc: Any, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {n.removeprefix("net."): scale * svc.serving.weights[n] for n in ("net.head.fc.weight", "net.head.fc.bias")}


def test_the_environment_is_recorded_kept_and_checked(pi4: Path, tmp_path: Path) -> None:
    svc = make_service(tmp_path / "s", pi4)
    try:
        assert svc.environment == "" and svc.status()["environment"] == ""
        events: list[tuple[str, dict[str, Any]]] = []
        svc.listeners.append(lambda e, d: events.append((e, d)))
        assert svc.set_environment("line-3") == {"environment": "line-3", "changed": True, "line": ""}
        assert svc.set_environment("line-3")["changed"] is False
        assert [e for e, _ in events] == ["environment"]  # told once: the sync side sends a profile then
        with pytest.raises(DataError, match="environment"):
            svc.set_environment("line/3")
        assert svc.environment == "line-3"
    finally:
        svc.close()
    again = make_service(tmp_path / "s", pi4)  # kept across a restart
    try:
        assert again.environment == "line-3"
    finally:
        again.close()
    configured = make_service(tmp_path / "s", pi4, environment="site_a.cam2")  # a setting wins when given
    try:
        assert configured.environment == "site_a.cam2"
    finally:
        configured.close()
    with pytest.raises(ConfigError, match="environment"):
        load_config(overrides={"bundle": pi4, "environment": "a b"}, environ={})


def test_updates_of_another_environment_are_refused_and_a_new_line_counts_afresh(pi4: Path, xy, tmp_path: Path
                                                                                ) -> None:
    svc = make_service(tmp_path / "s", pi4)
    try:
        svc.set_environment("line-a")
        version = svc.serving.module_versions["head"]
        other = svc.apply_module_update({"head": version + 5}, _head(svc, 1.01), "line-b")
        assert other["applied"] is False and "line-b" in other["reason"] and svc.serving.line == ""
        shared = svc.apply_module_update({"head": version + 5}, _head(svc, 1.01), "")
        assert shared["applied"] is False  # the shared line's update is not for a device in line-a
        # line-a counts from its own start: a lower number than this bundle's is still new here
        applied = svc.apply_module_update({"head": 1}, _head(svc, 1.01), "line-a")
        assert applied["applied"] is True, applied
        assert svc.serving.line == "line-a" and svc.serving.module_versions["head"] == 1
        np.testing.assert_allclose(svc.serving.weights["net.head.fc.bias"], _head(svc)["head.fc.bias"])
        assert svc.apply_module_update({"head": 1}, _head(svc, 1.01), "line-a")["applied"] is False  # not newer
    finally:
        svc.close()
    again = make_service(tmp_path / "s", pi4)  # the generation records its line
    try:
        assert again.serving.line == "line-a" and again.serving.module_versions["head"] == 1
    finally:
        again.close()


def test_a_delta_names_its_environment_and_the_line_of_its_base(pi4: Path, xy, tmp_path: Path) -> None:
    x, y = xy
    svc = make_service(tmp_path / "s", pi4, device_id="board-e")
    try:
        svc.set_environment("line-a")
        svc.add_samples(x[:120], y[:120].tolist())
        svc.train_now()
        entry = Outbox.read(svc.outbox.pending()[0])
        assert entry.meta["environment"] == "line-a" and entry.meta["base_environment"] == ""
        assert "head" not in entry.meta["parts"] and entry.meta["parts"]  # the cloud merges no head from a line
        assert not any(name.startswith("head.") for name in entry.tensors)
        msg = delta_message(svc, svc.outbox.pending()[0])
        assert (msg.environment, msg.base_environment) == ("line-a", "")
    finally:
        svc.close()
    shared = make_service(tmp_path / "t", pi4, device_id="board-f")  # in no environment the head is sent
    try:
        shared.add_samples(x[:120], y[:120].tolist())
        shared.train_now()
        assert "head" in Outbox.read(shared.outbox.pending()[0]).meta["parts"]
    finally:
        shared.close()


def test_the_environment_endpoint(pi4: Path, tmp_path: Path) -> None:
    srv = EdgeServer(tmp_path / "state", pi4, ["--train-every", "0", "--environment", "line-1"]).start()
    try:
        assert srv.request("GET", "/v1/status").json()["environment"] == "line-1"
        r = srv.request("POST", "/v1/environment", {"environment": "line-2"})
        assert r.status == 200 and r.json()["environment"] == "line-2" and r.json()["changed"] is True
        bad = srv.request("POST", "/v1/environment", {"environment": "../x"})
        assert bad.status == 400 and "environment" in bad.json()["error"]
        missing = srv.request("POST", "/v1/environment", {"name": "x"})
        assert missing.status == 400 and "environment" in missing.json()["error"]
        assert srv.request("GET", "/v1/status").json()["environment"] == "line-2"
    finally:
        srv.stop()
