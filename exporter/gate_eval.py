"""The merge gate's evaluation, built here (torch) and handed to the merger daemon, which imports no torch.

``eclm-cloud sync`` passes :func:`gate_evaluator` to :class:`cloud_sync.core.SyncCore` (see
:class:`cloud_sync.ports.SyncHooks`); the merger calls it once with the bank's info and validation secret.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eclm.errors import DataError
from exporter.config import ModelConfig
from exporter.data import gate_split, load_dataset
from exporter.torchio import model_from_tensors
from exporter.train import accuracy, to_tensors
from module_bank import BankInfo

Params = dict[str, dict[str, np.ndarray]]


def gate_evaluator(info: BankInfo, secret: bytes) -> Callable[[Params], float]:
    """``evaluate(params)``: top-1 accuracy of the full parameters (part -> name -> array) on the gate's split.

    The split is the bank's data set's validation share drawn by ``secret`` (:func:`exporter.data.gate_split`).
    Raises :class:`DataError` when the data set cannot be loaded on this machine.
    """
    cfg = ModelConfig.from_dict(info.config)
    try:
        dataset = load_dataset(info.dataset)
    except Exception as exc:
        why = getattr(exc, "message", None) or str(exc)
        raise DataError(f"cannot load the bank's data set {str(info.dataset)[:200]!r}: {why[:200]}",
                        hint="make the data set loadable on this machine, or run the daemon with --no-gate") from exc
    x, y = to_tensors(gate_split(dataset, info.seed, secret), info.normalisation["mean"], info.normalisation["std"])

    def evaluate(params: Params) -> float:
        flat = {name: a for part in params.values() for name, a in part.items()}
        return accuracy(model_from_tensors(cfg, flat), x, y)

    return evaluate
