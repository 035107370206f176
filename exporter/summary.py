"""Human-readable summaries of a bank and a bundle, for the CLI."""

from __future__ import annotations

from eclm.manifest import BundleManifest
from module_bank import BankInfo


def _mib(v: float) -> str:
    return f"{v / 2**20:.1f} MiB"


def bank_summary(info: BankInfo, path: str) -> str:
    """What `eclm-cloud train` made."""
    m = info.metrics
    n_modules = sum(1 for p in info.parts.values() if p.kind == "module")
    lines = [
        f"module bank {info.bank_id} written to {path}",
        f"  config {info.config['name']}: {len(info.config['layers'])} module layers, {n_modules} modules, "
        f"data {info.dataset} (seed {info.seed})",
    ]
    if "test_accuracy" in m:
        lines += [
            f"  test accuracy {m['test_accuracy']:.4f} on {m['test_samples']} held-out samples "
            f"(after stage 1: {m['stage1_test_accuracy']:.4f})",
            f"  sub-tasks {info.subtasks}; modules carrying 90% of a sub-task's routing: "
            f"{m['modules_per_subtask_before']:.2f} -> {m['modules_per_subtask_after']:.2f}",
        ]
    return "\n".join(lines)


def bundle_summary(man: BundleManifest, path: str) -> str:
    """What `eclm-export` made, with every cost against its budget."""
    est = man.costs["estimated"]
    lines = [
        f"bundle for {man.profile['name']} written to {path}",
        f"  modules per layer: {man.selection} (derived from {man.derived_for.get('source')}"
        + (f" {man.derived_for['classes']}" if "classes" in man.derived_for else "")
        + ")",
        f"  parameters {est['params']:,}, FLOPs {est['flops'] / 1e6:.1f} M at batch 1",
    ]
    for name, row in man.costs.get("within_budget", {}).items():
        value, budget = row["value"], row["budget"]
        shown = (f"{_mib(value)} / {_mib(budget)}" if "bytes" in name else f"{value:,.3g} / {budget:,.3g}")
        lines.append(f"  {'ok  ' if row['ok'] else 'OVER'} {name}: {shown}")
    t = man.training
    if t["available"]:
        lines.append(f"  on-device training: {len(t['trainable_parts'])} trainable parts {t['trainable_parts']}")
    else:
        lines.append(f"  inference only: {t['reason']}")
    diffs = man.validation.get("model.onnx", {})
    if diffs:
        lines.append(f"  ONNX Runtime vs PyTorch max abs difference: {max(diffs.values()):.2e}")
    lines.append(f"  files: {', '.join(sorted(man.files))}")
    return "\n".join(lines)
