"""What goes back to devices after a round: signed module updates, and the note an ack carries while parts wait."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from eclm import topics, wire
from eclm.signing import Signer

Publication = tuple[str, bytes]


def module_update(device_id: str, held: set[str], versions: dict[str, int], params: dict[str, dict[str, np.ndarray]],
                  bank_id: str, signer: Signer, codec: str, chunk_bytes: int,
                  bodies: dict[tuple[str, ...], tuple[bytes, dict[str, Any]]] | None = None,
                  environment: str = "") -> list[Publication]:
    """The signed update of the parts ``held`` by a device at ``versions`` of ``environment``'s lines ("": the
    shared parts; ``versions`` and ``params`` keyed by part id), chunked for its update topic.

    Float tensors only: integer buffers (BatchNorm's num_batches_tracked) are not in the exported graphs.
    ``bodies`` caches the compressed tensors per set of parts across the devices of one round (each
    message is still signed for its device).
    """
    parts = {pid: sorted(n for n, a in params[pid].items() if a.dtype.kind == "f") for pid in sorted(held)}
    tensors = {n: params[pid][n] for pid, names in parts.items() for n in names}
    key = (environment, *sorted(held))
    body = None if bodies is None else bodies.get(key)
    if bodies is not None and body is None:
        body = bodies[key] = wire.encode_tensors(tensors, codec)
    msg = wire.ModuleUpdateMessage(uuid.uuid4().hex, bank_id, {pid: versions[pid] for pid in held}, parts, tensors,
                                   device_id=device_id, environment=environment)
    data = wire.encode(msg, codec=codec, signer=signer, body_of_tensors=body)
    return [(topics.update(device_id), p) for p in wire.chunk(data, chunk_bytes)]


def support_note(parts: list[str], support: dict[str, int], needed: int) -> str:
    """What the ack of a stored delta says when some of its parts wait for more devices (empty otherwise)."""
    short = {pid: support.get(pid, 0) for pid in parts if support.get(pid, 0) < needed}
    if needed <= 1 or not short:
        return ""
    return "waits for support: " + ", ".join(f"{pid} has {n} of {needed} devices" for pid, n in sorted(short.items()))


__all__: list[Any] = ["module_update", "support_note"]
