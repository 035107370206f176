"""`make pyver-test PY=python3.13`: the board's install and checks natively, on another Python version.

Run as ``python -m bench.pyver --python python3.13 [--cache DIR] [--out DIR]``. It unpacks the committed
tree, makes a fresh venv with the given interpreter, runs the README's board install command there
(``pip install '.[edge]'``: torch-free, plain onnxruntime), checks that no torch and no training build of
ONNX Runtime came with it, then serves the digits pi4 bundle the board test uses (made on the host by
this venv's ``eclm-cloud train`` and ``eclm-export``) and drives it over HTTP with the board test's
checks: predict, bad input, samples, a training run, the new generation served, the delta in the
outbox, held-out accuracy up. Writes ``pyver-<version>.json`` and ``.md``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.board import PROBE, SERVE_ENV, drive, launch, serve_argv, stop_edge
from bench.board_host import ROOT, board_install_command, committed_tree, device_data, host_bundle, run_main, say
from bench.board_report import Check
from bench.broker import free_port
from bench.common import machine_info, md_table, write_results
from eclm.errors import EclmError

DEFAULT_CACHE = Path(os.environ.get("ECLM_PYVER_CACHE") or Path.home() / ".cache" / "eclm-pyver")


def _run(cmd: list[str], cwd: Path, log: Path, what: str) -> None:
    with open(log, "a") as out:
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise EclmError(f"{what} failed ({done.returncode}): {tail[-300:]}", hint=f"see {log}")


def install(python: str, work: Path, log: Path, timings: dict[str, float]) -> tuple[Path, dict[str, Any], str]:
    """The committed tree in ``work/src`` and the README's board install command run there with ``python``."""
    found = shutil.which(python)
    real = subprocess.run([found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True,
                          timeout=60) if found else None
    if real is None or real.returncode != 0:
        raise EclmError(f"cannot run the interpreter {python!r}", hint="pass --python with the path of an installed "
                        "Python 3.11+ (a pyenv shim needs that version enabled)")
    exe = real.stdout.strip()
    src = work / "src"
    commit = committed_tree(src)
    command = board_install_command((ROOT / "README.md").read_text())
    if not command.startswith("python3 "):
        raise EclmError(f"the README's board install command does not start with python3: {command}",
                        hint="keep it of the form: python3 -m venv .venv && .venv/bin/pip install '.[edge]'")
    command = shlex.quote(exe) + command[len("python3"):]
    say(f"installing commit {commit[:10]} with {exe}: {command}")
    t0 = time.perf_counter()
    _run(["/bin/sh", "-c", command], src, log, "the board install command")
    timings["install_s"] = time.perf_counter() - t0
    venv_bin = src / ".venv" / "bin"
    done = subprocess.run([str(venv_bin / "python"), "-c", PROBE], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise EclmError(f"the installed runtime does not import: {done.stderr.strip()[-300:]}", hint=f"see {log}")
    return venv_bin, dict(json.loads(done.stdout.strip().splitlines()[-1])), commit


def run(python: str, cache: Path, out: Path) -> int:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=cache))
    checks: list[Check] = []
    try:
        bundle, host_commands = host_bundle(cache, work, timings)
        data = device_data()
        venv_bin, info, commit = install(python, work, work / "install.log", timings)
        checks.append(Check(f"runs on Python {info['python']}", True, f"{python}: {info['python']}"))
        checks.append(Check("torch not installed", not info["torch_installed"], "importlib finds no torch"))
        training = [d for d in info["distributions"] if "training" in d]
        checks.append(Check("plain onnxruntime", not training and "onnxruntime" in info["distributions"],
                            f"onnxruntime {info['onnxruntime']}; training packages: {training or 'none'}"))
        port = free_port()
        state = work / "state"
        argv = serve_argv(venv_bin / "eclm-edge", bundle, state, port, "pyver-" + info["python"])
        say(f"serving: {shlex.join(argv)}")
        edge, proc = launch(argv, port, work / "serve.log", f"eclm-edge serve (Python {info['python']})",
                            env={**os.environ, **SERVE_ENV})
        try:
            figures = drive(edge, state, data, checks, f"native, Python {info['python']}")
        finally:
            stop_edge(proc)
    except BaseException:
        say(f"kept for inspection: {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t_start
    version = ".".join(info["python"].split(".")[:2])
    results = {"command": "python -m bench.pyver " + shlex.join(sys.argv[1:]), "python": info["python"],
               "commit": commit, "checks": [vars(c) for c in checks], "figures": figures, "timings": timings,
               "host_commands": host_commands, "probe": info, "machine": machine_info()}
    rows = [[c.name, "yes" if c.ok else "**no**", c.detail] for c in checks]
    md = (f"# The edge runtime on Python {info['python']}\n\nCommand: `{results['command']}` (commit {commit[:10]}, "
          f"{timings['total_s']:.0f} s). The README's board install command in a fresh venv of Python "
          f"{info['python']} on this x86_64 host, then the board test's checks over HTTP.\n\n"
          + md_table(["check", "passed", "seen"], rows))
    write_results(out, f"pyver-{version}", results, md)
    failed = [c.name for c in checks if not c.ok]
    say(f"{len(checks) - len(failed)} of {len(checks)} checks passed on Python {info['python']}"
        + (f"; failed: {', '.join(failed)}" if failed else "") + f"; report in {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pyver", description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default="python3.13", help="interpreter to install the edge runtime with "
                   "(default: python3.13)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"bank, bundle and work folders (default: {DEFAULT_CACHE}) [env ECLM_PYVER_CACHE]")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks",
                   help="where pyver-<version>.json/.md go (default: docs/benchmarks)")
    args = p.parse_args(argv)
    run_main("pyver-test", lambda: run(args.python, args.cache.resolve(), args.out))

if __name__ == "__main__":
    main()
