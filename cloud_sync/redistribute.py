"""What goes back to devices after a round: signed module updates, and the note an ack carries while parts wait."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from eclm import topics, wire
from eclm.compress import Codec
from eclm.errors import ConfigError, DataError
from eclm.signing import Signer

Publication = tuple[str, bytes]


def update_codec_name(name: str) -> str:
    """The canonical name of a codec for module updates; a ConfigError for one that would mangle whole weights
    (int8, top-k: they suit deltas, which devices send) or that does not parse.
    """
    try:
        codec = Codec.parse(name)
    except DataError as exc:
        raise ConfigError(f"--update-codec: {exc.message}", hint="e.g. fp32+zlib or fp16+zlib") from None
    if codec.precision not in ("fp32", "fp16") or codec.top is not None:
        raise ConfigError(f"--update-codec {name!r}: module updates carry whole weights, which int8 and topF "
                          "would mangle", hint="use fp32+zlib (exact) or fp16+zlib (half the bytes)")
    return codec.name


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
    if body is None:  # encoded (and checked against fp16's range) once per set of parts
        body = wire.encode_tensors(tensors, codec_for(tensors, codec))
        if bodies is not None:
            bodies[key] = body
    msg = wire.ModuleUpdateMessage(uuid.uuid4().hex, bank_id, {pid: versions[pid] for pid in held}, parts, tensors,
                                   device_id=device_id, environment=environment)
    data = wire.encode(msg, signer=signer, body_of_tensors=body)
    return [(topics.update(device_id), p) for p in wire.chunk(data, chunk_bytes)]


def codec_for(tensors: dict[str, np.ndarray], codec: str) -> str:
    """``codec``, or fp32 of the same compressor when a weight lies beyond fp16's range (it would arrive as
    inf, and the device would refuse every update).
    """
    c = Codec.parse(codec)
    if c.precision != "fp16":
        return codec
    limit = float(np.finfo(np.float16).max)
    if all(not a.size or float(np.max(np.abs(a))) <= limit for a in tensors.values()):
        return codec
    return Codec("fp32", c.top, c.compressor).name


def support_note(parts: list[str], support: dict[str, int], needed: int) -> str:
    """What the ack of a stored delta says when some of its parts wait for more devices (empty otherwise)."""
    short = {pid: support.get(pid, 0) for pid in parts if support.get(pid, 0) < needed}
    if needed <= 1 or not short:
        return ""
    return "waits for support: " + ", ".join(f"{pid} has {n} of {needed} devices" for pid, n in sorted(short.items()))


__all__: list[Any] = ["codec_for", "module_update", "support_note", "update_codec_name"]
