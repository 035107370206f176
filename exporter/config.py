"""Model configurations: the shape of the modular network for each data set or scale."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from eclm.errors import ConfigError


@dataclass(frozen=True)
class LayerSpec:
    """One module layer: the replaced block's in/out channels and stride, and its N modules.

    ``widths`` holds one entry per module: the fraction of ``out_channels`` used inside a shrunk
    module, or 0.0 for a residual module (the block's shortcut alone, i.e. "skip this layer").
    """

    in_channels: int
    out_channels: int
    stride: int
    widths: tuple[float, ...]

    @property
    def num_modules(self) -> int:
        return len(self.widths)


@dataclass(frozen=True)
class TrainConfig:
    """Cloud training settings (both stages)."""

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    lb_weight: float = 0.05
    enhance_epochs: int = 15
    enhance_learning_rate: float = 1e-3
    kl_weight: float = 0.5
    num_subtasks: int = 5
    modules_per_subtask: int = 3


@dataclass(frozen=True)
class EdgeTrainDefaults:
    """On-device fine-tuning defaults written into bundles (METHOD.md section 4)."""

    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 1e-3
    optimizer: str = "adamw"  # the step graph's update rule: "adamw" or "sgd" (momentum); exporter/step_graph.py


@dataclass(frozen=True)
class ModelConfig:
    """The whole modular network: stem, module layers, selector and head."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    stem_channels: int
    layers: tuple[LayerSpec, ...]
    top_k: int = 2
    selector_channels: int = 16
    embed_dim: int = 32
    noise_epsilon: float = 1e-2
    train: TrainConfig = field(default_factory=TrainConfig)
    edge: EdgeTrainDefaults = field(default_factory=EdgeTrainDefaults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelConfig:
        d = dict(data)
        d["input_shape"] = tuple(d["input_shape"])
        d["layers"] = tuple(
            LayerSpec(
                in_channels=ls["in_channels"],
                out_channels=ls["out_channels"],
                stride=ls["stride"],
                widths=tuple(ls["widths"]),
            )
            for ls in d["layers"]
        )
        d["train"] = TrainConfig(**d.get("train", {}))
        d["edge"] = EdgeTrainDefaults(**d.get("edge", {}))
        return ModelConfig(**d)


def _digits() -> ModelConfig:
    # 8x8 grey images; 3 module layers of 8 modules: 3 half-width, 3 quarter-width, 2 residual.
    widths = (0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0)
    return ModelConfig(
        name="digits",
        input_shape=(1, 8, 8),
        num_classes=10,
        stem_channels=16,
        layers=(
            LayerSpec(16, 16, 1, widths),
            LayerSpec(16, 32, 2, widths),
            LayerSpec(32, 32, 1, widths),
        ),
        top_k=2,
        selector_channels=16,
        embed_dim=32,
    )


def _resnet18() -> ModelConfig:
    # The paper's scale: ResNet18 (CIFAR stem) whose 4 stages become 4 module layers of 16 modules:
    # 4 half-width, 5 quarter-width, 5 eighth-width shrunk basic blocks and 2 residual modules.
    widths = (0.5,) * 4 + (0.25,) * 5 + (0.125,) * 5 + (0.0,) * 2
    return ModelConfig(
        name="resnet18",
        input_shape=(3, 32, 32),
        num_classes=10,
        stem_channels=64,
        layers=(
            LayerSpec(64, 64, 1, widths),
            LayerSpec(64, 128, 2, widths),
            LayerSpec(128, 256, 2, widths),
            LayerSpec(256, 512, 2, widths),
        ),
        top_k=2,
        selector_channels=32,
        embed_dim=64,
    )


CONFIGS = {"digits": _digits, "resnet18": _resnet18}


def get_config(name: str) -> ModelConfig:
    """The named model configuration; an unknown name lists the known ones."""
    if name not in CONFIGS:
        raise ConfigError(
            f"unknown model configuration {name!r}; known: {', '.join(sorted(CONFIGS))}",
            hint="pass one of the known names",
        )
    return CONFIGS[name]()
