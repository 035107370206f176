"""Profiles of devices in an environment, for the environment-line tests."""

from __future__ import annotations

from pathlib import Path

from sync_messages import make_profile

from eclm import wire


def make_profile_in(bank: Path, device: str, environment: str, modules: dict[str, int],
                    line: str = "") -> wire.ProfileMessage:
    """A trainable device's profile: it works in ``environment`` and holds ``modules`` of ``line``'s counting."""
    return make_profile(bank, device, profile_name="", measured=False, modules=modules, environment=environment,
                        line=line)
