"""The ShardPublished outbox: every shard published in a stream root reaches Kafka, at least once.

A shard is published by the index write; its ``ShardPublished`` event is sent afterwards, so a
process that dies in between (or a send the broker refuses) would lose the event. The stream
root already records every published shard with its writer, so the outbox needs no second
commit: it only records which events Kafka *acknowledged*, one shard name per line appended to
``<root>/_outbox/<writer_id>.acked`` after the acknowledgement. Pending = published by the
writer, not acknowledged. :meth:`Outbox.drain` re-sends the pending events (ingest does it at
start, for its own writer id and every writer id no live process holds, and after any
micro-batch whose sends failed) until they are acknowledged, so delivery is at-least-once: a
consumer of ``shards`` must tolerate a repeat (the re-sent event is the original: same name,
ranges and ``published_at``). The only consumer today, the sentinel's rollback policy, keeps the
earliest ``published_at`` per domain, which a repeat does not change.

A writer's log is created at its first use holding the writer's shards published until then
(published before the outbox existed: their events were sent the old way).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable

from apache_beam.metrics import Metrics

from streams.events import ShardPublished
from streams.manifest import published_entries, ranges_from_json

__all__ = ["Outbox", "drain_all"]

log = logging.getLogger(__name__)
DIRNAME = "_outbox"


class Outbox:
    """The acknowledgement log of ``writer_id``'s ShardPublished events in ``root``.

    Args:
        root: local stream root.
        writer_id: the writer whose events this outbox tracks.
        send: delivers one event and returns once Kafka acknowledged it (raises otherwise).
    """

    def __init__(self, root: str, writer_id: str, send: Callable[[ShardPublished], object]):
        self.root, self.writer_id, self.send = root, writer_id, send
        self.path = os.path.join(root, DIRNAME, f"{writer_id}.acked")
        if not os.path.exists(self.path):
            self._create()

    def publish(self, event: ShardPublished) -> bool:
        """Send ``event`` and record its acknowledgement; a failure leaves it pending (logged and
        counted as ``sink/events_unacked``: the ingest loop drains it), never raises."""
        try:
            self.send(event)
        except Exception as e:  # noqa: BLE001 - the shard is published; its event waits in the outbox
            Metrics.counter("sink", "events_unacked").inc()
            log.warning("ShardPublished %s not acknowledged (%s: %s); left in the outbox", event.shard,
                        type(e).__name__, e)
            return False
        self._append([event.shard])
        return True

    def pending(self) -> list[ShardPublished]:
        """Events of this writer's published shards that Kafka has not acknowledged, oldest first."""
        acked = self._acked()
        return sorted((e for e in self._published().values() if e.shard not in acked), key=lambda e: e.published_at)

    def drain(self) -> int:
        """Re-send every pending event; the number acknowledged now (the rest stay pending)."""
        return sum(self.publish(event) for event in self.pending())

    # --- internals -----------------------------------------------------------------------
    def _published(self) -> dict[str, ShardPublished]:
        out = {}
        for name, entry in published_entries(self.root).items():
            if entry.get("writer_id") != self.writer_id or not entry.get("samples"):
                continue  # another writer's, or a settled-only window (no shard, no event)
            out[name] = ShardPublished(
                stream_root=self.root, shard=name, domain=entry["domain"], samples=entry["samples"],
                bytes=entry["bytes"], vocab_version=entry["manifest"]["vocab_version"], writer_id=self.writer_id,
                settled=ranges_from_json(entry["settled"]), published_at=entry["published_at"])
        return out

    def _acked(self) -> set[str]:
        with open(self.path) as f:
            return {line.strip() for line in f if line.strip()}

    def _append(self, names: list[str]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, "".join(f"{n}\n" for n in names).encode())
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def _create(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write("".join(f"{n}\n" for n in sorted(self._published())))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # never replaces a log another process created meanwhile
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def drain_all(root: str, send: Callable[[ShardPublished], object], *, own: str) -> int:
    """Drain the outbox of writer ``own`` and of every other writer id that no live process
    holds (a crashed worker whose id never returns); the number of events re-sent."""
    from beam_jobs.workers import WriterLock

    total = Outbox(root, own, send).drain()
    for path in sorted(glob.glob(os.path.join(root, DIRNAME, "*.acked"))):
        writer_id = os.path.basename(path).removesuffix(".acked")
        if writer_id == own:
            continue
        lock = WriterLock(root, writer_id)
        if lock.try_acquire():
            try:
                total += Outbox(root, writer_id, send).drain()
            finally:
                lock.release()
    return total
