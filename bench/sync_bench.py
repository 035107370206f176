"""Benchmark the sync path: uplink bytes and the accuracy cost of compression, merge throughput and latency.

Run as ``python -m bench.sync_bench [--out docs/benchmarks] [--devices 200] [--bank DIR]``. Part A runs
real devices (edge runtime, ONNX Runtime training on corrupted digits, or ``--dataset``) and compares the bytes of one
delta message per codec with sending the full model at fp32 (FedAvg), and the accuracy each codec's
decoded delta gives on the device's held-out data. Part B starts a private mosquitto and the merger
daemon, and simulates ``--devices`` devices on loopback: publish-to-ack and publish-to-update latency
and merge throughput. Writes ``sync.json`` and ``sync.md``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine_info, md_table, pct, write_results
from bench.reaper import run_main, track

CODECS = ("fp32+none", "fp32+zlib", "fp16+zlib", "int8+zlib", "int8+top0.25+zlib", "int8+top0.1+lzma")
# Each device's classes; its corruption is the data set's k-th one after "none", cycling (bench/corruptions.py:
# rotation, noise, contrast, blur, rotation on images; time-shift, scale, noise, dropout, time-warp on signals).
DEVICES = {"dev-a": [1, 4, 7], "dev-b": [0, 2, 5], "dev-c": [3, 6, 9], "dev-d": [2, 7, 8], "dev-e": [0, 3, 8]}


def device_kind(k: int, input_shape: tuple[int, ...]) -> str:
    """The corruption of the ``k``-th device, among those that fit the data's shape."""
    from bench.corruptions import kinds_for

    kinds = [c for c in kinds_for(input_shape) if c != "none"]
    return kinds[k % len(kinds)]


@dataclass
class DeviceRun:
    """One real device after one training run: its bundle, delta message and held-out data."""

    name: str
    bundle: Path
    message: Any
    test_x: np.ndarray
    test_y: np.ndarray
    start_acc: float


def _devices(bank: Path, work: Path, dataset: str = "digits") -> list[DeviceRun]:
    from bench.corruptions import corrupt
    from edge_runtime.config import load_config
    from edge_runtime.service import EdgeService
    from edge_runtime.sync import delta_message
    from exporter.data import load_dataset, split
    from exporter.export import ExportRequest, export_bundle

    pool = split(load_dataset(dataset), 0).pool
    runs = []
    for k, (name, classes) in enumerate(DEVICES.items()):
        kind = device_kind(k, tuple(pool.x.shape[1:]))
        bundle = work / f"bundle-{name}"
        export_bundle(ExportRequest(bank, profile="pi4", out_dir=bundle, classes=classes, measure=False))
        mask = np.isin(pool.y, classes)
        x, y = corrupt(pool.x[mask], kind, seed=k), pool.y[mask]
        order = np.random.default_rng(k).permutation(len(y))
        x, y = x[order], y[order]
        n_test = len(y) // 3
        svc = EdgeService(load_config(overrides={"bundle": bundle, "state_dir": work / f"state-{name}",
                                                 "device_id": name, "train_every_samples": 0}, environ={}))
        start = svc.serving.accuracy(x[:n_test], y[:n_test])
        svc.add_samples(x[n_test:], y[n_test:].tolist())
        svc.train_now()
        entry = svc.outbox.pending()[0]
        runs.append(DeviceRun(name, bundle, delta_message(svc, entry), x[:n_test], y[:n_test], start))
        svc.close()
    return runs


def _accuracy_with(run: DeviceRun, tensors: dict[str, np.ndarray]) -> float:
    """Test accuracy of the device's bundle with ``tensors`` (deltas, bank names) added to its weights."""
    from eclm.onnx_weights import read_initializers
    from eclm.train_step import open_session

    weights = read_initializers(run.bundle / "model.onnx")
    from eclm.parts import onnx_name

    for name, d in tensors.items():
        weights[onnx_name(name)] = (weights[onnx_name(name)] + d).astype(np.float32)
    sess, _kept = open_session(run.bundle / "model.onnx", weights)
    pred = sess.run(None, {"input": run.test_x})[0].argmax(1)
    return float((pred == run.test_y).mean())


