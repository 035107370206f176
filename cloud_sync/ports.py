"""What the merger daemon is given rather than imports: the gate's evaluation and bundle derivation.

``cloud_sync`` never imports torch or :mod:`exporter`. The CLI (``cloud_sync/cli.py``, :func:`build_hooks`
there) builds these from :mod:`exporter` and passes them in; a test or a bench passes its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Params = dict[str, dict[str, np.ndarray]]  # part id -> parameter name -> array (every part of the model)
# Validation accuracy of full parameters, in [0, 1].
Evaluate = Callable[[Params], float]
# Builds the gate's evaluation from the bank's info (``BankInfo``) and its validation secret; raises
# (an :class:`eclm.errors.EclmError` with a hint) when it cannot, e.g. when the data set is not here.
EvaluatorFactory = Callable[[Any, bytes], Evaluate]
# (device, profile name, importance rows) -> (the signed bundle as a tar archive, its digest).
DeriveBundle = Callable[[str, str, list[list[float]]], tuple[bytes, str]]


@dataclass(frozen=True)
class SyncHooks:
    """What the daemon is handed.

    ``evaluator`` is needed only while the gate is on: without it (or when it raises) nothing merges and
    the merger says why (``gate_problem``). Without ``derive`` no bundle is derived (a warning says so).
    """

    evaluator: EvaluatorFactory | None = None
    derive: DeriveBundle | None = None
