"""Resource drift: free memory, CPU load and own latency, and a variant ladder with hysteresis."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Readings:
    """One look at the machine."""

    free_memory_mb: float
    cpu_busy: float  # share of all cores busy since the previous reading, 0..1
    latency_ms_p95: float  # of our own recent predictions (NaN when none)


@dataclass(frozen=True)
class Thresholds:
    """When resources count as short (pressure) and as back (recovery); the gap is the hysteresis."""

    min_free_memory_mb: float = 64.0
    max_cpu_busy: float = 0.90
    max_latency_ms: float = 100.0
    recover_free_memory_mb: float = 128.0
    recover_cpu_busy: float = 0.60
    recover_latency_ms: float = 50.0
    patience: int = 3  # consecutive readings before stepping down or up


class ProcReader:
    """Reads /proc/meminfo and /proc/stat (Linux); latency comes from the runtime."""

    def __init__(self, latency: Callable[[], float]) -> None:
        self.latency = latency
        self._last: tuple[int, int] | None = None

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def __call__(self) -> Readings:
        free = float("inf")
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
        if r.free_memory_mb < t.min_free_memory_mb:
            why.append(f"free memory {r.free_memory_mb:.0f} MB < {t.min_free_memory_mb:.0f}")
        if r.cpu_busy > t.max_cpu_busy:
            why.append(f"CPU busy {r.cpu_busy:.0%} > {t.max_cpu_busy:.0%}")
        if r.latency_ms_p95 == r.latency_ms_p95 and r.latency_ms_p95 > t.max_latency_ms:
            why.append(f"latency p95 {r.latency_ms_p95:.1f} ms > {t.max_latency_ms:.0f}")
        return why

    def recovered(self, r: Readings) -> bool:
        t = self.thresholds
        lat_ok = not (r.latency_ms_p95 == r.latency_ms_p95) or r.latency_ms_p95 <= t.recover_latency_ms
        return r.free_memory_mb >= t.recover_free_memory_mb and r.cpu_busy <= t.recover_cpu_busy and lat_ok

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
