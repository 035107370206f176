"""`eclm-cloud`: train the modular model into a module bank, run the merger daemon, report its state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from cloud_sync.pki_cli import register_pki
from eclm.cli_support import make_app, reports_errors

if TYPE_CHECKING:
    from cloud_sync.ports import SyncHooks

BANK_HELP = ("Module bank: a directory (SQLite ledger + files) or postgresql://USER@HOST[:PORT]/DB "
             "(shared by several workers; docs/scale.md).")
app = make_app("The cloud side of ECLM: train the module bank, run the merger daemon, inspect it.")


@app.callback()
def _root() -> None:
    """The cloud side of ECLM."""


@app.command()
@reports_errors
def train(
    dataset: str = typer.Option("digits", "--dataset", envvar="ECLM_DATASET",
                                help="'digits' (ships with scikit-learn), 'signals' (generated 1-D waveforms, "
                                "docs/data.md) or an .npz with arrays X and y."),
    bank: str = typer.Option("bank", "--bank", envvar="ECLM_BANK", help=BANK_HELP + " Written."),
    seed: int = typer.Option(0, "--seed", envvar="ECLM_SEED",
                             help="Seed for the data split, initialisation and order."),
    config: str = typer.Option("digits", "--config", envvar="ECLM_MODEL_CONFIG",
                               help="Model configuration: digits or resnet18."),
    epochs: int = typer.Option(None, "--epochs", min=1, envvar="ECLM_EPOCHS", show_default="the config's",
                               help="End-to-end epochs."),
    enhance_epochs: int = typer.Option(None, "--enhance-epochs", min=0, envvar="ECLM_ENHANCE_EPOCHS",
                                       show_default="the config's", help="Module ability-enhancing epochs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", envvar="ECLM_QUIET", show_default="off",
                               help="No progress bars."),
) -> None:
    """Train end to end on the 30% proxy split, then enhance module ability, and write bank version 1.

    Same data, seed and config give the same bank (same bank id, same tensors).
    """
    from exporter.cloud import TrainOptions, train_bank
    from exporter.summary import bank_summary

    bars: dict[str, object] = {}

    def progress(stage: str, epoch: int, total: int, stats: dict[str, float]) -> None:
        if quiet:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="epoch", leave=True)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})  # type: ignore[attr-defined]
        bar.update(1)  # type: ignore[attr-defined]
        if epoch == total:
            bar.close()  # type: ignore[attr-defined]

    info = train_bank(
        TrainOptions(dataset=dataset, bank_dir=bank, seed=seed, config=config, epochs=epochs,
                     enhance_epochs=enhance_epochs),
        progress,
    )
    from module_bank import redact

    typer.echo(bank_summary(info, redact(bank)))


def main() -> None:
    app()


@app.command()
@reports_errors
def keys(out: Path = typer.Option(Path("keys"), "--out", envvar="ECLM_KEYS_DIR",
                                  help="Folder for signing.key and signing.pub.")) -> None:
    """Create the cloud's Ed25519 signing key pair: keep signing.key in the cloud, give signing.pub to devices."""
    from eclm.signing import generate_keys, load_verifier

    out.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keys(out)
    typer.echo(f"wrote {priv} (private, mode 600) and {pub} (key id {load_verifier(pub).key_id})")


def build_hooks(bank: Path | str, signing_key: Path | None, gate: bool = True) -> SyncHooks:
    """What ``sync`` hands the daemon from :mod:`exporter`: the gate's evaluation (torch; none with
    ``gate`` off) and bundle derivation. The only way torch and :mod:`exporter` reach ``cloud_sync``.
    """
    from functools import partial

    from cloud_sync.ports import SyncHooks
    from exporter.bundle_job import derive_bundle

    evaluator = None
    if gate:
        from exporter.gate_eval import gate_evaluator

        evaluator = gate_evaluator
    return SyncHooks(evaluator, partial(derive_bundle, bank, signing_key))


