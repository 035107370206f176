"""Reassembly of chunked payloads with bounded memory: per-sender and total byte caps, a cap on a
message's declared size, expiry of incomplete messages and eviction of the oldest.

A chunk that would break a cap is refused with :class:`ChunkRefused` (a ``DataError``) whose
``reason`` the caller counts; the payloads already held stay consistent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eclm.errors import DataError

if TYPE_CHECKING:
    from eclm.wire import ChunkMessage

MAX_CHUNKS = 100_000


class ChunkRefused(DataError):
    """A chunk the reassembler will not hold; ``reason`` is a short fixed word for metrics."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint or "resend the message in fewer or smaller pieces later")
        self.reason = reason


@dataclass
class _Pending:
    sender: str
    started: float
    total: int
    sha256: str
    pieces: dict[int, bytes] = field(default_factory=dict)
    held: int = 0


class Reassembler:
    """Collects chunks per (sender, message id); returns the whole payload once every piece arrived and matches.

    ``max_total_bytes`` bounds everything held, ``max_sender_bytes`` what one sender may hold,
    ``max_message_bytes`` the size a message may grow to (its declared pieces times the first
    piece's size, and the bytes actually received); ``ttl_s`` expires incomplete messages and
    ``max_pending`` bounds how many are incomplete at once. When a new chunk does not fit, the
    oldest incomplete messages of the same sender are evicted first, then (for the total cap)
    the oldest of anyone, but never one younger than the chunk's own message.
    """

    def __init__(self, max_pending: int = 64, ttl_s: float = 600.0, *, max_total_bytes: int = 64 * 2**20,
                 max_sender_bytes: int | None = None, max_message_bytes: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if max_total_bytes <= 0:
            raise ValueError("max_total_bytes must be positive")
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self.max_total_bytes = max_total_bytes
        self.max_sender_bytes = max_sender_bytes if max_sender_bytes is not None else max(1, max_total_bytes // 4)
        self.max_message_bytes = max_message_bytes if max_message_bytes is not None else self.max_sender_bytes
        self.clock = clock
        self._parts: dict[tuple[str, str], _Pending] = {}
        self.held_bytes = 0
        self.evicted = 0

    def held_by(self, sender: str) -> int:
        return sum(p.held for p in self._parts.values() if p.sender == sender)

    def __len__(self) -> int:
        return len(self._parts)

    def _drop(self, key: tuple[str, str]) -> None:
        p = self._parts.pop(key)
        self.held_bytes -= p.held

    def _expire(self, now: float) -> None:
        for key, p in list(self._parts.items()):
            if now - p.started > self.ttl_s:
                self._drop(key)
                self.evicted += 1

    def _make_room(self, need: int, sender: str, keep: tuple[str, str]) -> None:
        """Evict the oldest other messages until ``need`` more bytes fit both caps, or refuse."""
        caps = (  # (whose messages count and may go, how much they hold, the cap, the refusal)
            (True, lambda: self.held_by(sender), self.max_sender_bytes, "sender_cap",
             f"sender {sender!r} would hold more than {self.max_sender_bytes} bytes of incomplete chunked messages"),
            (False, lambda: self.held_bytes, self.max_total_bytes, "total_cap",
             f"incomplete chunked messages would exceed {self.max_total_bytes} bytes in total"),
        )
        for only_sender, held, cap, reason, detail in caps:
            while held() + need > cap:
                keys = [k for k, p in self._parts.items() if k != keep and (not only_sender or p.sender == sender)]
                if not keys:
                    raise ChunkRefused(reason, detail)
                self._drop(min(keys, key=lambda k: self._parts[k].started))
                self.evicted += 1

    def add(self, c: ChunkMessage, sender: str = "") -> bytes | None:
        """Hold one chunk from ``sender``; the whole payload when it was the last missing piece."""
        now = self.clock()
        self._expire(now)
        if not 0 <= c.index < c.total or c.total > MAX_CHUNKS:
            raise ChunkRefused("out_of_range", f"chunk {c.index}/{c.total} is out of range",
                               hint="resend the message")
        size = len(c.data)
        key = (sender, c.message_id)
        if size * c.total > self.max_message_bytes + size:  # the last piece may be short
            if key in self._parts:
                self._drop(key)  # a message that cannot complete holds nothing
            raise ChunkRefused("message_cap", f"chunked message of {c.total} pieces of {size} bytes exceeds the "
                               f"limit of {self.max_message_bytes} bytes",
                               hint="send smaller messages or raise the reassembly limit")
        pending = self._parts.get(key)
        if pending is None:
            incomplete = [k for k in self._parts if k != key]
            while len(incomplete) >= self.max_pending:
                victim = min(incomplete, key=lambda k: self._parts[k].started)
                self._drop(victim)
                incomplete.remove(victim)
                self.evicted += 1
            pending = self._parts[key] = _Pending(sender, now, c.total, c.sha256)
        if (pending.total, pending.sha256) != (c.total, c.sha256):
            raise ChunkRefused("disagree", "chunks of one message disagree", hint="resend the message")
        old = pending.pieces.get(c.index)
        grow = size - (len(old) if old is not None else 0)
        if pending.held + grow > self.max_message_bytes:
            self._drop(key)
            raise ChunkRefused("message_cap", f"chunked message grows past {self.max_message_bytes} bytes",
                               hint="send smaller messages or raise the reassembly limit")
        if grow > 0:
            try:
                self._make_room(grow, sender, key)
            except ChunkRefused:
                self._drop(key)  # a message that cannot complete holds nothing
                raise
        pending.pieces[c.index] = c.data
        pending.held += grow
        self.held_bytes += grow
        if len(pending.pieces) < c.total:
            return None
        self._drop(key)
        data = b"".join(pending.pieces[i] for i in range(c.total))
        if hashlib.sha256(data).hexdigest() != c.sha256:
            raise ChunkRefused("sha256", "reassembled payload does not match its sha256", hint="resend the message")
        return data
