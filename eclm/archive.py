"""Bundles as archives for the wire: a gzip'd tar written and extracted safely."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from eclm.bundle_files import CHUNK, safe_relpath, walk
from eclm.errors import BundleError

MAX_ARCHIVE_MEMBERS = 1000
MAX_UNPACKED_BYTES = 1 << 30  # what a bundle archive may unpack to in total (the largest bundles are ~100 MB)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)


def tar_bundle(folder: Path) -> bytes:
    """A gzip'd tar of a bundle folder: regular files only, relative names, sorted."""
    entries = walk(folder)
    odd = [f"{rel} is a {kind}" for rel, kind in entries.items() if kind != "file"]
    if odd:
        raise BundleError(f"cannot archive bundle {folder}: " + "; ".join(odd),
                          hint="a bundle holds regular files only")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel in sorted(entries):
            tar.add(folder / rel, arcname=rel, recursive=False)
    return buf.getvalue()


def untar_bundle(archive: bytes, target: Path, max_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Extract a bundle archive into the new folder ``target``.

    Only regular files with relative names inside ``target`` are accepted: links, devices, folders,
    absolute or ``..`` names, a name given twice, more than :data:`MAX_ARCHIVE_MEMBERS` entries or
    more than ``max_bytes`` in total refuse the whole archive before anything is written.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = _checked_members(tar, max_bytes)
            target.mkdir(parents=True, exist_ok=False)
            for member in members:
                src = tar.extractfile(member)
                if src is None:
                    raise BundleError(f"bundle archive entry {member.name!r} has no data", hint="refused")
                path = target.joinpath(*safe_relpath(member.name).parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    written = 0
                    while block := src.read(min(CHUNK, member.size - written + 1)):
                        written += len(block)
                        if written > member.size:
                            break
                        out.write(block)
                if written != member.size:
                    raise BundleError(f"bundle archive entry {member.name!r} has the wrong size", hint="refused")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise BundleError(f"bundle archive is unreadable: {exc}", hint="it is refused; the cloud will resend") from exc


def _checked_members(tar: tarfile.TarFile, max_bytes: int) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    names: set[str] = set()
    total = 0
    for member in tar:  # headers only: the data is read after every entry passed
        if len(members) >= MAX_ARCHIVE_MEMBERS:
            raise BundleError("bundle archive has too many entries", hint="refused")
        try:
            safe_relpath(member.name)
        except BundleError:
            raise BundleError(f"bundle archive holds an unsafe entry {member.name!r}", hint="refused") from None
        if member.type not in _REGULAR:
            raise BundleError(f"bundle archive holds an unsafe entry {member.name!r} (not a regular file)",
                              hint="refused")
        if member.name in names:
            raise BundleError(f"bundle archive holds {member.name!r} twice", hint="refused")
        total += member.size
        if total > max_bytes:
            raise BundleError(f"bundle archive unpacks to more than {max_bytes} bytes", hint="refused")
        names.add(member.name)
        members.append(member)
    return members
