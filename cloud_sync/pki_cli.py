"""`eclm-cloud pki ...` and `eclm-cloud broker-config`: device identity by certificate, and a broker that checks it."""

from __future__ import annotations

from pathlib import Path

import typer

from eclm.cli_support import make_app, reports_errors

pki_app = make_app("A small certificate authority: device, cloud and broker certificates, and revocation.")
PKI_DIR = typer.Option(Path("pki"), "--pki", envvar="ECLM_PKI_DIR", file_okay=False,
                       help="The PKI directory (from `eclm-cloud pki init`).")
DAYS = typer.Option(1825, "--days", min=1, envvar="ECLM_PKI_DAYS", help="Validity of the certificate, in days.")


@pki_app.callback()
def _pki() -> None:
    """Device identity: each device's TLS client certificate (CN = its id) is what the broker knows it by."""


@pki_app.command()
@reports_errors
def init(out: Path = typer.Option(Path("pki"), "--out", envvar="ECLM_PKI_DIR", file_okay=False,
                                  help="Folder for the CA (ca.pem, ca.key) and its CRL (crl.pem)."),
         days: int = typer.Option(3650, "--days", min=1, envvar="ECLM_PKI_CA_DAYS",
                                  help="Validity of the CA (and of its CRL), in days.")) -> None:
    """Create the CA (an ECDSA P-256 key, mode 0600, and its certificate) and an empty CRL."""
    from cloud_sync.pki import init_ca

    init_ca(out, days)
    typer.echo(f"wrote the CA to {out}/ca.pem (key {out}/ca.key, mode 600; keep it off the broker) and an empty "
               f"CRL {out}/crl.pem")


@pki_app.command()
@reports_errors
def enroll(device_id: str = typer.Argument(None, show_default="none", help="The device's id (its certificate CN)."),
           cloud: str = typer.Option(None, "--cloud", envvar="ECLM_PKI_CLOUD", show_default="none",
                                     help="Enroll the cloud merger NAME instead (CN eclm-cloud/NAME)."),
           pki: Path = PKI_DIR, days: int = DAYS,
           force: bool = typer.Option(False, "--force", envvar="ECLM_PKI_FORCE", show_default="off",
                                      help="Issue a new certificate for an enrolled identity (revoking the old)."),
           ) -> None:
    """A key and certificate for a device (DIR/devices/ID/) or a cloud merger (DIR/cloud/NAME/): cert.pem,
    key.pem (mode 0600) and ca.pem, the folder to give to `--tls-dir`.
    """
    from cloud_sync.pki import enroll_cloud, enroll_device
    from eclm.errors import ConfigError

    if (device_id is None) == (cloud is None):
        raise ConfigError("name a device id or --cloud NAME (not both)",
                          hint="e.g. eclm-cloud pki enroll dev1 --pki DIR, or eclm-cloud pki enroll --cloud merger")
    folder = enroll_device(pki, device_id, force, days) if device_id is not None else enroll_cloud(pki, cloud, force,
                                                                                                  days)
    typer.echo(f"wrote {folder}/cert.pem, key.pem (mode 600) and ca.pem: copy the folder to the "
               f"{'device' if device_id is not None else 'cloud'} and pass it as --tls-dir")


@pki_app.command()
@reports_errors
def server(host: str = typer.Option(..., "--host", envvar="ECLM_PKI_HOSTS",
                                    help="The broker's host names and IP addresses, comma-separated; clients check "
                                    "the one they connect to against these."),
           pki: Path = PKI_DIR, days: int = DAYS) -> None:
    """The broker's server certificate (DIR/server/), with each host as a subjectAltName."""
    from cloud_sync.pki import server_cert

    folder = server_cert(pki, host.split(","), days)
    typer.echo(f"wrote {folder}/cert.pem and key.pem (mode 600: make it readable by the broker's user)")


@pki_app.command()
@reports_errors
def revoke(device_id: str = typer.Argument(None, show_default="none", help="The device whose certificate to revoke."),
           cloud: str = typer.Option(None, "--cloud", envvar="ECLM_PKI_CLOUD", show_default="none",
                                     help="Revoke the cloud merger NAME's certificate instead."),
           pki: Path = PKI_DIR) -> None:
    """Add the certificate to the CRL (DIR/crl.pem) that the broker checks (on SIGHUP for new connections;
    restart it to cut off a client that is connected).
    """
    from cloud_sync.pki import revoke as revoke_cert

    serial = revoke_cert(pki, device_id, cloud)
    typer.echo(f"revoked serial {serial:x} in {pki}/crl.pem: send mosquitto SIGHUP (refuses new connections) or "
               "restart it (also drops a connected client)")


def broker_config(
    pki: Path = PKI_DIR,
    port: int = typer.Option(8883, "--port", envvar="ECLM_BROKER_PORT", help="The TLS listener's port."),
    out: Path = typer.Option(Path("mosquitto.conf"), "--out", envvar="ECLM_BROKER_CONFIG", dir_okay=False,
                             help="The configuration to write; the ACL goes beside it (same name, .acl)."),
    bind: str = typer.Option(None, "--bind", envvar="ECLM_BROKER_BIND", show_default="every address",
                             help="Address the listener binds to."),
) -> None:
    """Write a Mosquitto 2 configuration: a TLS listener that requires a client certificate of the PKI's CA,
    takes its CN as the username, checks the CRL, and an ACL where a device reads and writes only its own
    topics and the enrolled cloud mergers read every device's and write acks, updates and requests.
    """
    from cloud_sync.broker_config import write_broker_config

    conf, acl = write_broker_config(pki, port, out, bind)
    typer.echo(f"wrote {conf} and {acl}; run `mosquitto -c {conf}` (re-generate after enrolling a cloud merger)")


def register_pki(app: typer.Typer) -> None:
    """Add `pki` and `broker-config` to `eclm-cloud`."""
    app.add_typer(pki_app, name="pki")
    app.command("broker-config")(reports_errors(broker_config))
