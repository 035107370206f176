"""`eclm-edge`: the board's command: serve a bundle, or verify one."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import typer

from eclm.cli_support import make_app, reports_errors
from edge_runtime.config import ENV_PREFIX, TRAIN_PAUSE_POLICIES, EdgeConfig

app = make_app("ECLM on the board: serve and fine-tune a bundle (torch-free), or verify one.")
_DEFAULTS = EdgeConfig()


def _setting(key: str, *names: str, help: str, also: tuple[str, ...] = (), **kwargs: Any) -> Any:  # noqa: A002
    """An option for the runtime setting ``key``: its ECLM_EDGE_* variable, and its default from EdgeConfig
    (the option itself defaults to None so that a config file can set it too).
    """
    default = getattr(_DEFAULTS, key)
    shown = "none" if default is None else ("off" if default is False else str(default))
    envvar = [ENV_PREFIX + key.upper(), *also]
    return typer.Option(None, *names, envvar=envvar if also else envvar[0], show_default=shown, help=help, **kwargs)


@app.callback()
def _root() -> None:
    """ECLM on the board."""


@app.command()
@reports_errors
def verify(
    bundle: Path = typer.Option(..., "--bundle", "-b", envvar=["ECLM_EDGE_BUNDLE", "ECLM_BUNDLE"],
                                help="Bundle directory."),
    trust_key: Path = typer.Option(None, "--trust-key", envvar="ECLM_TRUST_KEY", exists=True, dir_okay=False,
                                   show_default="none: the signature is not checked",
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
               f"training {'yes' if man.training.get('available') else 'no'}, "
               f"cheaper variants: {', '.join(v['name'] for v in man.variants) or 'none'}")


@app.command()
@reports_errors
def serve(
    bundle: Path = _setting("bundle", "--bundle", "-b", also=("ECLM_BUNDLE",),
                            help="Bundle from eclm-export (optional once one is installed in the state dir)."),
    state_dir: Path = _setting("state_dir", "--state-dir",
                               help="Where samples, models and the outbox live (one runtime per directory)."),
    port: int = _setting("port", "--port", min=0, max=65535, help="HTTP port (0: any free port)."),
    host: str = _setting("host", "--host", help="HTTP address; 127.0.0.1 answers this machine only."),
    device_id: str = _setting("device_id", "--device-id", help="This device's id."),
    environment: str = _setting("environment", "--environment",
                                help="Where the device works (e.g. line-3): devices that share one merge into and "
                                     "receive that environment's modules; '' is the shared line. Unset: the last "
                                     "one recorded (POST /v1/environment)."),
    config: Path = typer.Option(None, "--config", "-c", envvar="ECLM_EDGE_CONFIG", exists=True, dir_okay=False,
                                show_default="none",
                                help="TOML config file (keys as in edge_runtime/config.py, optionally under [edge])."),
    train_every: int = _setting("train_every_samples", "--train-every", min=0,
                                help="Fine-tune after this many new samples (0: never)."),
    train_interval: float = _setting("train_interval_s", "--train-interval", min=0.0,
                                     help="Also fine-tune every N seconds when new samples arrived (0: off)."),
    train_pause: str = _setting("train_pause", "--train-pause",
                                help="When automatic training waits: headroom (own latency over budget or free "
                                "memory short), variant (also while a cheaper variant serves), never."),
    epochs: int = _setting("epochs", "--epochs", min=1, help="Override the bundle's epochs (none: the bundle's)."),
    batch_size: int = _setting("batch_size", "--batch-size", min=1,
                               help="Override the bundle's batch size (none: the bundle's)."),
    learning_rate: float = _setting("learning_rate", "--learning-rate",
                                    help="Override the bundle's learning rate (none: the bundle's)."),
    refine_updates: bool = _setting("refine_updates", "--refine-updates",
                                    help="Fine-tune each module update from the cloud on this device's samples "
                                    "before judging it (one training run per update); off: judged as it came."),
    broker: str = _setting("broker", "--broker", also=("ECLM_BROKER",),
                           help="Sync with the cloud through this MQTT broker, e.g. mqtt://127.0.0.1:1883 or "
                           "mqtts://HOST:8883 (with --tls-dir); while it "
                           "cannot be reached the runtime serves offline and retries."),
    tls_dir: Path = _setting("tls_dir", "--tls-dir", also=("ECLM_TLS_DIR",), file_okay=False,
                             help="For an mqtts:// broker: this device's cert.pem, key.pem and ca.pem (the folder "
                             "`eclm-cloud pki enroll DEVICE_ID` wrote); the certificate's CN is the device's "
                             "identity."),
    trust_key: Path = _setting("trust_key", "--trust-key", also=("ECLM_TRUST_KEY",), exists=True, dir_okay=False,
                               help="The cloud's public key (signing.pub); updates must be signed by it."),
    api_token_file: Path = _setting("api_token_file", "--api-token-file", dir_okay=False,
                                    help="File holding the API token (mode 0600; `eclm-edge token --out FILE`): "
                                    "every endpoint but /healthz then wants 'Authorization: Bearer <token>'. "
                                    "Required beyond loopback."),
    api_tls_cert: Path = _setting("api_tls_cert", "--api-tls-cert", dir_okay=False,
                                  help="PEM certificate (chain) for HTTPS on the API (TLS 1.2+); with --api-tls-key."),
    api_tls_key: Path = _setting("api_tls_key", "--api-tls-key", dir_okay=False,
                                 help="PEM private key of --api-tls-cert (not readable by others)."),
    api_insecure_http: bool = _setting("api_insecure_http", "--api-insecure-http",
                                       help="Serve plain HTTP beyond loopback (only behind a TLS-terminating "
                                       "reverse proxy); without it a non-loopback --host needs TLS."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="ECLM_EDGE_VERBOSE", show_default="off",
                                 help="Log every request."),
) -> None:
    """Verify the bundle, then serve predictions and collect samples over HTTP; fine-tune in the background.

    Endpoints: POST /v1/predict, POST /v1/samples, POST /v1/train, GET /v1/status, GET /metrics.
    Samples, trained generations and the outbox of deltas live in the state directory and survive
    restarts; a refused bundle leaves the previously installed one serving. Settings: defaults, then
    the config file, then ECLM_EDGE_* variables, then these options. Beyond loopback the API needs
    --api-token-file and TLS (or --api-insecure-http). Exits 17 when the port or the state directory
    is in use or the API would be exposed unguarded, 14 when there is no valid bundle to serve.
    """
    from edge_runtime.config import load_config
    from edge_runtime.runner import run

    if train_pause is not None and train_pause not in TRAIN_PAUSE_POLICIES:
        from eclm.errors import ConfigError

        raise ConfigError(f"--train-pause {train_pause!r} is not a policy",
                          hint=f"use one of {', '.join(TRAIN_PAUSE_POLICIES)}")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(config, {
        "bundle": bundle, "state_dir": state_dir, "port": port, "host": host, "device_id": device_id,
        "environment": environment,
        "train_every_samples": train_every, "train_interval_s": train_interval, "train_pause": train_pause,
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "broker": broker,
        "refine_updates": refine_updates,
        "tls_dir": tls_dir, "trust_key": trust_key, "api_token_file": api_token_file, "api_tls_cert": api_tls_cert,
        "api_tls_key": api_tls_key, "api_insecure_http": api_insecure_http,
    })
    run(cfg, lambda line: typer.echo(line, err=True))


@app.command()
@reports_errors
def token(
    out: Path = typer.Option(..., "--out", "-o", envvar="ECLM_EDGE_API_TOKEN_FILE", dir_okay=False,
                             help="New file for the token (refused if it exists); written with mode 0600."),
) -> None:
    """Write a new random API token (256 bits) for `serve --api-token-file`; clients send it as
    'Authorization: Bearer <token>'.
    """
    from edge_runtime.api_security import write_token

    write_token(out)
    typer.echo(f"wrote a new API token to {out} (mode 0600); pass --api-token-file {out} to serve, and give "
               "clients the header 'Authorization: Bearer <the file's contents>'")


def main() -> None:
    app()
