"""The server's contexts: one per ``--parallel`` slot, handed to requests, with a bounded queue.

A request goes to the free context whose conversation shares the most leading messages with it
(so a follow-up lands where its prefix, images included, is still in the KV cache); among equals,
the one used longest ago (so the conversations most likely to continue keep their cells). When
every context is busy a request waits in a FIFO queue of at most ``max_queue``; beyond that it is
refused (503 with ``Retry-After``). Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """Every context is busy and the queue is full."""


@dataclass(eq=False)
class Slot:
    """A context and what it holds: the routing keys of the conversation it evaluated last."""

    index: int
    context: Any
    keys: list[str] = field(default_factory=list)
    last_used: float = 0.0


def _shared(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ContextPool:
    """Contexts handed out one request at a time, with prefix-aware choice and a bounded queue."""

    def __init__(self, contexts: Sequence[Any], max_queue: int) -> None:
        self.slots = [Slot(i, c) for i, c in enumerate(contexts)]
        self._free: list[Slot] = list(self.slots)
        self._waiters: deque[tuple[asyncio.Future[Slot], list[str]]] = deque()
        self.max_queue = max_queue

    @property
    def queued(self) -> int:
        """Requests waiting for a context."""
        return sum(1 for fut, _ in self._waiters if not fut.done())

    @property
    def busy(self) -> int:
        """Contexts serving a request now."""
        return len(self.slots) - len(self._free)

    def _best(self, keys: Sequence[str]) -> Slot:
        slot = max(self._free, key=lambda s: (_shared(s.keys, keys), -s.last_used))
        self._free.remove(slot)
        return slot

    async def acquire(self, keys: list[str]) -> Slot:
        """A free context for a request with these message keys (waits in the queue when none is free).

        Raises:
            QueueFullError: no context is free and ``max_queue`` requests already wait.
        """
        if self._free and not self._waiters:
            return self._best(keys)
        if self.queued >= self.max_queue:
            raise QueueFullError
        fut: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, keys))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a slot just as the waiter left
                self.release(fut.result(), None)
            raise

    def release(self, slot: Slot, keys: list[str] | None) -> None:
        """Give a context back; ``keys`` is what it now holds (None: unchanged)."""
        if keys is not None:
            slot.keys = keys
        slot.last_used = time.monotonic()
        self._free.append(slot)
        while self._waiters and self._free:
            fut, wanted = self._waiters.popleft()
            if fut.done():  # the waiter left
                continue
            fut.set_result(self._best(wanted))
