"""The board's runtime: torch-free bundle verification, inference and on-device training."""
