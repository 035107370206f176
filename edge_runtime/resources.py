"""Resource drift: free memory, CPU load and own latency, a variant ladder with hysteresis, and when
automatic training waits for headroom.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Readings:
    """One look at the machine."""

    free_memory_mb: float | None  # MemAvailable (None where it cannot be read)
    cpu_busy: float  # share of all cores busy since the previous reading, 0..1
    latency_ms_p95: float | None  # per-sample time of our own recent predictions (None when there were none)


@dataclass(frozen=True)
class Thresholds:
    """When resources count as short (pressure) and as back (recovery); the gap is the hysteresis."""

    min_free_memory_mb: float = 64.0
    max_cpu_busy: float = 0.90  # 0: the host's CPU share is not looked at
    max_latency_ms: float = 100.0
    recover_free_memory_mb: float = 128.0
    recover_cpu_busy: float = 0.60
    recover_latency_ms: float = 50.0
    patience: int = 3  # consecutive readings before stepping down or up


class ProcReader:
    """Reads /proc/meminfo and /proc/stat (Linux); latency comes from the runtime."""

    def __init__(self, latency: Callable[[], float | None]) -> None:
        self.latency = latency
        self._last: tuple[int, int] | None = None

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def __call__(self) -> Readings:
        free: float | None = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) / 1024
                        break
        except OSError:
            pass
        busy = 0.0
        try:
            total, idle = self._cpu_times()
            if self._last is not None and total > self._last[0]:
                busy = 1.0 - (idle - self._last[1]) / (total - self._last[0])
            self._last = (total, idle)
        except OSError:
            pass
        return Readings(free, max(0.0, min(1.0, busy)), self.latency())


@dataclass
class Ladder:
    """Which rung serves: 0 is the main model, higher is cheaper. Steps one rung per decision."""

    rungs: int
    thresholds: Thresholds
    level: int = 0
    _down: int = 0
    _up: int = 0
    history: deque[tuple[float, int, str]] = field(default_factory=lambda: deque(maxlen=50))

    def pressure(self, r: Readings) -> list[str]:
        t = self.thresholds
        why = []
        if r.free_memory_mb is not None and r.free_memory_mb < t.min_free_memory_mb:
            why.append(f"free memory {r.free_memory_mb:.0f} MB < {t.min_free_memory_mb:.0f}")
        if t.max_cpu_busy > 0 and r.cpu_busy > t.max_cpu_busy:
            why.append(f"CPU busy {r.cpu_busy:.0%} > {t.max_cpu_busy:.0%}")
        if r.latency_ms_p95 is not None and r.latency_ms_p95 > t.max_latency_ms:
            why.append(f"latency p95 {r.latency_ms_p95:.1f} ms > {t.max_latency_ms:g}")
        return why

    def recovered(self, r: Readings) -> bool:
        t = self.thresholds
        lat_ok = r.latency_ms_p95 is None or r.latency_ms_p95 <= t.recover_latency_ms
        cpu_ok = t.max_cpu_busy <= 0 or r.cpu_busy <= t.recover_cpu_busy
        mem_ok = r.free_memory_mb is None or r.free_memory_mb >= t.recover_free_memory_mb
        return mem_ok and cpu_ok and lat_ok

    def decide(self, r: Readings) -> tuple[int, str] | None:
        """The new level and the reason when it changes, else None."""
        why = self.pressure(r)
        if why:
            self._down, self._up = self._down + 1, 0
            if self._down >= self.thresholds.patience and self.level < self.rungs - 1:
                self.level += 1
                self._down = 0
                self.history.append((time.time(), self.level, "; ".join(why)))
                return self.level, "; ".join(why)
        elif self.recovered(r):
            self._up, self._down = self._up + 1, 0
            if self._up >= self.thresholds.patience and self.level > 0:
                self.level -= 1
                self._up = 0
                self.history.append((time.time(), self.level, "resources back"))
                return self.level, "resources back"
        else:
            self._down = self._up = 0
        return None


class LatencyWindow:
    """Per-sample predict times of the last ``window_s`` seconds: the runtime's own latency, never stale."""

    def __init__(self, window_s: float = 30.0, maxlen: int = 2000) -> None:
        self.window_s = window_s
        self._items: deque[tuple[float, float]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, seconds: float, samples: int, now: float | None = None) -> None:
        with self._lock:
            self._items.append((time.monotonic() if now is None else now, 1e3 * seconds / max(1, samples)))

    def p95(self, now: float | None = None, min_count: int = 5) -> float | None:
        """The 95th percentile in ms, or None with fewer than ``min_count`` predictions in the window."""
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        with self._lock:
            while self._items and self._items[0][0] < cutoff:
                self._items.popleft()
            values = [ms for _, ms in self._items]
        return float(np.percentile(values, 95)) if len(values) >= min_count else None


@dataclass(frozen=True)
class PauseRule:
    """When automatic training waits (``policy`` as the ``train_pause`` setting) and against what."""

    policy: str  # headroom | variant | never
    max_latency_ms: float  # the runtime's latency budget
    min_free_memory_mb: float  # what serving keeps free
    training_mb: float  # what a run is estimated to need on top


PAUSE_KINDS = ("memory", "latency", "variant")


@dataclass(frozen=True)
class Pause:
    """Why automatic training waits: a kind (a bounded metric label) and a sentence."""

    kind: str  # one of PAUSE_KINDS
    reason: str


def training_pause(rule: PauseRule, readings: Readings | None, level: int, variant: str) -> Pause | None:
    """Why automatic training should wait now, or None when it may run.

    The runtime judges its own headroom (its per-sample latency against its budget, free memory
    against what a run needs), never how busy the whole host is: a board that runs a camera
    pipeline is busy all day and still has room to train.
    """
    if rule.policy == "never":
        return None
    if rule.policy == "variant" and level > 0:
        return Pause("variant", f"a cheaper variant serves ({variant}) and train_pause=variant")
    if readings is None:
        return None
    need = rule.min_free_memory_mb + rule.training_mb
    if readings.free_memory_mb is not None and readings.free_memory_mb < need:
        return Pause("memory", f"free memory {readings.free_memory_mb:.0f} MB < {need:.0f} MB "
                               f"({rule.min_free_memory_mb:.0f} kept free + {rule.training_mb:.0f} for a run)")
    if readings.latency_ms_p95 is not None and readings.latency_ms_p95 > rule.max_latency_ms:
        return Pause("latency", f"own latency p95 {readings.latency_ms_p95:.1f} ms per sample > "
                                f"budget {rule.max_latency_ms:g} ms")
    return None