@app.command()
@reports_errors
def sync(
    bank: str = typer.Option("bank", "--bank", envvar="ECLM_BANK", help=BANK_HELP),
    broker: str = typer.Option("mqtt://127.0.0.1:1883", "--broker", envvar="ECLM_BROKER",
                               help="MQTT broker URL: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] with --tls-dir."),
    tls_dir: Path = typer.Option(None, "--tls-dir", envvar="ECLM_TLS_DIR", file_okay=False,
                                 show_default="none (needed for mqtts://)",
                                 help="The cloud identity's cert.pem, key.pem and ca.pem (from "
                                 "`eclm-cloud pki enroll --cloud NAME`)."),
    signing_key: Path = typer.Option(None, "--signing-key", envvar="ECLM_SIGNING_KEY", exists=True, dir_okay=False,
                                     show_default="none: no updates are sent",
                                     help="Ed25519 key to sign module and bundle updates."),
    round_deltas: int = typer.Option(5, "--round-deltas", min=1, envvar="ECLM_SYNC_ROUND_DELTAS",
                                     help="Merge once this many deltas are pending."),
    round_seconds: float = typer.Option(30.0, "--round-seconds", envvar="ECLM_SYNC_ROUND_SECONDS",
                                        help="... or once the oldest waited this long."),
    strategy: str = typer.Option("robust", "--strategy", envvar="ECLM_SYNC_STRATEGY",
                                 help="robust (weighted, norm-clipped, opposing deltas dropped), weighted "
                                      "(plain FedAvg-style), trimmed, median."),
    min_devices: int = typer.Option(2, "--min-devices", min=1, envvar="ECLM_SYNC_MIN_DEVICES",
                                    help="Distinct devices a module needs in a round (deltas wait until then); "
                                         "no device weighs more than 1/this of a module."),
    support_max_age: float = typer.Option(6 * 3600.0, "--support-max-age", min=1, envvar="ECLM_SYNC_SUPPORT_MAX_AGE",
                                          help="Seconds a delta may wait for support before it expires."),
    support_max_rounds: int = typer.Option(10, "--support-max-rounds", min=1, envvar="ECLM_SYNC_SUPPORT_MAX_ROUNDS",
                                           help="Merge rounds a delta may wait for support before it expires."),
    gate_margin: float = typer.Option(0.02, "--gate-margin", envvar="ECLM_SYNC_GATE_MARGIN",
                                      help="Hold back a merge that lowers validation accuracy by more than this."),
    no_gate: bool = typer.Option(False, "--no-gate", envvar="ECLM_SYNC_NO_GATE", show_default="off (gated)",
                                 help="Merge without the validation gate. Gated, a bank whose data set cannot be "
                                      "loaded merges nothing (said in status and metrics)."),
    no_environments: bool = typer.Option(False, "--no-environments", envvar="ECLM_SYNC_NO_ENVIRONMENTS",
                                         show_default="off (environment lines)",
                                         help="Merge every delta into the one shared line, whatever environment its "
                                              "device reports (by default each environment has its own line of "
                                              "each module: docs/method.md)."),
    max_environments: int = typer.Option(256, "--max-environments", min=0, envvar="ECLM_SYNC_MAX_ENVIRONMENTS",
                                         help="Environments with module lines at most; a delta that would open one "
                                              "more is refused (devices cannot grow the bank without bound)."),
    weighting: str = typer.Option("importance", "--weighting", envvar="ECLM_SYNC_WEIGHTING",
                                  help="Merge weights: importance (module importance x samples), samples, equal."),
    max_staleness: int = typer.Option(10, "--max-staleness", envvar="ECLM_SYNC_MAX_STALENESS",
                                      help="Versions a delta's base may lag behind (stale deltas weigh less)."),
    max_payload: int = typer.Option(4 * 2**20, "--max-payload", envvar="ECLM_SYNC_MAX_PAYLOAD",
                                    help="Reject messages larger than this (bytes)."),
    derive_interval: float = typer.Option(60.0, "--derive-interval", min=0, envvar="ECLM_SYNC_DERIVE_INTERVAL",
                                          help="At most one bundle derivation per device per this many seconds."),
    derive_threshold: float = typer.Option(0.5, "--derive-threshold", min=0, envvar="ECLM_SYNC_DERIVE_THRESHOLD",
                                           help="Re-derive a device's bundle when its measured importance moves "
                                           "this far (mean per-layer L1) from what its bundle was derived for; "
                                           "inf: never on importance alone (a device can still ask)."),
    update_codec: str = typer.Option("fp32+zlib", "--update-codec", envvar="ECLM_SYNC_UPDATE_CODEC",
                                     help="Tensor encoding of the module updates sent to devices: fp32 or fp16 "
                                          "(half the bytes; weights rounded to 11 significant bits), then zlib, "
                                          "lzma or none. Updates carry whole weights, so int8 and topF are refused."),
    metrics_port: int = typer.Option(9464, "--metrics-port", envvar="ECLM_SYNC_METRICS_PORT",
                                     help="Prometheus /metrics on 127.0.0.1 at this port (0: off); worker i of "
                                          "--workers uses port + i."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, envvar="ECLM_SYNC_WORKERS",
                                help="Merger processes on this machine, supervised and sharing the device topics "
                                     "(MQTT 5 shared subscriptions; a PostgreSQL bank for more than one machine)."),
    share_group: str = typer.Option("", "--share-group", envvar="ECLM_SYNC_SHARE_GROUP",
                                    show_default="none; eclm-sync with --workers > 1",
                                    help="Subscribe as $share/GROUP/... so that workers (on any machine) with the "
                                         "same group split the deltas; needs an MQTT 5 broker."),
    claim_seconds: float = typer.Option(120.0, "--claim-seconds", min=1, envvar="ECLM_SYNC_CLAIM_SECONDS",
                                        help="A worker's hold on the merge round lapses after this long (a killed "
                                             "worker's round is taken over then)."),
    client_id: str = typer.Option("", "--client-id", envvar="ECLM_SYNC_CLIENT_ID",
                                  show_default="eclm-sync-<random, kept with the bank>",
                                  help="MQTT client id (each worker needs its own)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="ECLM_SYNC_VERBOSE", show_default="off",
                                 help="Debug logging."),
) -> None:
    """Run the merger daemon: validate and store deltas, merge them in rounds, send updated modules back.

    Every delta is acknowledged to its device once it is stored (or rejected, with the reason); a delta
    id is merged at most once, and a merge that would bring validation accuracy below the best released
    version's minus the margin is held back. A message, delta or derivation that fails is quarantined
    (see `eclm-cloud quarantine`); if the round loop or the derivation worker dies, the daemon stops
    acknowledging and exits non-zero for its supervisor to restart it. Stop with Ctrl-C or SIGTERM;
    SIGUSR1 merges what is pending at once, whatever --round-deltas and --round-seconds say (one round of a
    known set of deltas, as a benchmark's step or an operator wants).
    """
    import logging
    import signal
    import threading

    merge_now = threading.Event()  # SIGUSR1 from now on (before the bank loads) asks for a round, never kills
    signal.signal(signal.SIGUSR1, lambda *_: merge_now.set())

    from cloud_sync.daemon import SyncDaemon, SyncSettings
    from cloud_sync.merger import MergeSettings
    from cloud_sync.redistribute import update_codec_name
    from cloud_sync.validation import Limits
    from eclm.signing import load_signer

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s {client_id + ' ' if client_id else ''}%(name)s: "
                               "%(message)s")
    codec = update_codec_name(update_codec)  # a bad one stops here, before any worker starts
    if workers > 1:
        _supervise(workers, bank, share_group or "eclm-sync", client_id, metrics_port)
        return
    settings = SyncSettings(
        bank_dir=bank, broker=broker, round_deltas=round_deltas, round_seconds=round_seconds,
        max_payload=max_payload, signing_key=signing_key, tls_dir=tls_dir, derive_interval=derive_interval,
        derive_threshold=derive_threshold, update_codec=codec,
        merge=MergeSettings(strategy=strategy, gate_margin=gate_margin, gate=not no_gate,
                            limits=Limits(max_staleness=max_staleness), min_devices=min_devices,
                            support_max_age=support_max_age, support_max_rounds=support_max_rounds,
                            environments=not no_environments, weighting=weighting,
                            max_environments=max_environments),
        share_group=share_group, claim_seconds=claim_seconds, client_id=client_id,
    )
    daemon = SyncDaemon(settings, load_signer(signing_key) if signing_key else None,
                        build_hooks(bank, signing_key, gate=not no_gate), merge_now)
    if metrics_port:
        from cloud_sync.metrics import serve_metrics

        try:
            serve_metrics(daemon.core, metrics_port)
        except OSError as exc:
            logging.getLogger("eclm.sync").warning("no /metrics: port %d: %s (use --metrics-port)", metrics_port, exc)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop.set())
    try:
        daemon.run()
    except KeyboardInterrupt:
        daemon.stop.set()


