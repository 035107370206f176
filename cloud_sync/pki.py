"""A small certificate authority for device identity: the CA, device, cloud and broker certificates, the CRL.

Layout of a PKI directory (``eclm-cloud pki init --out DIR``)::

    DIR/ca.pem  DIR/ca.key (0600)  DIR/crl.pem
    DIR/devices/DEVICE_ID/{cert.pem,key.pem,ca.pem}   one per device, CN = the device id
    DIR/cloud/NAME/{cert.pem,key.pem,ca.pem}          one per merger, CN = "eclm-cloud/NAME"
    DIR/server/{cert.pem,key.pem,ca.pem}              the broker's, subjectAltNames = its hosts

Keys are ECDSA P-256 (OpenSSL, hence mosquitto, and Python's ssl both take them). A device id never
contains "/" (eclm/topics.py), and every cloud and broker CN does, so no device can ever hold a cloud
identity; and a CN with "/" put into a device topic pattern makes no device topic. Device and cloud
certificates are for client authentication only and the broker's for server authentication only, so
the broker's certificate cannot log in as a client.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eclm import topics
from eclm.errors import ConfigError
from eclm.hashing import atomic_write_bytes

CLOUD_PREFIX = "eclm-cloud/"  # a cloud identity is CLOUD_PREFIX + NAME; device ids cannot contain "/"
BROKER_PREFIX = "eclm-broker/"
MAX_CN = 64  # X.509's upper bound for a common name
CA_DAYS = 3650
LEAF_DAYS = 1825
_CLOUD_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_CN - len(CLOUD_PREFIX)}}}")
_SKEW = dt.timedelta(hours=1)  # certificates and CRLs are valid from an hour ago: boards' clocks drift


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    path.chmod(0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    path.chmod(0o644)


@dataclass(frozen=True)
class Authority:
    """A loaded CA: its directory, certificate and key."""

    root: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @staticmethod
    def load(root: Path) -> Authority:
        try:
            cert = x509.load_pem_x509_certificate((root / "ca.pem").read_bytes())
            key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{root} is not a usable PKI directory ({exc})",
                              hint=f"create one with `eclm-cloud pki init --out {root}`") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{root / 'ca.key'} is not an ECDSA key", hint="re-create the PKI with `pki init`")
        return Authority(root, cert, key)

    def issue(self, cn: str, *, server_hosts: list[str] | None = None, days: int = LEAF_DAYS
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A new P-256 key and its certificate: client authentication, or server authentication for the hosts."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts is not None else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if server_hosts is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]),
                                            critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def write_identity(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        _write_key(folder / "key.pem", key)
        _write_public(folder / "cert.pem", _pem(cert))
        _write_public(folder / "ca.pem", _pem(self.cert))
        return folder

    def write_crl(self, revoked: dict[int, dt.datetime], number: int) -> Path:
        """Sign the CRL (valid until the CA expires: an expired CRL would lock every client out)."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - _SKEW).next_update(self.cert.not_valid_after_utc)
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
        path = self.root / "crl.pem"
        _write_public(path, builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path

    def crl(self) -> x509.CertificateRevocationList:
        try:
            return x509.load_pem_x509_crl((self.root / "crl.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the CRL {self.root / 'crl.pem'}: {exc}",
                              hint="re-create the PKI with `eclm-cloud pki init`") from exc


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})", host):
            raise ConfigError(f"{host!r} is neither an IP address nor a DNS name",
                              hint="e.g. --host broker.example.org,10.0.0.5") from None
        return x509.DNSName(host)


def init_ca(out: Path, days: int = CA_DAYS, name: str = "ECLM device CA") -> Path:
    """Create the CA (``ca.pem``, ``ca.key`` mode 0600) and an empty CRL in ``out``; refuse to overwrite one."""
    if (out / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA",
                          hint="choose another --out: a new CA would orphan every certificate it issued")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    _write_key(out / "ca.key", key)
    _write_public(out / "ca.pem", _pem(cert))
    for sub in ("devices", "cloud", "server"):
        (out / sub).mkdir(exist_ok=True)
    Authority(out, cert, key).write_crl({}, 1)
    return out


def cloud_identity(name: str) -> str:
    """The certificate CN (so the broker username) of the cloud merger ``name``."""
    return CLOUD_PREFIX + name


