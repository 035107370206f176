"""The PyTorch baselines of the edge benchmark: the bundle's sub-model and optimizer in PyTorch, and the
cloud-venv children that run them (A: ``torch-memory``, D: ``train-torch``).

Torch and the exporter are imported inside the functions, so this module imports in the edge venv too.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.edge_common import pcts, read_manifest, status_bytes, torch_importable


def _trainable_prefixes(parts: list[str]) -> list[str]:
    """Sub-model parameter prefixes of bundle part ids (``L{l}M{i}`` and ``head``)."""
    from eclm.parts import onnx_prefixes

    return [prefix for p in parts for prefix in onnx_prefixes(p)]


def torch_submodel(spec: dict[str, Any]) -> Any:
    """The bundle's sub-model in PyTorch, BatchNorm in eval mode, the bundle's trainable parts trainable."""
    import torch

    from exporter.modular import ModularNet, SubModel
    from exporter.onnx_export import Normalised

    if spec["build"] == "bank":  # as the exporter builds it: the full model, then the sub-model
        from exporter.torchio import model_from_bank
        from module_bank import DirectoryBank

        sub = Normalised(SubModel(model_from_bank(DirectoryBank(Path(spec["bank"]))), spec["selection"]),
                         spec["mean"], spec["std"])
    else:  # only the sub-model's own tensors: no full model in memory
        from safetensors.torch import load_file

        from exporter.config import ModelConfig

        cfg = ModelConfig.from_dict(spec["config"])
        with torch.device("meta"):
            sub = Normalised(SubModel(ModularNet(cfg), spec["selection"]), spec["mean"], spec["std"])
        sub.load_state_dict(load_file(spec["state"]), strict=True, assign=True)
    sub.eval()
    prefixes = _trainable_prefixes(spec["trainable_parts"])
    for name, p in sub.named_parameters():
        p.requires_grad_(any(name.startswith(pre) for pre in prefixes))
    return sub


def torch_optimizer(sub: Any, lr: float, optimizer: dict[str, Any]) -> Any:
    """The update rule of the bundle's step graph (its manifest's ``training.optimizer``) in PyTorch."""
    from exporter.step_graph import OptimizerSpec

    return OptimizerSpec.from_dict(optimizer).torch_optimizer([p for p in sub.parameters() if p.requires_grad], lr)


def child_torch_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Cloud venv: the same predictions and training steps as the edge child, with PyTorch."""
    rss_start = status_bytes("VmRSS")
    import torch
    import torch.nn.functional as F  # noqa: N812

    import exporter.modular  # noqa: F401
    import exporter.onnx_export  # noqa: F401

    rss_imports = status_bytes("VmRSS")
    data = np.load(spec["data"])
    sub = torch_submodel(spec)
    opt = torch_optimizer(sub, spec["learning_rate"], spec["optimizer"])
    preds = []
    with torch.inference_mode():
        for x in data["x_pred"]:
            preds.append(int(sub(torch.from_numpy(x[None])).argmax(1)))
    # The runtime's sample store holds out every holdout_every-th sample (ids from 1).
    ids = np.arange(1, len(data["y"]) + 1)
    tr, ho = ids % spec["holdout_every"] != 0, ids % spec["holdout_every"] == 0
    xt, yt = torch.from_numpy(data["x"][tr]), torch.from_numpy(data["y"][tr].astype(np.int64))
    xh, yh = torch.from_numpy(data["x"][ho]), torch.from_numpy(data["y"][ho].astype(np.int64))

    def holdout_acc() -> float:
        with torch.inference_mode():
            return float((sub(xh).argmax(1) == yh).float().mean())

    phases: dict[str, dict[str, int]] = {}

    def mark(name: str) -> None:
        phases[name] = {"rss_bytes": status_bytes("VmRSS"), "peak_bytes": status_bytes("VmHWM")}

    mark("predictions")
    before = holdout_acc()
    rng = np.random.default_rng(0)
    steps, losses = 0, []
    for _ in range(spec["epochs"]):
        order = torch.from_numpy(rng.permutation(len(yt)))
        for i in range(0, len(order), spec["batch_size"]):
            idx = order[i : i + spec["batch_size"]]
            loss = F.cross_entropy(sub(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            steps += 1
    mark("trained")
    after = holdout_acc()
    with torch.inference_mode():
        for x in data["x_pred"][:4]:
            preds.append(int(sub(torch.from_numpy(x[None])).argmax(1)))
    n_train = sum(p.numel() for p in sub.parameters() if p.requires_grad)
    return {"rss_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports, "peak_bytes": status_bytes("VmHWM"),
            "rss_end_bytes": status_bytes("VmRSS"), "predictions": len(preds), "steps": steps, "phases": phases,
            "loss_first": losses[0], "loss_last": losses[-1], "holdout_before": before, "holdout_after": after,
            "trainable_tensors": sum(1 for p in sub.parameters() if p.requires_grad), "trainable_params": n_train,
            "threads": torch.get_num_threads(), "build": spec["build"],
            "torch_in_sys_modules": "torch" in sys.modules, "torch_importable": torch_importable()}


def child_train_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """Cloud venv, alone in its process: PyTorch CPU steps of the same sub-model on the same batch."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.set_num_threads(spec["threads"])
    data = np.load(spec["data"])
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    sub = torch_submodel(spec)
    opt = torch_optimizer(sub, spec["learning_rate"], spec["optimizer"])

    def step() -> float:
        loss = F.cross_entropy(sub(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        step()
    ms = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        loss = step()
        ms.append((time.perf_counter() - t) * 1e3)
    return {"torch": pcts(ms, (50, 90)), "steps_timed": len(ms), "loss_last": loss, "threads": torch.get_num_threads(),
            "trainable_tensors": sum(1 for p in sub.parameters() if p.requires_grad)}


_SAVED_THIS_RUN: set[Path] = set()


def torch_spec(bundle: Path, bank: Path, work: Path, build: str) -> dict[str, Any]:
    """What a torch child needs to build the bundle's sub-model (``meta``: from the sub-model's own tensors)."""
    from module_bank import DirectoryBank

    man = read_manifest(bundle)
    info = DirectoryBank(bank).info()
    spec = {"build": build, "bank": str(bank), "selection": man["selection"], "config": info.config,
            "mean": info.normalisation["mean"], "std": info.normalisation["std"],
            "trainable_parts": man["training"]["trainable_parts"], "optimizer": man["training"]["optimizer"]}
    if build == "meta":
        state = work / f"sub-{bundle.name}.safetensors"
        if state not in _SAVED_THIS_RUN:  # written by this run's code, never reused from a kept --work
            _SAVED_THIS_RUN.add(state)
            from safetensors.torch import save_file

            sub = torch_submodel({**spec, "build": "bank"})
            save_file({k: v.contiguous() for k, v in sub.state_dict().items()}, str(state))
        spec["state"] = str(state)
    return spec
