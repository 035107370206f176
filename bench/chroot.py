"""An arm64 Debian userland under qemu-user: build or reuse its rootfs, run commands in it, always unmount.

The rootfs is made once with ``debootstrap --arch=arm64`` into a cache folder outside the repository
and reused; every run mounts /proc and /dev (and any bind the caller asks for) and unmounts
them again however it ends, including mounts a killed earlier run left behind. The chroot shares
the host's network, so a server started inside answers on the host's 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eclm.errors import EclmError

Say = Callable[[str], None]
SUITE, ARCH, MIRROR = "bookworm", "arm64", "http://deb.debian.org/debian"
INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates")
HOST_PACKAGES = "apt-get install -y qemu-user-static debootstrap binfmt-support"
MARKER = "etc/eclm-rootfs.json"  # written last: a rootfs without it is incomplete and rebuilt
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def debootstrap_command(target: Path) -> list[str]:
    return ["debootstrap", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE,
            str(target), MIRROR]


def check_host() -> None:
    """Root, debootstrap and qemu-user-static present, the kernel running aarch64 binaries through qemu."""
    if os.geteuid() != 0:
        raise EclmError("the board test needs root (debootstrap, chroot and mounts)",
                        hint="run it as root: sudo make board-test")
    for tool in ("debootstrap", "qemu-aarch64-static", "chroot", "mount", "umount"):
        if _which(tool) is None:
            raise EclmError(f"{tool} is not installed", hint=HOST_PACKAGES)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)],
             "cannot mount binfmt_misc", "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc")
    entry = binfmt / "qemu-aarch64"
    if not entry.exists() and _which("update-binfmts") is not None:
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "cannot register qemu-aarch64 with binfmt_misc",
             "update-binfmts --enable qemu-aarch64")
    if not entry.exists() or entry.read_text().split("\n", 1)[0].strip() != "enabled":
        raise EclmError("the kernel does not run aarch64 binaries through qemu (no enabled binfmt_misc entry)",
                        hint=f"{HOST_PACKAGES}; then update-binfmts --enable qemu-aarch64")


def check_network(url: str) -> None:
    """A TCP connection to the host of ``url`` (or to the proxy the environment names) within 10 s."""
    parts = urllib.parse.urlsplit(url)
    proxy = os.environ.get(f"{parts.scheme}_proxy") or os.environ.get(f"{parts.scheme.upper()}_PROXY")
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise EclmError(f"no network: cannot reach {host}:{port} ({exc}), needed for {url}",
                        hint="connect this machine to the internet, or set https_proxy / http_proxy") from exc


def ensure_rootfs(cache: Path, say: Say) -> tuple[Path, dict[str, object]]:
    """The cached rootfs and its build record; built with debootstrap (10-20 minutes) when missing."""
    root = cache / f"rootfs-{SUITE}-{ARCH}"
    if (root / MARKER).exists():
        known = json.loads((root / MARKER).read_text())
        say(f"reusing the arm64 rootfs {root} (built {known.get('built')})")
        return root, {**known, "reused": True}
    check_network(MIRROR)
    partial = root.with_name(root.name + ".partial")
    for stale in (root, partial):
        if stale.exists():
            say(f"removing the incomplete rootfs {stale}")
            remove_tree(stale)
    cmd = debootstrap_command(partial)
    say(f"building the arm64 rootfs (10-20 minutes): {shlex.join(cmd)}")
    t0 = time.perf_counter()
    run_logged(cmd, cache / "debootstrap.log", say, "debootstrap")
    info: dict[str, object] = {"command": shlex.join(debootstrap_command(root)), "seconds": time.perf_counter() - t0,
                               "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    (partial / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    partial.rename(root)
    say(f"rootfs ready in {info['seconds']:.0f} s")
    return root, {**info, "reused": False}


def run_logged(cmd: list[str], log: Path, say: Say, what: str, heartbeat: float = 30.0,
               timeout: float = 3600.0) -> None:
    """Run ``cmd`` with its output in ``log``; a progress line every ``heartbeat`` s; EclmError on failure."""
    t0 = last = time.monotonic()
    with open(log, "w") as out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                  errors="replace", start_new_session=True) as proc:
        assert proc.stdout is not None
        recent = ""
        try:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if line.strip():
                    recent = line.strip()
                now = time.monotonic()
                if now - last >= heartbeat:
                    say(f"{what}: {now - t0:.0f} s, {recent[:100]}")
                    last = now
                if now - t0 > timeout:
                    raise EclmError(f"{what} took longer than {timeout:.0f} s", hint=f"see {log}")
        except BaseException:
            kill_group(proc)
            raise
        code = proc.wait()
    if code != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise EclmError(f"{what} failed with exit code {code}: {tail[:300]}", hint=f"full output in {log}")


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group ``proc`` leads (it was started with ``start_new_session``), then reap it:
    a shell's children (pip, a build, dpkg) go too, and nothing keeps running inside the rootfs.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def mounts_below(root: Path) -> list[Path]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    return mount_points_below(Path("/proc/self/mountinfo").read_text(), root)


def mount_points_below(mountinfo: str, root: Path) -> list[Path]:
    base = os.path.realpath(root)
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == base or point.startswith(base.rstrip("/") + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_below(root: Path) -> None:
    """Unmount everything at or below ``root``; lazily where a mount is busy; EclmError if one stays."""
    for point in mounts_below(root):
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
    left = mounts_below(root)
    if left:
        raise EclmError(f"could not unmount {', '.join(map(str, left))}", hint="unmount them by hand (umount -l)")


def remove_tree(path: Path) -> None:
    """Delete a rootfs folder, never through a mount (a bound /dev would take the host's with it)."""
    unmount_below(path)
    shutil.rmtree(path)


@contextmanager
def mounted(root: Path, binds: dict[str, Path], say: Say) -> Iterator[None]:
    """/proc, /dev and ``binds`` (path inside -> host folder) mounted in ``root``.

    Not /sys: with the host's CPU topology there, ONNX Runtime's cpuinfo (aarch64 code reading an x86
    machine's files) crashes the emulated process with a segmentation fault at import.
    """
    stale = mounts_below(root)
    if stale:
        say(f"unmounting {len(stale)} mounts an earlier run left in {root}")
        unmount_below(root)
    try:
        _mount(["-t", "proc", "proc"], root / "proc")
        _mount(["--bind", "/dev"], root / "dev")
        for inside, host in binds.items():
            host.mkdir(parents=True, exist_ok=True)
            _mount(["--bind", str(host)], root / inside.lstrip("/"))
        yield
    finally:
        unmount_below(root)


def prepare_network(root: Path) -> None:
    """The host's resolver and CA bundle (it may hold a proxy's CA) copied into the rootfs."""
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    if Path("/" + CA_BUNDLE).exists():
        (root / CA_BUNDLE).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("/" + CA_BUNDLE, root / CA_BUNDLE)


def inside(root: Path, argv: list[str], cwd: str = "/", env: dict[str, str] | None = None) -> list[str]:
    """The host command that runs ``argv`` in the rootfs in ``cwd`` with a clean environment."""
    base = {"HOME": "/root", "PATH": PATH_INSIDE, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in os.environ.items() if k in PASSED_ENV}, **(env or {})}
    script = f"cd {shlex.quote(cwd)} && exec {shlex.join(argv)}"
    return ["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in base.items()), "/bin/sh", "-c",
            script]


def _mount(args: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    _run(["mount", *args, str(target)], f"cannot mount {target}", "run as root outside a restricted container")


def _run(cmd: list[str], what: str, hint: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise EclmError(f"{what}: {(done.stderr or done.stdout).strip()[:200]}", hint=hint)


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes of space, tab, newline and backslash."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
