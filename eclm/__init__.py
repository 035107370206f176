"""ECLM's shared contract: errors, bundle manifest, hashing and the safe tensor format (torch-free)."""

__version__ = "0.1.0"
