"""Prometheus metrics of the merger daemon, read from its counters and ledger when scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from cloud_sync.core import SyncCore


class SyncCollector(Collector):
    """Messages by outcome, rejections by reason, pending deltas, quarantine, derivation queue, versions, devices.

    Every label set is bounded: reasons and kinds are the code's own (device events outside the known
    kinds count as ``other``).
    """

    def __init__(self, core: SyncCore) -> None:
        self.core = core

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily("eclm_sync_events", "Messages and actions of this daemon by kind", labels=["kind"])
        for kind, n in sorted(self.core.counters.items()):
            events.add_metric([kind], n)
        yield events
        summary = self.core.ledger.summary()
        deltas = GaugeMetricFamily("eclm_sync_deltas", "Deltas in the ledger by state", labels=["state"])
        for state, n in summary["deltas"].items():
            deltas.add_metric([state], n)
        yield deltas
        rejected = CounterMetricFamily("eclm_sync_rejected", "Rejections recorded in the ledger", labels=["reason"])
        for reason, n in summary["rejected_by_reason"].items():
            rejected.add_metric([reason], n)
        yield rejected
        yield GaugeMetricFamily("eclm_sync_uplink_bytes", "Bytes of deltas received", value=summary["uplink_bytes"])
        versions = self.core.ledger.versions()
        yield GaugeMetricFamily("eclm_sync_module_versions_total", "Sum of all part versions (grows with merges)",
                                value=sum(versions.values()))
        jobs = self.core.derivations.jobs.counts()
        yield GaugeMetricFamily("eclm_sync_derive_queue", "Bundle derivations waiting for a worker (one per device; "
                                "the bank's queue, shared by all workers)", value=jobs["queued"])
        yield GaugeMetricFamily("eclm_sync_derive_running", "Bundle derivations being run by workers",
                                value=jobs["running"])
        yield GaugeMetricFamily("eclm_sync_quarantined", "Deltas, messages and jobs set aside with a reason",
                                value=len(self.core.ledger.quarantined()))
        yield GaugeMetricFamily("eclm_sync_gate_unavailable", "1 while the validation gate cannot run (nothing "
                                "merges; see eclm-cloud status)", value=1 if self.core.merger.gate_problem else 0)
        yield GaugeMetricFamily("eclm_sync_waiting_support", "Pending deltas of which parts wait for more devices",
                                value=self.core.ledger.waiting())
        yield CounterMetricFamily("eclm_sync_expired_parts", "Parts of deltas that expired waiting for support",
                                  value=self.core.ledger.expired_parts())
        devices = self.core.ledger.devices()
        yield GaugeMetricFamily("eclm_sync_devices_online", "Devices whose last status is online",
                                value=sum(1 for d in devices if d["online"]))


def serve_metrics(core: SyncCore, port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``host:port`` from a background thread."""
    registry = CollectorRegistry()
    registry.register(SyncCollector(core))
    start_http_server(port, addr=host, registry=registry)
