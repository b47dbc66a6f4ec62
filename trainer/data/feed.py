"""DomainFeed: one domain's shards on this rank, read by its own thread into a byte-capped buffer.

Reading order (the freshness policy): the *newest* pending shard is opened next (newest by
sidecar publish time, then root, then index position), its samples in order. The backlog is
bounded twice, and what falls outside it is skipped: marked done in the cursor, counted in
``skipped_shards``/``skipped_samples``, never read:
- shards beyond the newest ``backlog_shards`` pending ones (0: no bound);
- *stale* data (0: no bound): from a shard published more than ``max_lag_s`` before the
  reference, the newest shard published on this rank in any domain and root (or, if newer, the
  newest pending shard of this domain). Stale pending shards and the unread rest of a stale shard
  being read are never read; stale documents already buffered are consumed unreturned when taken
  (:meth:`DomainFeed.pop`), counted like the rest. The reference is the newest publish, not the
  clock: a paused stream keeps training what it has, and a rank's newest shard is never stale, so
  a rank always has data to train while its shards last.
So a trainer slower than ingest, or a domain drawn rarely, trains recent data and lets a
bounded backlog go instead of falling ever further behind. To replay a finished stream in
full, set both bounds to 0.

Backpressure: the thread stops reading once the buffer holds ``cap_bytes`` or more (it may
exceed it by one read pass) and resumes when a quarter of it is left. Memory per domain is
bounded whatever the mixing weights. The reader waits on its own condition and consumers
wake it between batches (:meth:`wake`), or at once when they find the buffer empty: each
wake-up of a thread costs the training thread a GIL hand-over, so not one per document.

Cursor: every sample read leaves one buffer entry in reading order (a filtered sample or
the rest of a corrupt or quarantined shard leaves an empty marker), so the consumer's
position is exact: the shards fully consumed, skipped or corrupt (``done``) and the next
sample of the one shard partly consumed (``current``). A checkpoint stores that cursor,
never the buffered samples; :meth:`restore` resumes reading at it.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streaming.base.format.base.reader import Reader

from streams.mds_reader import CorruptShard, ShardEntry, ShardOpener
from trainer.data.packer import Doc

__all__ = ["DomainFeed", "ShardKey"]

log = logging.getLogger(__name__)

ShardKey = tuple[int, str]
"""(stream root index, shard name)"""
DOC_OVERHEAD_BYTES = 256
"""bytes a buffered document costs beside its tokens (object, strings)"""
READ_BATCH = 16
"""samples read per pass outside the lock"""


@dataclass(slots=True)
class _Entry:
    doc: Doc | None  # None: a sample read but not trained (filtered, stale), or a skipped rest's end
    key: ShardKey
    index: int  # sample index in the shard
    last: bool  # the shard's last sample (or its end)
    stale: bool = False  # a document dropped as stale (:meth:`DomainFeed.expire`), counted when popped

    @property
    def nbytes(self) -> int:
        return DOC_OVERHEAD_BYTES + (self.doc.tokens.nbytes if self.doc is not None else 0)


class DomainFeed:
    """Reads one domain's shards assigned to this rank; see the module docstring."""

    def __init__(self, domain: str, *, openers: list[ShardOpener], lock: threading.RLock,
                 cond: threading.Condition, cap_bytes: int, backlog_shards: int, max_lag_s: float,
                 accept: Callable[[int, ShardEntry, dict[str, Any]], Doc | None],
                 newest: Callable[[], float],
                 excluded: Callable[[ShardKey], bool], on_corrupt: Callable[[int, str, str], None],
                 on_error: Callable[[BaseException], None]):
        self.domain = domain
        self._openers = openers
        self._cond = cond  # on ``lock``: "data arrived", for consumers
        self._room = threading.Condition(lock)  # same lock; wakes only this feed's reader
        self.cap_bytes, self.backlog_shards, self.max_lag_s = cap_bytes, backlog_shards, max_lag_s
        self._accept, self._excluded = accept, excluded
        self._rank_newest = newest  # newest publish time among this rank's shards (lock held to call)
        self._on_corrupt, self._on_error = on_corrupt, on_error
        self.entries: dict[ShardKey, ShardEntry] = {}
        self._pending: list[tuple[tuple[float, int, int], ShardKey]] = []  # sorted, oldest first
        # consumer cursor
        self.done: set[ShardKey] = set()
        self.current: tuple[ShardKey, int] | None = None
        self.skipped_shards = self.skipped_samples = 0
        self._skipped_in: set[ShardKey] = set()  # shards counted in skipped_shards (each once)
        # buffer (guarded by cond)
        self.buf: deque[_Entry] = deque()
        self.bytes = 0
        self.docs = 0  # trainable documents buffered
        self.tokens = 0
        # reader state (the thread's; guarded by cond)
        self._reading: tuple[ShardKey, int] | None = None
        self._unread_corrupt: set[ShardKey] = set()  # corrupt at its first sample: a replacement is read
        self._generation = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def unfinished_shards(self) -> set[str]:
        """Names of shards published here and not fully trained: being read, buffered, or pending
        (lock held by the caller)."""
        names = {key[1] for _, key in self._pending} | {e.doc.shard for e in self.buf if e.doc is not None}
        for cursor in (self.current, self._reading):
            if cursor is not None:
                names.add(cursor[0][1])
        return names

    def set_cap(self, cap_bytes: int) -> None:
        """A new read-ahead cap (lock held by the caller); wakes the reader if it may read now."""
        grew = cap_bytes > self.cap_bytes
        self.cap_bytes = cap_bytes
        if grew and self.bytes <= cap_bytes // 4:
            self._room.notify()

    # -- catalog (cond held by the caller) ---------------------------------------------------
    def add(self, root: int, entry: ShardEntry) -> None:
        """A newly published shard of this domain assigned to this rank (wakes the reader)."""
        key = (root, entry.name)
        self.entries[key] = entry
        if entry.replaces and self._take_over(root, entry):
            return
        if key not in self.done and (self.current is None or self.current[0] != key):
            bisect.insort(self._pending, (self._order(key), key))
            self._room.notify()

    def _take_over(self, root: int, entry: ShardEntry) -> bool:
        """A takedown rewrote a shard (``entry.ancestors``: one or more takedowns in a row) into
        ``entry`` (streams/mds_rewrite.py): the cursor carries over, so no kept sample is trained
        twice or lost and no removed one is read again. True if handled here; False: read
        ``entry`` like any new shard."""
        ancestors = [(root, a) for a in entry.ancestors]
        if any(a in self.done and a not in self._unread_corrupt for a in ancestors):  # trained/skipped
            self.done.add((root, entry.name))
            return True
        in_use = {k for k in (self.current, self._reading) if k is not None for k in [k[0]]}
        in_use |= {item.key for item in self.buf}
        if in_use.intersection(ancestors):
            # Re-read from the consumer's position, mapped into the replacement (the buffer is
            # dropped; what it held is read again, the removed samples excepted).
            self.restore(self.state_dict())
            return True
        for a in ancestors:  # unread: their files are gone, the replacement is read instead
            self.entries.pop(a, None)
        self._pending = [(o, k) for o, k in self._pending if k not in ancestors]
        return False

    def _follow_replacements(self) -> None:
        """Map a restored cursor onto shards a takedown replaced since it was taken: done stays
        done, the shard being consumed continues at the same sample of its replacement."""
        for key, entry in list(self.entries.items()):
            ancestors = [(key[0], a) for a in entry.ancestors]
            if not ancestors:
                continue
            if any(a in self.done and a not in self._unread_corrupt for a in ancestors):
                self.done.add(key)
                continue
            for a in ancestors:  # never read again ("done" holds only finished shards)
                self.entries.pop(a, None)
            if self.current is not None and self.current[0] in ancestors:
                at = entry.map_cursor(self.current[0][1], self.current[1])
                self.current = (key, at) if at < entry.samples else None
                if at >= entry.samples:
                    self.done.add(key)

    def _order(self, key: ShardKey) -> tuple[float, int, int]:
        e = self.entries[key]
        return (e.published_at, key[0], e.ordinal)

    # -- thread --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name=f"feed-{self.domain}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._room:
            self._stop = True
            self._room.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        try:
            self._fill()
        except BaseException as e:  # surfaced to the training loop by StreamBuffers.check()
            log.exception("stream feed of domain %s failed", self.domain)
            self._on_error(e)

    def _next_shard(self) -> tuple[ShardKey, int] | None:
        """The shard to read next (lock held): the newest pending; those past the backlog skipped."""
        cut = len(self._pending) - self.backlog_shards if self.backlog_shards > 0 else 0
        if self.max_lag_s > 0 and self._pending:
            cut = max(cut, bisect.bisect_left(self._pending, ((self._reference() - self.max_lag_s,),)))
        if cut > 0:
            old, self._pending = self._pending[:cut], self._pending[cut:]
            for _, key in old:
                self.done.add(key)
                self._count_skip(key, self.entries[key].samples)
            log.warning("domain %s: skipped %d shards beyond the backlog (%d shards, %.0fs; "
                        "freshness policy)",
                        self.domain, len(old), self.backlog_shards, self.max_lag_s)
        while self._pending:
            _, key = self._pending.pop()
            if key not in self.done:
                return key, 0
        return None

    def _fill(self) -> None:
        reader, reader_key = None, None
        while True:
            with self._room:
                while not self._stop:
                    if self.bytes >= self.cap_bytes:  # full: refill when a quarter is left
                        while not self._stop and self.bytes > self.cap_bytes // 4:
                            self._room.wait(1.0)
                        if self.bytes >= self.cap_bytes:  # a cap of (nearly) 0: wait for a new one
                            self._room.wait(1.0)
                    elif not self._can_read():
                        self._room.wait(1.0)
                    else:
                        break
                if self._stop:
                    return
                if self._reading is None:
                    self._reading = self._next_shard()
                    if self._reading is None:
                        continue
                key, index = self._reading
                entry, generation = self.entries[key], self._generation
                room = self.cap_bytes - self.bytes
                if index > 0 and self._lagging(entry):  # leave this shard's rest for a newer one
                    self._count_skip(key, entry.samples - index)
                    self._push(_Entry(None, key, entry.samples - 1, True))
                    self._reading = None
                    self._openers[key[0]].release(key[1])
                    reader, reader_key = None, None
                    continue
            if reader_key != key:
                reader, reader_key = None, key
            items: list[_Entry] = []
            while room > 0 and len(items) < READ_BATCH and not (items and items[-1].last):
                reader, item = self._read(key[0], entry, index + len(items), reader)
                items.append(item)
                room -= item.nbytes
                time.sleep(0)  # hand the GIL over if the training thread waits (else up to 5 ms)
            with self._room:
                if generation != self._generation:  # restored meanwhile: these reads are void
                    reader, reader_key = None, None
                    continue
                for item in items:
                    self._push(item)
                self._reading = None if items[-1].last else (key, index + len(items))
                self._cond.notify_all()
                if items[-1].last:
                    self._openers[key[0]].release(key[1])
                    reader, reader_key = None, None

    def _reference(self) -> float:
        """Publish time that staleness is measured from (lock held): this rank's newest shard, or
        this domain's newest pending one if newer (not listed on this rank yet)."""
        return max(self._rank_newest(), self._pending[-1][0][0] if self._pending else 0.0)

    def stale_before(self) -> float:
        """Documents of shards published before this are stale (lock held; 0.0: none are)."""
        return self._reference() - self.max_lag_s if self.max_lag_s > 0 else 0.0

    def _stale(self, key: ShardKey, before: float) -> bool:
        entry = self.entries.get(key)
        return entry is not None and 0 < entry.published_at < before

    def _lagging(self, entry: ShardEntry) -> bool:
        """The shard being read is stale (lock held)."""
        return 0 < entry.published_at < self.stale_before()

    @property
    def settled(self) -> bool:
        """The reader cannot add anything now: its buffer is at the cap, or nothing to read."""
        return self.bytes >= self.cap_bytes or not self._can_read()

    @property
    def expecting(self) -> bool:
        """Documents are buffered or the reader has something to read."""
        return self.docs > 0 or self._can_read()

    def _can_read(self) -> bool:
        if self._reading is None:
            return bool(self._pending)
        return self._reading[0] in self.entries  # a restored cursor waits for its shard's listing

    def _read(self, root: int, entry: ShardEntry, index: int,
              reader: Reader | None) -> tuple[Reader | None, _Entry]:
        """Read sample ``index`` outside the lock (opening the shard if ``reader`` is None): the
        reader and the buffer entry (an end-of-shard marker if the shard is quarantined or
        corrupt)."""
        key, n = (root, entry.name), entry.samples
        if self._excluded(key) or n == 0:
            return None, _Entry(None, key, max(index, n - 1), True)
        opener = self._openers[root]
        try:
            if reader is None:
                reader = opener.open(entry.name, entry.info)
            sample = opener.read(reader, index)
        except CorruptShard as e:
            if index == 0:  # nothing of it read (e.g. a takedown deleted it before this poll)
                self._unread_corrupt.add(key)
            log.warning("skipping corrupt shard %s: %s", entry.name, e)
            self._on_corrupt(root, entry.name, str(e))
            return None, _Entry(None, key, n - 1, True)
        sample["_shard"], sample["_index"] = entry.name, index
        return reader, _Entry(self._accept(root, entry, sample), key, index, index == n - 1)

    # -- buffer (cond held by the caller) ------------------------------------------------------
    def _push(self, item: _Entry) -> None:
        if item.doc is not None and self._stale(item.key, self.stale_before()):  # went stale while read
            item.doc, item.stale = None, True
        self.buf.append(item)
        self.bytes += item.nbytes
        if item.doc is not None:
            self.docs += 1
            self.tokens += len(item.doc.tokens)

    def pop(self) -> Doc | None:
        """The next trainable document, advancing the cursor past it: markers and stale documents
        before it are consumed (stale ones counted as skipped)."""
        before = self.stale_before()
        while self.buf:
            item = self.buf.popleft()
            self.bytes -= item.nbytes
            if item.last:
                self.done.add(item.key)
                self.current = None
            else:
                self.current = (item.key, item.index + 1)
            if item.doc is not None:
                self.docs -= 1
                self.tokens -= len(item.doc.tokens)
                if not self._stale(item.key, before):
                    return item.doc
                self._count_skip(item.key, 1)
            elif item.stale:
                self._count_skip(item.key, 1)
        return None

    def _count_skip(self, key: ShardKey, samples: int) -> None:
        """Count ``samples`` of shard ``key`` as skipped; the shard counts once, wholly skipped or not."""
        self.skipped_samples += samples
        if key not in self._skipped_in:
            self._skipped_in.add(key)
            self.skipped_shards += 1

    def skip_stale(self, key: ShardKey) -> bool:
        """Count a document of shard ``key`` held elsewhere (a split document's rest) as skipped if
        it is stale (lock held); True if so."""
        if not self._stale(key, self.stale_before()):
            return False
        self._count_skip(key, 1)
        return True

    def expire(self) -> int:
        """Turn buffered stale documents into markers now (lock held), so that the buffer's counts
        hold only trainable data; they are counted as skipped when popped. Returns how many."""
        before, expired = self.stale_before(), 0
        if before <= 0:
            return 0
        for item in self.buf:
            if item.doc is not None and self._stale(item.key, before):
                self.bytes -= item.doc.tokens.nbytes
                self.docs -= 1
                self.tokens -= len(item.doc.tokens)
                item.doc, item.stale = None, True
                expired += 1
        return expired

    def wake(self, *, if_low: bool = True) -> None:
        """Let the reader refill (lock held by the caller): if a quarter or less of the cap is left,
        or at once with ``if_low=False``. Consumers call it between batches, not per document."""
        if not if_low or self.bytes <= self.cap_bytes // 4:
            self._room.notify()

    def purge(self, bad: Callable[[Doc], bool]) -> int:
        """Turn buffered documents matching ``bad`` into markers (the cursor still passes them)."""
        dropped = 0
        for item in self.buf:
            if item.doc is not None and bad(item.doc):
                self.bytes -= item.doc.tokens.nbytes
                self.docs -= 1
                self.tokens -= len(item.doc.tokens)
                item.doc = None
                dropped += 1
        return dropped

    # -- cursor (cond held by the caller; the thread stopped or about to re-read) --------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "done": sorted(self.done),
            "current": None if self.current is None else [*self.current[0], self.current[1]],
            "skipped_shards": self.skipped_shards,
            "skipped_samples": self.skipped_samples,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume at a cursor: drop the buffer, re-read from the consumer's position."""
        self._generation += 1
        self.done = {(int(r), str(n)) for r, n in state["done"]}
        cur = state["current"]
        self.current = None if cur is None else ((int(cur[0]), str(cur[1])), int(cur[2]))
        self.skipped_shards = int(state["skipped_shards"])
        self.skipped_samples = int(state["skipped_samples"])
        self._skipped_in = set()
        self.buf.clear()
        self.bytes = self.docs = self.tokens = 0
        self._follow_replacements()
        self._reading = self.current
        current = None if self.current is None else self.current[0]
        self._pending = sorted((self._order(k), k) for k in self.entries
                               if k not in self.done and k != current)
        self._room.notify()
