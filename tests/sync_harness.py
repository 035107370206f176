"""Sync tests drive real processes through the project's own helpers."""

from bench.procs import Edge, Proc, daemon, ledger_rows, ledger_versions, wait_connected, wait_until

__all__ = ["Edge", "Proc", "daemon", "ledger_rows", "ledger_versions", "wait_connected", "wait_until"]
