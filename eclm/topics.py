"""Every MQTT topic of ECLM, in one place."""

from __future__ import annotations

PREFIX = "eclm/v1"


MAX_DEVICE_ID = 128


def is_device_id(device_id: object) -> bool:
    """The device-id grammar: 1..128 characters, none of MQTT's separators and wildcards."""
    return (isinstance(device_id, str) and 0 < len(device_id) <= MAX_DEVICE_ID
            and not any(c in device_id for c in "/+#\x00"))


def _check(device_id: str) -> str:
    if not is_device_id(device_id):
        from eclm.errors import ConfigError

        raise ConfigError(f"device id {device_id!r} is not usable in a topic",
                          hint="use letters, digits, '-', '_' or '.', at most 128 characters")
    return device_id


def delta(device_id: str) -> str:
    """Device -> cloud: module deltas (QoS 1)."""
    return f"{PREFIX}/devices/{_check(device_id)}/delta"


def profile(device_id: str) -> str:
    """Device -> cloud: importance profile and resources (QoS 1)."""
    return f"{PREFIX}/devices/{_check(device_id)}/profile"


def status(device_id: str) -> str:
    """Device -> cloud: online/offline (retained; the offline message is the last will)."""
    return f"{PREFIX}/devices/{_check(device_id)}/status"


def ack(device_id: str) -> str:
    """Cloud -> device: a delta was stored (or rejected, with the reason); the device may drop it."""
    return f"{PREFIX}/devices/{_check(device_id)}/ack"


def update(device_id: str) -> str:
    """Cloud -> device: signed module or bundle updates (QoS 1)."""
    return f"{PREFIX}/devices/{_check(device_id)}/update"


def request(device_id: str) -> str:
    """Cloud -> device: requests (e.g. "send your importance profile")."""
    return f"{PREFIX}/devices/{_check(device_id)}/request"


# The kinds of device topic, by direction (the broker's ACL is built from these).
DEVICE_KINDS = ("delta", "profile", "status")  # device -> cloud
CLOUD_KINDS = ("ack", "update", "request")  # cloud -> device


def device_filter(kind: str, who: str = "+") -> str:
    """A topic filter over the ``kind`` topics of devices: ``who`` is ``+`` (every device) or a broker's
    placeholder for the connected client's name (mosquitto's ``%u``, EMQX's ``${username}``).
    """
    if kind not in DEVICE_KINDS + CLOUD_KINDS:
        raise ValueError(f"unknown device topic kind {kind!r}")
    return f"{PREFIX}/devices/{who}/{kind}"


# Subscriptions of the cloud daemon (shared subscriptions can split these among several mergers).
CLOUD_SUBSCRIPTIONS = tuple(device_filter(k) for k in DEVICE_KINDS)


def device_of(topic: str) -> str:
    """The device id inside a device topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices":
        from eclm.errors import DataError

        raise DataError(f"not an ECLM device topic: {topic!r}", hint=f"topics look like {PREFIX}/devices/ID/KIND")
    return parts[3]


def kind_of(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]
