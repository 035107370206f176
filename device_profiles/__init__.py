"""The registry of device profiles: one declarative TOML file per board, every figure with its source."""

from device_profiles.registry import (
    PROFILE_KEYS,
    DeviceProfile,
    available_profiles,
    load_profile,
    profile_dirs,
)

__all__ = ["PROFILE_KEYS", "DeviceProfile", "available_profiles", "load_profile", "profile_dirs"]