def part_a(bank: Path, work: Path, dataset: str = "digits") -> dict[str, Any]:
    """Bytes per device per round for each codec, against the full model at fp32, and accuracy after."""
    from safetensors.numpy import save

    from eclm import wire
    from module_bank import DirectoryBank

    full = {k: v for k, v in DirectoryBank(bank).read_all().items() if v.dtype.kind == "f"}
    fedavg_bytes = len(save(full))
    runs = _devices(bank, work, dataset)
    rows: list[dict[str, Any]] = []
    for codec in CODECS:
        sizes, accs = [], []
        for run in runs:
            data = wire.encode(run.message, codec=codec)
            decoded = wire.decode(data)
            assert isinstance(decoded, wire.DeltaMessage)
            sizes.append(len(data))
            accs.append(_accuracy_with(run, decoded.tensors))
        rows.append({"codec": codec, "bytes_mean": float(np.mean(sizes)),
                     "ratio_vs_fedavg": fedavg_bytes / float(np.mean(sizes)),
                     "accuracy_mean": float(np.mean(accs)), "accuracy_per_device": accs})
    exact = rows[0]["accuracy_mean"]
    for r in rows:
        r["accuracy_cost"] = exact - r["accuracy_mean"]
    return {"fedavg_full_model_fp32_bytes": fedavg_bytes,
            "full_model_params": int(sum(v.size for v in full.values())),
            "start_accuracy_mean": float(np.mean([r.start_acc for r in runs])),
            "trainable_parts": sorted(runs[0].message.parts), "codecs": rows, "dataset": dataset,
            "template": runs[0].message}


def _daemon(bank: Path, url: str, key: Path, log: Path, round_deltas: int) -> Any:
    import subprocess
    import sys

    return track(subprocess.Popen(
        [sys.executable, "-c", "from cloud_sync.cli import main; main()", "sync", "--bank", str(bank), "--broker", url,
         "--signing-key", str(key), "--round-deltas", str(round_deltas), "--round-seconds", "1",
         "--max-staleness", "50"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT))


def _wait_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} did not appear in {path}")


