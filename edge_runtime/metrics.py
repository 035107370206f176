"""Prometheus metrics of the edge runtime (its own registry, text exposition on GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EdgeMetrics:
    """Requests, predict latency, training runs and loss, samples, bytes in and out, outbox size."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("eclm_edge_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.predict_latency = Histogram("eclm_edge_predict_seconds", "Predict latency (model only)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.predicted = Counter("eclm_edge_predicted_samples", "Samples predicted", registry=r)
        self.training_runs = Counter("eclm_edge_training_runs", "Fine-tuning runs", ["result"], registry=r)
        self.training_loss = Gauge("eclm_edge_training_loss", "Last training loss of the last run", registry=r)
        self.holdout_accuracy = Gauge("eclm_edge_holdout_accuracy",
                                      "Holdout accuracy of the serving model (NaN until first measured)", registry=r)
        self.holdout_accuracy.set(float("nan"))
        self.samples_held = Gauge("eclm_edge_samples_held", "Labelled samples in the store", registry=r)
        self.bytes_in = Counter("eclm_edge_bytes_received", "Request body bytes", registry=r)
        self.bytes_out = Counter("eclm_edge_bytes_sent", "Response body bytes", registry=r)
        self.outbox_entries = Gauge("eclm_edge_outbox_entries", "Deltas waiting to be sent", registry=r)
        self.generation = Gauge("eclm_edge_generation", "Serving generation (0: the bundle as shipped)",
                                registry=r)
        self.update_rollbacks = Counter("eclm_edge_update_rollbacks",
                                        "Updates not served: the holdout judged them worse", registry=r)
        self.deltas_acked = Counter("eclm_edge_deltas_acknowledged", "Deltas the cloud acknowledged", ["status"],
                                    registry=r)
        self.uplink_bytes = Counter("eclm_edge_uplink_bytes", "Bytes published to the broker", registry=r)
        self.downlink_bytes = Counter("eclm_edge_downlink_bytes", "Bytes received from the broker", registry=r)
        self.broker_connected = Gauge("eclm_edge_broker_connected", "1 while connected to the broker", registry=r)
        self.variant_level = Gauge("eclm_edge_variant_level", "Rung of the variant ladder serving (0: main model)",
                                   registry=r)
        self.bundle_rejections = Counter("eclm_edge_bundle_rejections", "Bundles refused", registry=r)
        self.sync_refused = Counter("eclm_edge_sync_refused", "Broker messages refused, by reason", ["reason"],
                                    registry=r)
        self.sync_thread_alive = Gauge("eclm_edge_sync_thread_alive",
                                       "1 while the sync thread runs (network loop, outbox, updates)", ["thread"],
                                       registry=r)
        self.sync_thread_restarts = Counter("eclm_edge_sync_thread_restarts", "Sync threads found dead and restarted",
                                            ["thread"], registry=r)
        self.sync_last_message = Gauge("eclm_edge_sync_last_message_timestamp",
                                       "When the last broker message was handled (seconds since the epoch; 0: none)",
                                       registry=r)
        self.unsigned_bundles_allowed = Gauge("eclm_edge_unsigned_bundles_allowed",
                                              "1 when bundles serve without signature checks (no trust key)",
                                              registry=r)
        self.http_refused = Counter("eclm_edge_api_refused",
                                    "HTTP requests refused before any endpoint ran, by reason (token_missing, "
                                    "token_invalid, tls_handshake)", ["reason"], registry=r)
        self.training_paused = Gauge("eclm_edge_training_paused",
                                     "1 while automatic training waits, by why (memory, latency, variant)", ["kind"],
                                     registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
