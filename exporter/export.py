"""`eclm-export` as a library call: importance, derivation, the ONNX graphs and training step, checks, the bundle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import eclm.parts as parts_grammar
from device_profiles import DeviceProfile, load_profile
from eclm import __version__
from eclm.errors import DataError, ExportValidationError, InfeasibleBudgetError
from eclm.manifest import MANIFEST, BundleManifest, write_manifest
from eclm.parts import fixed_part_ids, module_id
from eclm.signing import Signer, load_signer
from eclm.train_step import STEP_FILE
from exporter.artifacts import TRAIN_FOLDER, TrainingPlan, plan_training
from exporter.config import ModelConfig
from exporter.costs import PartCost
from exporter.data import Dataset, load_dataset, split
from exporter.derive import Derivation, derive
from exporter.importance import importance_from_classes, importance_from_samples, read_importance_file
from exporter.modular import ModularNet, SelectorGraph, SubModel
from exporter.onnx_export import INPUT_NAME, Normalised, export_onnx, initializer_names
from exporter.step_graph import OptimizerSpec, export_step
from exporter.torchio import model_from_bank
from exporter.train import to_tensors
from exporter.validate import check_against_torch, check_step
from module_bank import open_store

Step = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """What `eclm-export` is asked to make."""

    bank_dir: Path | str  # a bank directory or a postgresql:// URL
    profile: str
    out_dir: Path
    classes: Sequence[int] | None = None
    importance_file: Path | None = None
    profiles_dir: Path | None = None
    measure: bool = True
    max_train_layers: int | None = None
    signing_key: Path | None = None  # Ed25519 private key (PEM): sign the manifest
    device_id: str | None = None  # the device the bundle is made for (None: any device)
    optimizer: str | None = None  # the training step's update rule ("adamw" or "sgd"); default: the config's


def part_of(name: str) -> str:
    """The bank part an exported initializer belongs to (names as in the sub-model's state dict)."""
    try:
        return parts_grammar.part_of(name)
    except DataError as exc:
        raise ExportValidationError(f"exported initializer {name!r} belongs to no bank part",
                                    hint="report this") from exc


@dataclass
class _Context:
    cfg: ModelConfig
    model: ModularNet
    profile: DeviceProfile
    mean: list[float]
    std: list[float]
    samples: np.ndarray  # raw proxy samples, for checks
    labels_y: np.ndarray
    value_range: tuple[float, float]
    labels: list[str]


def _importance(req: ExportRequest, ctx: _Context, x_norm: torch.Tensor) -> tuple[list[np.ndarray], dict[str, Any]]:
    sizes = [ls.num_modules for ls in ctx.cfg.layers]
    if req.importance_file is not None:
        return read_importance_file(req.importance_file, sizes), {"source": "importance-file",
                                                                  "file": str(req.importance_file)}
    if req.classes:
        imp = importance_from_classes(ctx.model, x_norm, ctx.labels_y, list(req.classes))
        return imp, {"source": "classes", "classes": sorted(int(c) for c in req.classes)}
    return importance_from_samples(ctx.model, x_norm), {"source": "proxy-data"}


def _probe(bundle: Path, mode: str) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "exporter.probe", str(bundle), mode],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    if out.returncode != 0:
        raise ExportValidationError(f"measuring the bundle ({mode}) failed: {out.stderr.strip()[-2000:]}",
                                    hint="the bundle does not load in ONNX Runtime; report this")
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_bundle(req: ExportRequest, step: Step | None = None) -> BundleManifest:
    """Derive the profile's sub-model from the bank and write a checked, measured bundle to ``out_dir``."""
    say = step or (lambda _msg: None)
    profile = load_profile(req.profile, req.profiles_dir)
    bank = open_store(req.bank_dir)
    info = bank.info()
    model = model_from_bank(bank)
    cfg = model.cfg
    ds = load_dataset(info.dataset)
    splits = split(ds, info.seed)
    proxy_x = np.concatenate([splits.train.x, splits.val.x])
    proxy_y = np.concatenate([splits.train.y, splits.val.y])
    mean, std = info.normalisation["mean"], info.normalisation["std"]
    ctx = _Context(cfg, model, profile, mean, std, proxy_x, proxy_y,
                   (float(ds.x.min()), float(ds.x.max())), [str(s) for s in info.labels])
    x_norm, _ = to_tensors(Dataset(ds.name, proxy_x, proxy_y, ds.labels), mean, std)
    importance, derived_for = _importance(req, ctx, x_norm)
    costs = {pid: PartCost(**rec.costs) for pid, rec in info.parts.items() if rec.costs}

    say(f"deriving the sub-model for {profile.name}")
    budgets = profile.budgets()
    derivation = derive(costs, importance, budgets)
    for _attempt in range(3):
        req.out_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{req.out_dir.name}.", dir=req.out_dir.parent))
        try:
            manifest, over = _build(req, ctx, info.bank_id, info.parts, derivation, derived_for, costs, work, say)
            if not over:
                _publish(work, req.out_dir)
                return manifest
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        # A measurement exceeded what the estimate allowed: derive again under proportionally tighter budgets.
        budgets = {**budgets, **{d: budgets[d] / r * 0.97 for d, r in over.items()}}
        say(f"measured {', '.join(f'{d} {r:.2f}x' for d, r in over.items())} the budget; deriving a smaller sub-model")
        derivation = derive(costs, importance, budgets)
    raise InfeasibleBudgetError(
        f"no sub-model measured within {profile.name}'s memory and transfer budgets after 3 attempts",
        hint="raise the profile's budgets or use a larger profile",
    )