@app.command("copy-bank")
@reports_errors
def copy_bank_command(
    source: str = typer.Option("bank", "--from", envvar="ECLM_BANK",
                               help="The bank to copy: a directory or postgresql://USER@HOST[:PORT]/DB."),
    dest: str = typer.Option(..., "--to", envvar="ECLM_BANK_COPY_TO", show_default="required",
                             help="Where to: an empty directory or an empty PostgreSQL database."),
) -> None:
    """Copy a bank (description, current module versions, validation secret) to another place, e.g. a lab's
    directory bank into PostgreSQL for several workers. The ledger starts empty there; stop the daemon first.
    """
    from module_bank import copy_bank, redact

    info = copy_bank(source, dest)
    typer.echo(f"copied bank {info.bank_id} ({len(info.parts)} parts) from {redact(source)} to {redact(dest)}")


def _supervise(workers: int, bank: str, group: str, client_id: str, metrics_port: int) -> None:
    """Run ``workers`` worker processes of this command until SIGTERM or Ctrl-C."""
    import sys

    from cloud_sync.daemon import client_id_for
    from cloud_sync.workers import Supervisor
    from module_bank import open_bank

    opened = open_bank(bank)  # fails now, with a hint, when the bank is not there
    try:
        base = client_id or client_id_for(bank, opened.ledger)
    finally:
        opened.close()
    Supervisor(workers, sys.argv[1:], base, group, metrics_port).run()


