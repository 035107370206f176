"""The cloud side: modular model, cloud training, sub-model derivation and bundle export."""
