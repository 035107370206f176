"""`eclm-cloud train` as a library call: data, both training stages, evaluation, the versioned bank."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eclm.parts import is_module_id, parse_module_id
from eclm.tensors import tensors_digest
from exporter.config import ModelConfig, get_config
from exporter.costs import part_costs
from exporter.data import channel_stats, load_dataset, split
from exporter.enhance import enhance
from exporter.modular import ModularNet
from exporter.torchio import model_to_parts
from exporter.train import Progress, accuracy, seed_everything, to_tensors, train_end_to_end
from module_bank import BankInfo, PartRecord, bank_id_for, open_store


@dataclass(frozen=True)
class TrainOptions:
    """What `eclm-cloud train` is asked to do."""

    dataset: str = "digits"
    bank_dir: Path | str = Path("bank")  # a directory or a postgresql:// URL
    seed: int = 0
    config: str = "digits"
    epochs: int | None = None
    enhance_epochs: int | None = None


def random_bank(config: str, bank_dir: Path | str, seed: int = 0) -> BankInfo:
    """An untrained bank of ``config`` on synthetic data: for sizing and speed measurements only."""
    from exporter.data import SYNTHETIC

    ds = load_dataset(SYNTHETIC)
    cfg = dataclasses.replace(get_config(config), input_shape=ds.input_shape, num_classes=len(ds.labels))
    seed_everything(seed)
    model = ModularNet(cfg).eval()
    mean, std = channel_stats(ds.x)
    return write_bank(bank_dir, model, SYNTHETIC, seed, mean, std, list(ds.labels),
                      {"note": "random initialisation, for sizing and speed only"}, [])


def _config_for(options: TrainOptions, input_shape: tuple[int, int, int], num_classes: int) -> ModelConfig:
    cfg = get_config(options.config)
    tc = cfg.train
    if options.epochs is not None:
        tc = dataclasses.replace(tc, epochs=options.epochs)
    if options.enhance_epochs is not None:
        tc = dataclasses.replace(tc, enhance_epochs=options.enhance_epochs)
    return dataclasses.replace(cfg, input_shape=input_shape, num_classes=num_classes, train=tc)


def train_bank(options: TrainOptions, progress: Progress | None = None) -> BankInfo:
    """Train the modular model on the proxy split and write bank version 1 to ``options.bank_dir``."""
    ds = load_dataset(options.dataset)
    splits = split(ds, options.seed)
    cfg = _config_for(options, ds.input_shape, len(ds.labels))
    mean, std = channel_stats(splits.train.x)
    generator = seed_everything(options.seed)
    model = ModularNet(cfg)
    train_t = to_tensors(splits.train, mean, std)
    val_t = to_tensors(splits.val, mean, std)
    pool_t = to_tensors(splits.pool, mean, std)

    stage1 = train_end_to_end(model, train_t, val_t, generator, progress)
    acc_after_stage1 = accuracy(model, *pool_t)
    enhanced = enhance(model, train_t, val_t, generator, progress)
    metrics: dict[str, Any] = {
        "train_samples": len(splits.train.y),
        "val_samples": len(splits.val.y),
        "test_samples": len(splits.pool.y),
        "stage1": dataclasses.asdict(stage1),
        "stage1_test_accuracy": acc_after_stage1,
        "enhance": dataclasses.asdict(enhanced.stage),
        "modules_per_subtask_before": enhanced.modules_per_subtask_before,
        "modules_per_subtask_after": enhanced.modules_per_subtask_after,
        "test_accuracy": accuracy(model, *pool_t),
        "val_accuracy": accuracy(model, *val_t),
    }
    return write_bank(options.bank_dir, model, options.dataset, options.seed, mean, std, list(ds.labels), metrics,
                      enhanced.subtasks)


def write_bank(
    bank_dir: Path | str,
    model: ModularNet,
    dataset: str,
    seed: int,
    mean: list[float],
    std: list[float],
    labels: list[str],
    metrics: dict[str, Any],
    subtasks: list[list[int]],
) -> BankInfo:
    """Store every part of ``model`` at version 1 with its cost figures and a content-derived bank id."""
    parts = model_to_parts(model)
    costs = part_costs(model)
    records: dict[str, PartRecord] = {}
    for part_id in parts:
        layer = index = None
        width = None
        kind = "fixed"
        if is_module_id(part_id):
            kind = "module"
            layer, index = parse_module_id(part_id)
            width = model.cfg.layers[layer].widths[index]
        cost = costs[part_id].to_dict() if part_id in costs else {}
        records[part_id] = PartRecord(part_id, kind, 1, "", cost, layer, index, width,
                                      [{"version": 1, "from": "eclm-cloud train", "deltas": []}])
    config = model.cfg.to_dict()
    bank_id = bank_id_for(config, {k: tensors_digest(v) for k, v in parts.items()})
    info = BankInfo(
        bank_id=bank_id,
        config=config,
        dataset=dataset,
        seed=seed,
        normalisation={"mean": mean, "std": std},
        labels=labels,
        parts=records,
        metrics=metrics,
        subtasks=subtasks,
    )
    open_store(bank_dir).write(info, parts)
    return info
