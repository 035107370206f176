"""Bundles as archives for the wire: a gzip'd tar written and extracted safely."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from eclm.errors import BundleError

MAX_ARCHIVE_MEMBERS = 1000


def tar_bundle(folder: Path) -> bytes:
    """A gzip'd tar of a bundle folder: regular files only, relative names, sorted."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
    return buf.getvalue()


def untar_bundle(archive: bytes, target: Path) -> None:
    """Extract a bundle archive into ``target``; links, devices, absolute or escaping names are refused."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = tar.getmembers()
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise BundleError("bundle archive has too many entries", hint="refused")
            for member in members:
                name = Path(member.name)
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise BundleError(f"bundle archive holds an unsafe entry {member.name!r}", hint="refused")
            target.mkdir(parents=True, exist_ok=True)
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"bundle archive is unreadable: {exc}", hint="it is refused; the cloud will resend") from exc
