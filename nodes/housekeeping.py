"""A node's chores on its own data: the expiry sweep, and flushing its capture
file (what a killed node's capture may lose is the last flush interval)."""

from __future__ import annotations

import logging
from typing import Callable

import trio

from testnet.base import meter
from testnet.base.logs import event

from .capture import CaptureFile
from .storage import Storage, StorageError

log = logging.getLogger("node")

CAPTURE_FLUSH_S = 0.2  # what a killed node's capture may lose


async def sweep_expired(storage: Storage, now_ms: Callable[[], int], interval_s: float) -> None:
    """Remove expired messages (and tombstones that ran out) every ``interval_s``
    (oxen-storage-server: every 10 s)."""
    meter.ROLE.set("expiry")
    while True:
        await trio.sleep(interval_s)
        try:
            removed = storage.delete_expired(now_ms())
        except StorageError as exc:  # a failing disk: expired messages wait for the next sweep
            event(log, "expiry sweep failed", logging.WARNING, error=type(exc).__name__)
            continue
        if removed:
            event(log, "expired", removed=removed)


class CaptureFlusher:
    """Flushes 0.2 s after the first record since the last flush; sleeps while none
    comes (an idle node does not wake for its capture).  :meth:`wake` is the capture
    file's ``on_dirty``."""

    def __init__(self) -> None:
        self._wake = trio.Event()
        self.capture: CaptureFile | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        meter.ROLE.set("capture-flush")
        assert self.capture is not None
        while True:
            if not self.capture.dirty:
                self._wake = trio.Event()
                await self._wake.wait()
            await trio.sleep(CAPTURE_FLUSH_S)
            self.capture.flush()
