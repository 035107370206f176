"""`eclm-edge`: the board's command: serve a bundle, or verify one."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import typer

from eclm.cli_support import make_app, reports_errors

app = make_app("ECLM on the board: serve and fine-tune a bundle (torch-free), or verify one.")


@app.callback()
def _root() -> None:
    """ECLM on the board."""


@app.command()
@reports_errors
def verify(
    bundle: Path = typer.Option(..., "--bundle", "-b", envvar="ECLM_BUNDLE", help="Bundle directory."),
    trust_key: Path = typer.Option(None, "--trust-key", envvar="ECLM_TRUST_KEY", exists=True, dir_okay=False,
                                   help="The cloud's public key (signing.pub): the manifest must carry its signature."),
) -> None:
    """Check a bundle as `serve` does: every file against its sha256, regular files only (no links), and with
    --trust-key the signature over the manifest; exit 14 listing every problem.
    """
    from eclm.manifest import verify_bundle
    from eclm.signing import load_verifier

    verifier = load_verifier(trust_key) if trust_key is not None else None
    man = verify_bundle(bundle, verifier)
    if verifier is not None:
        signature = f"signed by {verifier.key_id}"
    elif man.signature:
        signature = f"signature NOT checked (signed by key {man.signature.get('key_id')}; pass --trust-key)"
    else:
        signature = "signature NOT checked (unsigned; pass --trust-key to require a signature)"
    issued = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(man.issued_at))
    typer.echo(f"bundle {bundle} verified: {len(man.files)} files, {signature}, "
               f"device {man.device_id or 'any'}, profile {man.profile_name}, issued {issued}, bank {man.bank_id}, "
               f"training {'yes' if man.training.get('available') else 'no'}")


@app.command()
@reports_errors
def serve(
    bundle: Path = typer.Option(None, "--bundle", "-b", envvar="ECLM_BUNDLE",
                                help="Bundle from eclm-export (optional once one is installed in the state dir)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="Where samples, models and the outbox live "
                                   "[env ECLM_EDGE_STATE_DIR; default ./eclm-state]."),
    port: int = typer.Option(None, "--port", help="HTTP port [env ECLM_EDGE_PORT; default 8080]."),
    host: str = typer.Option(None, "--host", help="HTTP address [default 127.0.0.1: this machine only]."),
    device_id: str = typer.Option(None, "--device-id", help="This device's id [env ECLM_EDGE_DEVICE_ID]."),
    config: Path = typer.Option(None, "--config", "-c", envvar="ECLM_EDGE_CONFIG", exists=True, dir_okay=False,
                                help="TOML config file (keys as in edge_runtime/config.py, optionally under [edge])."),
    train_every: int = typer.Option(None, "--train-every", help="Fine-tune after this many new samples (0: never)."),
    train_interval: float = typer.Option(None, "--train-interval", help="Also fine-tune every N seconds."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override the bundle's epochs."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Override the bundle's batch size."),
    learning_rate: float = typer.Option(None, "--learning-rate", help="Override the bundle's learning rate."),
    broker: str = typer.Option(None, "--broker", envvar="ECLM_BROKER",
                               help="Sync with the cloud through this MQTT broker, e.g. mqtt://127.0.0.1:1883."),
    trust_key: Path = typer.Option(None, "--trust-key", envvar="ECLM_TRUST_KEY", exists=True, dir_okay=False,
                                   help="The cloud's public key (signing.pub); updates must be signed by it."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request."),
) -> None:
    """Verify the bundle, then serve predictions and collect samples over HTTP; fine-tune in the background.

    Endpoints: POST /v1/predict, POST /v1/samples, POST /v1/train, GET /v1/status, GET /metrics.
    Samples, trained generations and the outbox of deltas live in the state directory and survive
    restarts; a refused bundle leaves the previously installed one serving.
    """
    from edge_runtime.config import load_config
    from edge_runtime.http_api import serve as make_server
    from edge_runtime.service import EdgeService

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config, {
        "bundle": bundle, "state_dir": state_dir, "port": port, "host": host, "device_id": device_id,
        "train_every_samples": train_every, "train_interval_s": train_interval, "epochs": epochs,
        "batch_size": batch_size, "learning_rate": learning_rate, "broker": broker, "trust_key": trust_key,
    })
    service = EdgeService(cfg)
    server = make_server(service, cfg.host, cfg.port)
    service.start_monitors()
    sync = None
    if cfg.broker:
        from edge_runtime.sync import EdgeSync

        sync = EdgeSync(service)
        sync.start()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    s = service.serving
    typer.echo(f"eclm-edge {cfg.device_id}: serving bundle {s.digest} (profile {s.manifest.profile['name']}, "
               f"generation {s.generation}, training {'on' if s.trainable else 'off'}) "
               f"on http://{cfg.host}:{server.server_address[1]}", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if sync is not None:
            sync.close()
        service.close()


def main() -> None:
    app()
