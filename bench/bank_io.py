"""How long a whole bank takes to write and read on each backend: files vs PostgreSQL bytea (same bytes).

`python -m bench.bank_io [--config resnet18] [--postgres URL] [--out DIR]` creates a fresh database on
the server (and drops it), times writing every part and reading every part back (three reads, best),
and prints the ratio against the directory bank in the same run.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def _time_bank(location: str, source: Any) -> dict[str, float]:
    from module_bank import open_store

    info = source.info()
    tensors = {pid: source.read_part(pid) for pid in info.parts}
    store = open_store(location)
    t = time.perf_counter()
    store.write(info, tensors)
    write_s = time.perf_counter() - t
    reads = []
    for _ in range(3):
        t = time.perf_counter()
        store.read_all()
        reads.append(time.perf_counter() - t)
    return {"write_s": write_s, "read_s": min(reads)}


def measure(config: str, admin_url: str) -> dict[str, Any]:
    import psycopg

    from exporter.cloud import random_bank
    from module_bank import DirectoryBank

    work = Path(tempfile.mkdtemp(prefix="eclm-bankio-"))
    name = f"eclm_bankio_{secrets.token_hex(4)}"
    try:
        random_bank(config, work / "source")
        source = DirectoryBank(work / "source")
        size = sum(p.stat().st_size for p in (work / "source" / "parts").rglob("*.safetensors"))
        files = _time_bank(str(work / "copy"), source)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        try:
            pg = _time_bank(f"{admin_url.rsplit('/', 1)[0]}/{name}", source)
        finally:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": config, "bytes": size,
            "files": files, "postgresql_bytea": pg,
            "write_ratio": pg["write_s"] / files["write_s"], "read_ratio": pg["read_s"] / files["read_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="resnet18", help="bank configuration (default resnet18)")
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="a server where a database may be created (default %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="write bank-io.json here")
    args = ap.parse_args()
    r = measure(args.config, args.postgres)
    print(f"bank {r['config']}: {r['bytes'] / 2**20:.1f} MiB of tensors")
    print("| backend | write all parts s | read all parts s |\n|---|---|---|")
    print(f"| files | {r['files']['write_s']:.3f} | {r['files']['read_s']:.3f} |")
    print(f"| PostgreSQL bytea | {r['postgresql_bytea']['write_s']:.3f} | {r['postgresql_bytea']['read_s']:.3f} |")
    print(f"ratio PostgreSQL / files: write {r['write_ratio']:.2f}x, read {r['read_ratio']:.2f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bank-io.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