def _publish(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the finished bundle in ``work``; a crash leaves one or the other."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(work, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out_dir)


def _build(
    req: ExportRequest,
    ctx: _Context,
    bank_id: str,
    parts: dict[str, Any],
    derivation: Derivation,
    derived_for: dict[str, Any],
    costs: dict[str, PartCost],
    work: Path,
    say: Step,
) -> tuple[BundleManifest, dict[str, float]]:
    cfg, profile = ctx.cfg, ctx.profile
    sub = Normalised(SubModel(ctx.model, derivation.selection), ctx.mean, ctx.std).eval()
    selector = Normalised(SelectorGraph(ctx.model), ctx.mean, ctx.std).eval()
    gate_names = [f"gate{layer}" for layer in range(len(cfg.layers))]
    say("exporting model.onnx and selector.onnx")
    export_onnx(sub, work / "model.onnx", cfg.input_shape, ["logits"])
    export_onnx(selector, work / "selector.onnx", cfg.input_shape, gate_names)

    rng = np.random.default_rng(0)
    lo, hi = ctx.value_range
    check_x = np.concatenate(
        [ctx.samples[:48], rng.uniform(lo, hi, size=(16, *cfg.input_shape)).astype(np.float32)]
    ).astype(np.float32)
    say("checking ONNX Runtime against PyTorch")
    validation: dict[str, Any] = {
        "model.onnx": check_against_torch(work / "model.onnx", sub, check_x, ["logits"]),
        "selector.onnx": check_against_torch(work / "selector.onnx", selector, check_x, gate_names),
    }

    variants = _export_variants(ctx, derivation, costs, work, check_x, validation, say)

    names = initializer_names(work / "model.onnx")
    param_names = {n for n, _ in sub.named_parameters()}
    by_part: dict[str, list[str]] = {}
    for n in names:
        by_part.setdefault(part_of(n), []).append(n)
    layers_top_down = [
        [module_id(layer, i) for i in idx] for layer, idx in reversed(list(enumerate(derivation.selection)))
    ]
    used_parts = [p for p in by_part if p != "normalisation"]
    edge = cfg.edge
    plan = TrainingPlan([], 0, profile.training_budget_bytes)
    reason = ""
    optimizer = OptimizerSpec(req.optimizer or edge.optimizer)
    if not profile.ort_training:
        reason = f"profile {profile.name} does not train on the device (ort_training = false); it serves inference only"
    else:
        plan = plan_training(costs, layers_top_down, used_parts, profile.training_budget_bytes,
                             edge.batch_size, req.max_train_layers, optimizer.name)
        if not plan.trainable_parts:
            reason = f"even the head alone exceeds {profile.name}'s training memory budget"

    manifest = BundleManifest(
        bank_id=bank_id,
        config=cfg.name,
        profile=profile.to_dict(),
        selection=derivation.selection,
        modules=[
            {
                "part_id": module_id(layer, i),
                "layer": layer,
                "index": i,
                "version": parts[module_id(layer, i)].version,
                "trainable": module_id(layer, i) in plan.trainable_parts,
                "params": by_part.get(module_id(layer, i), []),
            }
            for layer, idx in enumerate(derivation.selection)
            for i in idx
        ],
        fixed_parts=[
            {
                "part_id": pid,
                "version": parts[pid].version if pid in parts else 1,
                "trainable": pid in plan.trainable_parts,
                "params": by_part.get(pid, []),
                **({"rows": derivation.selection[parts_grammar.parse_gate_id(pid)]}
                   if parts_grammar.is_gate_id(pid) else {}),
            }
            for pid in fixed_part_ids(len(cfg.layers))
        ],
        input={
            "name": INPUT_NAME,
            "shape": [-1, *cfg.input_shape],
            "dtype": "float32",
            "layout": "NCHW",
            "range": [lo, hi],
            "normalisation": {"mean": ctx.mean, "std": ctx.std, "in_graph": True},
        },
        output={"name": "logits", "shape": [-1, cfg.num_classes], "kind": "logits"},
        labels=list(ctx.labels),
        derived_for=derived_for,
        importance=derivation.importance,
        costs={"estimated": derivation.cost.to_dict(), "budgets": derivation.budgets},
        training={
            "available": bool(plan.trainable_parts),
            "reason": reason,
            "folder": TRAIN_FOLDER if plan.trainable_parts else None,
            "step": f"{TRAIN_FOLDER}/{STEP_FILE}" if plan.trainable_parts else None,
            "trainable_parts": plan.trainable_parts,
            "trainable_params": [],
            "estimated_bytes": plan.estimated_bytes,
            "budget_bytes": plan.budget_bytes,
            "epochs": edge.epochs,
            "batch_size": edge.batch_size,
            "learning_rate": edge.learning_rate,
            "optimizer": optimizer.to_dict(),
            "loss": "cross-entropy (mean over the batch)",
        },
        selector={"file": "selector.onnx", "outputs": gate_names, "top_k": cfg.top_k},
        validation=validation,
        variants=variants,
        device_id=req.device_id,
        issued_at=time.time(),
    )
    manifest.validation["exporter"] = f"eclm {__version__}"

    measured: dict[str, Any] = {}
    while plan.trainable_parts:
        say(f"exporting the training step ({len(plan.trainable_parts)} trainable parts) and checking it")
        shutil.rmtree(work / TRAIN_FOLDER, ignore_errors=True)
        trainable = [n for p in plan.trainable_parts for n in by_part.get(p, []) if n in param_names]
        step_path = work / TRAIN_FOLDER / STEP_FILE
        export_step(sub, trainable, optimizer, step_path, cfg.input_shape, cfg.num_classes)
        validation["training"] = check_step(step_path, sub, trainable, optimizer,
                                            _check_batches(ctx, edge.batch_size), edge.learning_rate)
        manifest.training["trainable_params"] = trainable
        write_manifest(work, manifest)
        if not req.measure:
            break
        measured.update(_probe(work, "train"))
        if measured["training_memory_bytes"] <= profile.training_budget_bytes or len(plan.trainable_parts) == 1:
            break
        # Measured over the training budget: train one layer fewer.
        drop = next(lp for lp in layers_top_down if set(lp) <= set(plan.trainable_parts) and lp)
        kept = [p for p in plan.trainable_parts if p not in drop]
        plan = TrainingPlan(kept, plan.estimated_bytes, plan.budget_bytes)
        manifest.training["trainable_parts"] = kept
        for m in manifest.modules:
            m["trainable"] = m["part_id"] in kept
    if plan.trainable_parts and measured.get("training_memory_bytes", 0) > profile.training_budget_bytes:
        shutil.rmtree(work / TRAIN_FOLDER, ignore_errors=True)
        manifest.training.update(available=False, folder=None, step=None, trainable_parts=[], trainable_params=[],
                                 reason="even the head alone measured over the training memory budget")

    write_manifest(work, manifest)
    over: dict[str, float] = {}
    if req.measure:
        say("measuring inference with ONNX Runtime")
        measured.update(_probe(work, "infer"))
        model_bytes = (work / "model.onnx").stat().st_size
        bundle_bytes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file() and p.name != MANIFEST)
        measured.update(model_bytes=model_bytes, bundle_bytes=bundle_bytes)
        check = {
            "memory_bytes": (measured["inference_memory_bytes"], profile.memory_budget_bytes),
            "transfer_bytes": (model_bytes, profile.transfer_budget_bytes),
            "flops": (derivation.cost.flops, profile.flops_budget),
            "latency_ms_estimated_on_board": (
                derivation.cost.flops / (profile.sustained_gflops * 1e9) * 1e3, profile.latency_target_ms),
        }
        if manifest.training["available"]:
            check["training_memory_bytes"] = (measured["training_memory_bytes"], profile.training_budget_bytes)
        manifest.costs["measured"] = {k: v for k, v in measured.items() if k != "torch_imported"}
        manifest.costs["within_budget"] = {
            k: {"value": float(v), "budget": float(b), "ok": bool(v <= b)} for k, (v, b) in check.items()
        }
        if measured["inference_memory_bytes"] > profile.memory_budget_bytes:
            over["memory_bytes"] = measured["inference_memory_bytes"] / profile.memory_budget_bytes
        if model_bytes > profile.transfer_budget_bytes:
            over["transfer_bytes"] = model_bytes / profile.transfer_budget_bytes
    write_manifest(work, manifest, _signer(req))
    return manifest, over