def check_device_id(device_id: str) -> str:
    if not topics.is_device_id(device_id) or len(device_id) > MAX_CN or not device_id.isprintable() \
            or device_id != device_id.strip():
        raise ConfigError(f"device id {device_id!r} cannot be a certificate identity",
                          hint=f"use 1..{MAX_CN} letters, digits, '-', '_' or '.' (no '/', '+', '#' or spaces)")
    return device_id


def check_cloud_name(name: str) -> str:
    if not _CLOUD_NAME.fullmatch(name):
        raise ConfigError(f"cloud name {name!r} is not usable",
                          hint=f"use 1..{MAX_CN - len(CLOUD_PREFIX)} letters, digits, '-', '_' or '.'")
    return name


def cloud_names(pki: Path) -> list[str]:
    """The enrolled cloud identities' names."""
    folder = pki / "cloud"
    return sorted(p.name for p in folder.iterdir() if (p / "cert.pem").exists()) if folder.is_dir() else []


def enroll_device(pki: Path, device_id: str, force: bool = False, days: int = LEAF_DAYS) -> Path:
    """A device's key and certificate (CN = its id) in ``pki/devices/ID/``; re-enrolling revokes the old one."""
    check_device_id(device_id)
    ca = Authority.load(pki)
    if device_id in cloud_names(pki):
        raise ConfigError(f"{device_id!r} is the name of a cloud identity in {pki}",
                          hint="pick another device id: the same name for both would confuse every log")
    return _enroll(ca, pki / "devices" / device_id, device_id, force, days, f"device {device_id}")


def enroll_cloud(pki: Path, name: str, force: bool = False, days: int = LEAF_DAYS) -> Path:
    """The merger's key and certificate (CN = ``eclm-cloud/NAME``) in ``pki/cloud/NAME/``."""
    check_cloud_name(name)
    ca = Authority.load(pki)
    if (pki / "devices" / name / "cert.pem").exists():
        raise ConfigError(f"{name!r} is an enrolled device id in {pki}", hint="pick another cloud name")
    return _enroll(ca, pki / "cloud" / name, cloud_identity(name), force, days, f"cloud {name}")


def _enroll(ca: Authority, folder: Path, cn: str, force: bool, days: int, what: str) -> Path:
    if (folder / "cert.pem").exists():
        if not force:
            raise ConfigError(f"{what} is already enrolled ({folder})",
                              hint="pass --force to issue a new certificate (the old one is revoked)")
        _revoke_file(ca, folder / "cert.pem")
    key, cert = ca.issue(cn, days=days)
    return ca.write_identity(folder, key, cert)


def server_cert(pki: Path, hosts: list[str], days: int = LEAF_DAYS) -> Path:
    """The broker's certificate, with every host (DNS name or IP) as a subjectAltName, in ``pki/server/``."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ConfigError("no host for the broker's certificate", hint="e.g. --host broker.example.org,127.0.0.1")
    ca = Authority.load(pki)
    key, cert = ca.issue(BROKER_PREFIX + hosts[0][:MAX_CN - len(BROKER_PREFIX)], server_hosts=hosts, days=days)
    return ca.write_identity(pki / "server", key, cert)


def revoke(pki: Path, device_id: str | None = None, cloud: str | None = None) -> int:
    """Put a device's (or a cloud identity's) certificate on the CRL; returns its serial number."""
    ca = Authority.load(pki)
    if (device_id is None) == (cloud is None):
        raise ConfigError("name a device id or --cloud NAME to revoke",
                          hint="e.g. eclm-cloud pki revoke dev1 --pki DIR")
    folder = pki / "devices" / check_device_id(device_id) if device_id is not None \
        else pki / "cloud" / check_cloud_name(str(cloud))
    if not (folder / "cert.pem").exists():
        raise ConfigError(f"{folder} holds no certificate",
                          hint="the enrolled ones are the folders under DIR/devices and DIR/cloud")
    return _revoke_file(ca, folder / "cert.pem")


def _revoke_file(ca: Authority, cert_path: Path) -> int:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    crl = ca.crl()
    revoked = {r.serial_number: r.revocation_date_utc for r in crl}
    revoked.setdefault(cert.serial_number, _now())
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    except x509.ExtensionNotFound:
        number = len(revoked) + 1
    ca.write_crl(revoked, number)
    return int(cert.serial_number)


def revoked_serials(pki: Path) -> set[int]:
    return {r.serial_number for r in Authority.load(pki).crl()}
