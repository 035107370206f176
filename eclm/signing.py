"""Ed25519 signing of bundles and update messages: the cloud signs, devices verify with its public key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from eclm.errors import BundleError, ConfigError
from eclm.hashing import atomic_write_bytes

ALGORITHM = "ed25519"


def key_id(public: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key (first 16 hex digits of the sha256 of its raw bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """The cloud's private key."""

    private: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return key_id(self.private.public_key())

    def sign(self, data: bytes) -> dict[str, str]:
        return {"alg": ALGORITHM, "key_id": self.key_id, "sig": self.private.sign(data).hex()}


@dataclass(frozen=True)
class Verifier:
    """A device's trusted public key."""

    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    def verify(self, data: bytes, signature: dict[str, str] | None, what: str) -> None:
        """Raise :class:`BundleError` unless ``signature`` is this key's valid signature of ``data``."""
        if not signature:
            raise BundleError(f"{what} is not signed", hint="only signed updates are accepted; sign it in the cloud")
        if not isinstance(signature, dict) or not isinstance(signature.get("sig"), str):
            raise BundleError(f"{what} has a malformed signature", hint="it is refused; re-sign it")
        if signature.get("alg") != ALGORITHM or signature.get("key_id") != self.key_id:
            raise BundleError(
                f"{what} is signed by key {signature.get('key_id')!r}, not the trusted key {self.key_id}",
                hint="install the cloud's public key with --trust-key, or re-sign with the trusted key",
            )
        try:
            self.public.verify(bytes.fromhex(signature.get("sig", "")), data)
        except (InvalidSignature, ValueError) as exc:
            raise BundleError(f"{what} has an invalid signature", hint="it was altered; it is refused") from exc


def generate_keys(folder: Path) -> tuple[Path, Path]:
    """Write ``signing.key`` (private, keep it in the cloud) and ``signing.pub`` (give it to devices)."""
    private = Ed25519PrivateKey.generate()
    priv_path, pub_path = folder / "signing.key", folder / "signing.pub"
    if priv_path.exists():
        raise ConfigError(f"{priv_path} exists", hint="refusing to overwrite a signing key; move it away first")
    atomic_write_bytes(priv_path, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    priv_path.chmod(0o600)
    atomic_write_bytes(pub_path, private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_signer(path: Path) -> Signer:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc}", hint="create one with `eclm-cloud keys`") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key", hint="create one with `eclm-cloud keys`")
    return Signer(key)


def load_verifier(path: Path) -> Verifier:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}", hint="copy signing.pub from the cloud") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key", hint="copy signing.pub from the cloud")
    return Verifier(key)
