"""The board test's own machinery: the README's install command, refusing to start, and mounts that never stay."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _eclm_testutil import ROOT

from bench import chroot
from bench.board_host import board_install_command, fetched_wheels
from eclm.errors import EclmError

IS_ROOT = os.geteuid() == 0


def test_the_board_installs_with_the_readme_command() -> None:
    command = board_install_command((ROOT / "README.md").read_text())
    assert "pip install '.[edge]'" in command and command.startswith("python3 -m venv ")


def test_a_readme_without_the_command_is_an_error_that_says_where_it_belongs() -> None:
    readme = "# x\n## Raspberry Pi\nno console block here\n## Other\n```console\n$ pip install x\n```\n"
    with pytest.raises(EclmError, match="Raspberry Pi"):
        board_install_command(readme)


def test_mountinfo_is_read_deepest_first_with_escapes() -> None:
    info = "\n".join([
        "22 1 0:21 / / rw - ext4 /dev/vda rw",
        "30 22 0:5 / /c/my\\040root/dev rw - devtmpfs udev rw",
        "31 22 0:22 / /c/my\\040root/proc rw - proc proc rw",
        "32 31 0:23 / /c/my\\040root/proc/sys/fs/binfmt_misc rw - binfmt_misc b rw",
        "33 22 0:24 / /c/my\\040rootfs rw - tmpfs t rw",
    ])
    found = chroot.mount_points_below(info, Path("/c/my root"))
    assert found[0] == Path("/c/my root/proc/sys/fs/binfmt_misc")
    assert set(found) == {Path("/c/my root/dev"), Path("/c/my root/proc"), Path("/c/my root/proc/sys/fs/binfmt_misc")}


def test_unreachable_network_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in chroot.PASSED_ENV:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(EclmError, match="no network: cannot reach 127.0.0.1:1"):
        chroot.check_network("http://127.0.0.1:1/")


def test_without_root_the_board_test_refuses_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.board", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    if IS_ROOT:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        tmp_path.chmod(0o777)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "board-test: error: the board test needs root (debootstrap, chroot and mounts) "
        "(run it as root: sudo make board-test)"]
    assert not (tmp_path / "cache").exists()


def _force_unmount(root: Path, *inside: str) -> None:
    """Whatever the code under test did, nothing stays mounted in a folder pytest will delete."""
    for name in inside:
        subprocess.run(["umount", "-l", str(root / name)], capture_output=True)


@pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")
def test_mounts_go_away_when_the_run_fails_inside(tmp_path: Path) -> None:
    root, host = tmp_path / "root", tmp_path / "pip-cache"
    (root / "proc").mkdir(parents=True)
    try:
        with pytest.raises(RuntimeError, match="a check failed"), chroot.mounted(root, {"/var/cache/x": host}, print):
            assert {p.relative_to(root) for p in chroot.mounts_below(root)} == {
                Path("proc"), Path("dev"), Path("var/cache/x")}
            assert (root / "proc" / "self").exists() and (root / "dev" / "null").exists()
            raise RuntimeError("a check failed")
        assert chroot.mounts_below(root) == []
        assert not (root / "dev" / "null").exists()
    finally:
        _force_unmount(root, "var/cache/x", "dev", "proc")


@pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")
def test_mounts_a_killed_run_left_are_removed_before_the_folder(tmp_path: Path) -> None:
    root, host = tmp_path / "root", tmp_path / "host"
    (root / "var/cache/pip").mkdir(parents=True)
    host.mkdir()
    (host / "kept").write_text("a file of the host")
    subprocess.run(["mount", "--bind", str(host), str(root / "var/cache/pip")], check=True)
    try:
        chroot.remove_tree(root)
    finally:
        _force_unmount(root, "var/cache/pip")
    assert not root.exists() and (host / "kept").read_text() == "a file of the host"


def test_the_wheels_an_install_downloaded_are_read_from_its_log() -> None:
    log = ("Processing /opt/eclm/src\nCollecting numpy>=1.24\n"
           "  Downloading numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl (16.0 MB)\n"
           "  Using cached typer-0.29.2-py3-none-any.whl (121 kB)\n"
           "  Downloading https://files.example/p/onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl (23 MB)\n")
    assert fetched_wheels(log) == ["numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
                                   "onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_aarch64.whl"]


def test_a_step_that_overruns_takes_its_whole_process_group_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; while true; do echo tick; sleep 0.2; done"
    with pytest.raises(EclmError, match="took longer than 1 s"):
        chroot.run_logged(["sh", "-c", script], tmp_path / "log", print, "a step", timeout=1)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # a killed orphan is reaped by init shortly after
    assert not Path(f"/proc/{child}").exists(), "the shell's background child outlived the step"