def _check_batches(ctx: _Context, batch: int, steps: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ten proxy batches for the step check, the last of them a single sample (the batch axis is dynamic)."""
    n = len(ctx.samples)
    out = []
    for i in range(steps):
        size = batch if i < steps - 1 else 1
        idx = (np.arange(size) + i * batch) % n
        out.append((ctx.samples[idx].astype(np.float32), ctx.labels_y[idx].astype(np.int64)))
    return out


VARIANT_LADDER = (("half", 0.5), ("quarter", 0.25))


def _export_variants(ctx: _Context, derivation: Derivation, costs: dict[str, PartCost], work: Path,
                     check_x: np.ndarray, validation: dict[str, Any], say: Step) -> list[dict[str, Any]]:
    """Cheaper sub-models the device switches to when its free resources drop: the knapsack at half and
    a quarter of the main model's cost, and the minimal one (the most important module of each layer).
    """
    importance = [np.asarray(r) for r in derivation.importance]
    main = derivation.cost.dims()
    seen = {json.dumps(derivation.selection)}
    out: list[dict[str, Any]] = []
    options: list[tuple[str, Derivation | None]] = []
    for name, scale in VARIANT_LADDER:
        try:
            # Compute shrinks; memory and transfer keep the main model's (a variant only ever needs less).
            budgets = {**main, "flops": main["flops"] * scale}
            options.append((name, derive(costs, importance, budgets)))
        except InfeasibleBudgetError:
            options.append((name, None))
    options.append(("minimal", derive(costs, importance, derivation.budgets, min_share=1.01)))
    for name, d in options:
        if d is None or json.dumps(d.selection) in seen:
            continue
        seen.add(json.dumps(d.selection))
        rel = f"variants/{name}/model.onnx"
        say(f"exporting variant {name}")
        model = Normalised(SubModel(ctx.model, d.selection), ctx.mean, ctx.std).eval()
        export_onnx(model, work / rel, ctx.cfg.input_shape, ["logits"])
        validation[rel] = check_against_torch(work / rel, model, check_x, ["logits"])
        out.append({"name": name, "file": rel, "selection": d.selection, "estimated": d.cost.to_dict(),
                    "relative_flops": d.cost.flops / max(1, derivation.cost.flops)})
    return sorted(out, key=lambda v: -v["estimated"]["flops"])


def _signer(req: ExportRequest) -> Signer | None:
    return load_signer(req.signing_key) if req.signing_key is not None else None