@app.command()
@reports_errors
def quarantine(bank: str = typer.Option("bank", "--bank", envvar="ECLM_BANK", help=BANK_HELP),
               as_json: bool = typer.Option(False, "--json", envvar="ECLM_JSON", show_default="off",
                                            help="Print JSON.")) -> None:
    """What the daemon set aside (deltas, messages, derivations, updates), newest first, with the reason."""
    from module_bank import open_bank

    opened = open_bank(bank)
    try:
        rows = opened.ledger.quarantined()
    finally:
        opened.close()
    if as_json:
        from eclm.jsonsafe import dumps

        typer.echo(dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("nothing quarantined")
        return
    from eclm.cli_support import text_table

    typer.echo(text_table(["kind", "subject", "reason"], [[r["kind"], r["subject"][:40], r["reason"][:100]]
                                                          for r in rows]))


@app.command()
@reports_errors
def status(bank: str = typer.Option("bank", "--bank", envvar="ECLM_BANK", help=BANK_HELP),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Module versions, devices seen, deltas merged and rejected (by reason), as tables or JSON."""
    from module_bank import JobQueue, open_bank

    opened = open_bank(bank)
    ledger = opened.ledger
    try:
        info = opened.store.info()
        report = {"bank_id": info.bank_id,
                  "module_versions": {k: v.version for k, v in sorted(info.parts.items()) if v.version > 1},
                  "parts": len(info.parts), **ledger.summary(),
                  "environment_lines": _lines_by_environment(info.lines),
                  "best_released_accuracy": ledger.best_released(),
                  "gate_problem": ledger.meta("gate_problem") or "",
                  "derive_queue": JobQueue(opened.db).counts(),
                  "merge_claim": _claim_text(opened.db),
                  "quarantined": len(ledger.quarantined()),
                  "waiting_support": ledger.waiting(), "expired_parts": ledger.expired_parts(),
                  "devices": [{k: d[k] for k in ("device_id", "online", "last_seen", "bundle", "profile",
                                                 "environment")}
                              for d in ledger.devices()]}
    finally:
        opened.close()
    if as_json:
        from eclm.jsonsafe import dumps

        typer.echo(dumps(report, indent=2))
        return
    typer.echo(_status_text(report))


def _lines_by_environment(lines: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Environment -> part -> the version of its line (docs/method.md, "Environment lines")."""
    from eclm.parts import split_line_key

    out: dict[str, dict[str, int]] = {}
    for key, rec in sorted(lines.items()):
        pid, env = split_line_key(key)
        out.setdefault(env, {})[pid] = rec.version
    return out


def _claim_text(db: Any) -> str:
    """Which worker merges now ("" when none holds the round)."""
    import time

    from module_bank.work import holder

    held = holder(db, "merge")
    if held is None or held[1] < time.time():
        return ""
    return f"{held[0]} (for {held[1] - time.time():.0f} s more)"


def _status_text(report: dict[str, Any]) -> str:
    """`eclm-cloud status` for people: aligned tables, rounded figures, short digests."""
    import time

    from eclm.cli_support import text_table

    now = time.time()
    deltas = report["deltas"] or {}
    out = [f"bank {report['bank_id']}: {report['parts']} parts, {len(report['module_versions'])} above version 1",
           "deltas: " + ", ".join(f"{k} {deltas.get(k, 0):,}" for k in ("merged", "held", "rejected", "pending",
                                                                         "expired"))
           + f"; uplink {report['uplink_bytes']:,} bytes",
           f"waiting for support from more devices: {report.get('waiting_support', 0):,} deltas; "
           f"parts expired waiting: {report.get('expired_parts', 0):,}",
           f"quarantined {report['quarantined']:,}; bundle derivations waiting {report['derive_queue']['queued']}, "
           f"running {report['derive_queue']['running']}; "
           + ("best released validation accuracy "
              + (f"{report['best_released_accuracy']:.4f}" if report["best_released_accuracy"] is not None else "-"))]
    if report.get("gate_problem"):
        out.insert(1, f"MERGING STOPPED: {report['gate_problem']}")
    for env, parts in (report.get("environment_lines") or {}).items():
        here = sum(1 for d in report["devices"] if d.get("environment") == env)
        out.append(f"environment {env}: {len(parts)} module lines (newest version {max(parts.values())}), "
                   f"{here} devices there now")
    if report.get("merge_claim"):
        out.append(f"merging now: {report['merge_claim']}")
    if report["module_versions"]:
        out += ["", text_table(["part", "version"], [[k, v] for k, v in report["module_versions"].items()])]
    if report["rejected_by_reason"]:
        out += ["", text_table(["rejected because", "deltas"],
                               [[k, v] for k, v in report["rejected_by_reason"].items()])]
    if report["recent_rounds"]:
        out += ["", text_table(["round", "outcome", "validation before", "after"],
                               [[r["round"], r["outcome"], r.get("val_before"), r.get("val_after")]
                                for r in report["recent_rounds"]])]
    if report["devices"]:
        def ago(t: Any) -> str:
            return "-" if not isinstance(t, int | float) else f"{max(0.0, now - t):,.0f} s ago"

        out += ["", text_table(["device", "online", "last seen", "profile", "bundle"],
                               [[d["device_id"], bool(d["online"]), ago(d["last_seen"]), d["profile"],
                                 (d["bundle"] or "-")[:12]] for d in report["devices"]])]
    else:
        out += ["", "no devices seen yet"]
    return "\n".join(out)


register_pki(app)  # `pki ...` and `broker-config`, listed after the commands above

if __name__ == "__main__":
    main()
