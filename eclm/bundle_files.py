"""A bundle's files, read without ever following a symbolic link: walk, open, hash and copy regular files only.

Every path is opened one component at a time relative to the bundle folder's descriptor with
``O_NOFOLLOW``, so a link (or a folder swapped for a link between a check and a read) is refused
instead of followed, and nothing outside the bundle is ever read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath

from eclm.errors import BundleError

CHUNK = 1 << 20
MAX_ENTRIES = 10_000
MAX_DEPTH = 16
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_TAMPERED = "do not serve it; re-export or re-download the bundle"


def safe_relpath(rel: str) -> PurePosixPath:
    """``rel`` as a relative path that stays inside the bundle, or a :class:`BundleError`."""
    p = PurePosixPath(rel) if isinstance(rel, str) else PurePosixPath("/")
    if p.is_absolute() or ".." in p.parts or not p.parts or "\x00" in str(rel) or str(p) != rel:
        raise BundleError(f"manifest lists unsafe path {rel!r}", hint="the bundle was tampered with; re-export")
    return p


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    return "special file"


def walk(root: Path) -> dict[str, str]:
    """Every entry below ``root`` that is not a folder, by POSIX relative path: ``"file"``, ``"symbolic link"``
    or ``"special file"`` (fifo, socket, device). Links are reported, never followed.
    """
    fd = _open_root(root)
    out: dict[str, str] = {}
    try:
        _walk(fd, "", out, 0)
    finally:
        os.close(fd)
    return out


def _open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise BundleError(f"cannot open bundle folder {root}: {exc.strerror}",
                          hint="point at a folder made by eclm-export") from exc


def _walk(dir_fd: int, prefix: str, out: dict[str, str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BundleError(f"bundle folders nest deeper than {MAX_DEPTH} at {prefix!r}", hint=_TAMPERED)
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            try:
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError:  # swapped for a link or removed since it was listed
                out[rel] = "symbolic link"
                continue
            try:
                _walk(sub, rel + "/", out, depth + 1)
            finally:
                os.close(sub)
        else:
            out[rel] = _kind(mode)
        if len(out) > MAX_ENTRIES:
            raise BundleError(f"bundle holds more than {MAX_ENTRIES} entries", hint=_TAMPERED)


def open_regular(root: Path, rel: str) -> int:
    """A read-only descriptor of the regular file ``rel`` inside ``root``; no component may be a link."""
    parts = safe_relpath(rel).parts
    fd = _open_root(root)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _refusal("/".join(parts[: i + 1]), exc, folder=True) from exc
            os.close(fd)
            fd = sub
        try:
            # O_NONBLOCK: opening a fifo must not wait for a writer (it is refused just below).
            leaf = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
        except OSError as exc:
            raise _refusal(rel, exc, folder=False) from exc
    finally:
        os.close(fd)
    mode = os.fstat(leaf).st_mode
    if not stat.S_ISREG(mode):
        os.close(leaf)
        raise BundleError(f"{rel} is a {_kind(mode)}, not a regular file", hint=_TAMPERED)
    return leaf


def _refusal(rel: str, exc: OSError, folder: bool) -> BundleError:
    if exc.errno == errno.ENOENT:
        return BundleError(f"{rel} is missing", hint=_TAMPERED)
    if exc.errno in (errno.ELOOP, errno.EMLINK) or (folder and exc.errno == errno.ENOTDIR):
        return BundleError(f"{rel} is a symbolic link" if exc.errno != errno.ENOTDIR else f"{rel} is not a folder",
                           hint=_TAMPERED)
    return BundleError(f"{rel} is unreadable: {exc.strerror}", hint=_TAMPERED)


def read_regular(root: Path, rel: str, limit: int) -> bytes:
    """The bytes of the regular file ``rel`` (at most ``limit`` of them)."""
    fd = open_regular(root, rel)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{rel} is larger than {limit} bytes", hint=_TAMPERED)
    return data


def sha256_regular(root: Path, rel: str) -> str:
    """Hex sha256 of the regular file ``rel`` inside ``root``."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(root, rel), "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def copy_regular(src_root: Path, rel: str, dst_root: Path, sha256: str) -> None:
    """Copy ``rel`` into the fresh folder ``dst_root``, checking its sha256 on the bytes actually copied."""
    parts = safe_relpath(rel).parts
    target = dst_root.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with os.fdopen(open_regular(src_root, rel), "rb") as src:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(out, "wb") as dst:
            while block := src.read(CHUNK):
                h.update(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
    if h.hexdigest() != sha256:
        target.unlink()
        raise BundleError(f"{rel} does not match its sha256", hint=_TAMPERED)


def write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist, and is never a link) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