def part_b(bank: Path, work: Path, template: Any, n_devices: int, codec: str, timeout: float) -> dict[str, Any]:
    """Simulated devices over a private mosquitto on loopback against the real daemon."""
    import paho.mqtt.client as mqtt

    from bench.broker import Mosquitto
    from eclm import topics, wire
    from eclm.signing import generate_keys

    fleet_bank = work / "fleet-bank"
    shutil.copytree(bank, fleet_bank)
    (work / "keys").mkdir(exist_ok=True)
    priv, _ = generate_keys(work / "keys")
    broker = Mosquitto(work / "broker")
    broker.start()
    daemon = _daemon(fleet_bank, broker.url, priv, work / "sync.log", max(1, n_devices // 4))
    _wait_log(work / "sync.log", "connected to mqtt://", 90)
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    updated: dict[str, float] = {}
    lock = threading.Lock()
    ready = threading.Event()

    def on_message(_c: Any, _u: Any, m: Any) -> None:
        now = time.perf_counter()
        device = topics.device_of(m.topic)
        with lock:
            if topics.kind_of(m.topic) == "ack":
                msg = wire.decode(bytes(m.payload))
                if isinstance(msg, wire.AckMessage):
                    acked.setdefault(msg.delta_id, now)
            elif topics.kind_of(m.topic) == "update":
                updated.setdefault(device, now)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="eclm-fleet-sim", protocol=mqtt.MQTTv311)
    client.on_message = on_message
    def on_connect(c: Any, *_: Any) -> None:
        c.subscribe([(f"{topics.PREFIX}/devices/+/ack", 1), (f"{topics.PREFIX}/devices/+/update", 1)])
        ready.set()

    client.on_connect = on_connect
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        ready.wait(10)
        time.sleep(3)  # the daemon connects and subscribes
        versions = {pid: 1 for pid in template.base_versions}
        from module_bank import DirectoryBank

        sizes = [len(layer["widths"]) for layer in DirectoryBank(bank).info().config["layers"]]
        uniform = [[1.0 / n] * n for n in sizes]
        rng = np.random.default_rng(0)
        for i in range(n_devices):
            dev = f"sim-{i:04d}"
            # A device is known to the daemon once it sent a valid profile for the bank (one row per module layer).
            profile = wire.ProfileMessage(dev, template.bank_id, "sim", uniform, 100, profile_name="pi4",
                                          modules=versions, trainable=True, measured=False)
            client.publish(topics.profile(dev), wire.encode(profile), qos=1)
        time.sleep(2)
        payloads = []
        for i in range(n_devices):
            dev = f"sim-{i:04d}"
            tensors = {k: (v * 0.1 + rng.normal(0, 1e-5, v.shape)).astype(np.float32)
                       for k, v in template.tensors.items()}
            msg = replace(template, delta_id=uuid.uuid4().hex, device_id=dev, tensors=tensors)
            payloads.append((dev, msg.delta_id, wire.encode(msg, codec=codec)))
        t_start = time.perf_counter()
        for dev, delta_id, data in payloads:
            with lock:
                sent[delta_id] = time.perf_counter()
            client.publish(topics.delta(dev), data, qos=1)
        from module_bank import read_ledger

        ledger = read_ledger(fleet_bank)

        def pending() -> int:
            return ledger.pending_count()

        deadline = time.time() + timeout
        while time.time() < deadline and (len(acked) < n_devices or len(updated) < n_devices or pending()):
            time.sleep(0.5)
        t_end = time.perf_counter()
        device_of = {delta_id: dev for dev, delta_id, _ in payloads}
        ack_ms = [(acked[d] - sent[d]) * 1e3 for d in sent if d in acked]
        upd_ms = [(updated[device_of[d]] - sent[d]) * 1e3 for d in sent if device_of[d] in updated]
        rounds = ledger.round_metrics()
        statuses = ledger.summary()["deltas"]
        ledger.close()
        merge_s = sum(r.get("seconds", 0.0) for r in rounds)
        merged = sum(r.get("deltas", 0) for r in rounds)
        return {
            "devices": n_devices, "codec": codec, "payload_bytes": len(payloads[0][2]),
            "acked": len(ack_ms), "updated": len(upd_ms), "ledger": statuses, "rounds": len(rounds),
            "ack_ms_p50": pct(ack_ms, 50), "ack_ms_p99": pct(ack_ms, 99),
            "update_ms_p50": pct(upd_ms, 50), "update_ms_p99": pct(upd_ms, 99),
            "store_rate_per_s": len(ack_ms) / max(1e-9, (max(acked.values()) - t_start) if acked else float("nan")),
            "merge_compute_s": merge_s, "merge_rate_per_s": merged / merge_s if merge_s else float("nan"),
            "wall_s": t_end - t_start, "end_to_end_rate_per_s": merged / (t_end - t_start),
        }
    finally:
        client.loop_stop()
        client.disconnect()
        daemon.terminate()
        daemon.wait(30)
        broker.stop()


def render(info: dict[str, Any], a: dict[str, Any], b: dict[str, Any], command: str) -> str:
    rows = [[r["codec"], r["bytes_mean"], r["ratio_vs_fedavg"], r["accuracy_mean"], r["accuracy_cost"]]
            for r in a["codecs"]]
    return f"""# Sync benchmark: uplink bytes, compression cost, merge throughput and latency

Measured on {info['cpu']} ({info['cores']} cores), Python {info['python']}, {info['date']}.
Command: `{command}`.

## Uplink bytes per device per round ({a.get('dataset', 'digits')}, `pi4` sub-models, 5 real devices)
Each device (classes and a corruption of its own, see `bench/sync_bench.py`) fine-tunes its bundle
with the edge runtime (ONNX Runtime training, 3 epochs) and produces one delta message; its size is
measured per codec and compared with sending the full modular model at fp32 (FedAvg:
{a['fedavg_full_model_fp32_bytes']:,} bytes, {a['full_model_params']:,} parameters). Accuracy is that of
the device's bundle with the decoded delta applied, on its held-out samples (start:
{a['start_accuracy_mean']:.3f}); the cost is against the exact (fp32) delta. Trainable parts:
{', '.join(a['trainable_parts'])}.

{md_table(["codec", "bytes per round", "FedAvg / ECLM", "accuracy", "accuracy cost"], rows)}

## Fleet on loopback: {b['devices']} simulated devices, real mosquitto and merger daemon
Each simulated device sends one delta ({b['codec']}, {b['payload_bytes']:,} bytes); the daemon stores it
and acknowledges, merges in rounds of a quarter of the fleet, and sends signed module updates to every
device holding a changed module. "publish -> module update" is the time from a device's delta to
the first signed module update it receives after it (from the first round that merged modules it
holds). The merge rate counts decoding, the strategy and the validation gate (per-part evaluation of
the cloud model on its validation split), which dominates.

{md_table(["metric", "value"], [
        ["deltas acknowledged", b["acked"]], ["devices updated", b["updated"]], ["rounds", b["rounds"]],
        ["ledger", b["ledger"]],
        ["publish -> ack p50 / p99 (ms)", f"{b['ack_ms_p50']:.1f} / {b['ack_ms_p99']:.1f}"],
        ["publish -> module update p50 / p99 (ms)", f"{b['update_ms_p50']:.1f} / {b['update_ms_p99']:.1f}"],
        ["store and acknowledge rate (deltas/s)", b["store_rate_per_s"]],
        ["merge compute (s) / merge rate (deltas/s)", f"{b['merge_compute_s']:.2f} / {b['merge_rate_per_s']:.1f}"],
        ["all deltas merged after (s) / end-to-end rate (deltas/s)",
         f"{b['wall_s']:.1f} / {b['end_to_end_rate_per_s']:.1f}"],
    ])}
"""


def main(argv: list[str] | None = None) -> int:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="where sync.json and sync.md go")
    ap.add_argument("--devices", type=int, default=200, help="simulated devices in the fleet part")
    ap.add_argument("--codec", default="int8+zlib", help="codec of the simulated devices' deltas")
    ap.add_argument("--dataset", default="digits",
                    help="data set of part A's devices and of the bank: digits, signals or an .npz (docs/data.md)")
    ap.add_argument("--bank", type=Path, default=None, help="a bank trained on --dataset (default: train one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for acks and updates")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="eclm-sync-bench-"))
    try:
        bank = work / "bank"
        if args.bank is not None:
            shutil.copytree(args.bank, bank)
        else:
            from exporter.cloud import TrainOptions, train_bank

            print(f"training the {args.dataset} bank ...", flush=True)
            train_bank(TrainOptions(dataset=args.dataset, bank_dir=bank, seed=0))
        print("part A: real devices, codecs ...", flush=True)
        a = part_a(bank, work, args.dataset)
        template = a.pop("template")
        print(f"part B: {args.devices} simulated devices ...", flush=True)
        b = part_b(bank, work, template, args.devices, args.codec, args.timeout)
        info = machine_info()
        command = "python -m bench.sync_bench " + " ".join(sys.argv[1:] if argv is None else argv)
        markdown = render(info, a, b, command.strip())
        write_results(args.out, "sync", {"machine": info, "bytes": a, "fleet": b}, markdown)
        print(markdown)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
