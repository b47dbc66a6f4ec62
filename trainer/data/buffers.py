"""Per-domain sample buffers over live stream roots: one poll thread per root, one reader per domain.

Each root has a thread that polls its index.json (a stat; the index is re-read only when it
changed), so an idle or slow root never delays another. Data-parallel sharding is by shard:
the k-th shard of a domain in a local root's publish order (the same for every rank) belongs to
rank ``k % dp_world``; on an object-store root, where only each writer's order is the same for
every rank, the k-th shard of a domain published by writer w belongs to rank
``(k + crc32(w)) % dp_world``. A rank reads and decodes only its own shards. Quarantine removes whole
shards, or samples by source, from every rank's view alike and never changes the assignment,
so no sample goes to two ranks or is lost to a reassignment.

Each domain's shards of this rank are read by a :class:`~trainer.data.feed.DomainFeed`
(its own thread, newest shard first, a byte cap with backpressure, a bounded backlog, stale data
skipped against this rank's newest shard: :attr:`StreamBuffers.newest_published`). A
snapshot (:meth:`state_dict`) holds per domain the consumer's cursor (shards done, the next
sample of the shard being consumed), never buffered samples; restoring it re-reads from there.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from streams import storage
from streams.mds_reader import IndexWatcher, ShardEntry, ShardOpener
from streams.source_names import canonical_source
from trainer.data.feed import DOC_OVERHEAD_BYTES, DomainFeed, ShardKey
from trainer.data.packer import Doc

__all__ = ["MIN_CAP_BYTES", "PrefetchError", "StreamBuffers"]

log = logging.getLogger(__name__)

TOKEN_BYTES = 4 * 3 // 2
"""buffer bytes per token: int32 plus a share of the per-document overhead"""
MIN_CAP_BYTES = 4 * DOC_OVERHEAD_BYTES
"""read-ahead of a domain not drawn now (a document or two)"""
IDLE_POLL_FACTOR = 5
"""a root with nothing new is polled ever less often, down to once per this many poll intervals
(each poll wakes a thread, which costs the training thread a GIL hand-over; notify() polls at once)"""


class PrefetchError(RuntimeError):
    """A background reader thread died; raised to the consumer of the buffers."""


class StreamBuffers:
    """Background-filled, byte-capped per-domain buffers over one or more stream roots.

    Each domain buffers at most ``domain_buffer_bytes`` (plus one document), less once
    :meth:`set_read_ahead` gave it a share.
    """

    def __init__(
        self,
        roots: list[str],
        *,
        dp_rank: int,
        dp_world: int,
        domain_buffer_bytes: int = 64 << 20,
        backlog_shards: int = 0,
        max_lag_s: float = 0.0,
        poll_interval_s: float = 0.2,
        vocab_size: int | None = None,
        on_corrupt: Callable[[str, str, str], None] | None = None,
    ):
        if not roots:
            raise ValueError("at least one stream root is required")
        self.roots = list(roots)
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.domain_buffer_bytes, self.backlog_shards, self.max_lag_s = domain_buffer_bytes, backlog_shards, max_lag_s
        self.poll_interval_s = poll_interval_s
        self.vocab_size = vocab_size
        self._on_corrupt = on_corrupt
        self.watchers = [IndexWatcher(r) for r in self.roots]
        self.openers = [ShardOpener(r) for r in self.roots]
        self._poll_locks = [threading.Lock() for _ in self.roots]
        self._assigned: dict[tuple[int, str, str], int] = {}  # (root, domain, writer or "") -> shards seen
        # object-store roots: only each writer's order is the same for every rank (streams/writer_log.py)
        self._per_writer = [storage.is_remote(r) for r in self.roots]
        self._mine: dict[tuple[int, str], bool] = {}  # (root, shard) -> assigned to this rank
        self.feeds: dict[str, DomainFeed] = {}
        self._caps: dict[str, int] | None = None  # per-domain read-ahead caps (None: domain_buffer_bytes)
        self.available: dict[str, int] = {}  # samples of each domain this rank has read
        self.newest_published = 0.0  # newest publish time of this rank's shards (any domain and root)
        self.bad_samples: list[tuple[str, str]] = []
        self.excluded_shards: set[str] = set()
        self.excluded_sources: set[str] = set()
        self.domain_sources: dict[str, set[str]] = {}  # every source seen per domain (this rank's shards)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # notified when data arrives (each reader has its own)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pollers: list[threading.Thread] = []
        self.last_sample_at = time.monotonic()
        self.error: BaseException | None = None  # set when a reader thread died; see check()

    # -- threads -------------------------------------------------------------------------------
    def start(self) -> StreamBuffers:
        if not self._pollers:
            self._stop.clear()
            for i in range(len(self.roots)):
                self._poll(i)  # the first catalog synchronously: readers start at once
            self._pollers = [threading.Thread(target=self._poll_loop, args=(i,), name=f"stream-poll-{i}",
                                              daemon=True) for i in range(len(self.roots))]
            for t in self._pollers:
                t.start()
            with self._cond:
                feeds = list(self.feeds.values())
            for f in feeds:
                f.start()
        return self

    def stop(self) -> None:
        """Stop the threads (:meth:`start` resumes them where they were)."""
        self._stop.set()
        self._wake.set()
        for t in self._pollers:
            t.join(timeout=10)
        self._pollers = []
        with self._cond:
            feeds = list(self.feeds.values())
        for f in feeds:
            f.stop()

    def close(self) -> None:
        """Stop the threads and remove the decompression caches."""
        self.stop()
        for o in self.openers:
            o.close()

    @property
    def running(self) -> bool:
        return bool(self._pollers)

    def notify(self) -> None:
        """Poll every root now (e.g. on a ShardPublished event) instead of at the next interval."""
        self._wake.set()

    def _poll_loop(self, i: int) -> None:
        try:
            interval = self.poll_interval_s
            while not self._stop.is_set():
                quiet = not self._poll(i)  # an idle root is polled less often, down to IDLE_POLL_FACTOR x
                interval = min(2 * interval, IDLE_POLL_FACTOR * self.poll_interval_s) if quiet else self.poll_interval_s
                self._wake.wait(interval)
                self._wake.clear()
        except BaseException as e:
            log.exception("stream poll thread of %s failed", self.roots[i])
            self._fail(e)

    def _poll(self, i: int) -> bool:
        """New shards of root ``i`` (True if any): assign each to a rank; this rank's go to their
        domain's feed."""
        with self._poll_locks[i]:
            new = self.watchers[i].poll()
            for entry in new:
                mine = next((self._mine[(i, a)] for a in reversed(entry.ancestors) if (i, a) in self._mine), None)
                if mine is None:  # a takedown's replacement keeps its shard's rank (same position)
                    key = (i, entry.domain, entry.writer if self._per_writer[i] else "")
                    k = self._assigned.get(key, 0)
                    self._assigned[key] = k + 1
                    offset = zlib.crc32(entry.writer.encode()) if self._per_writer[i] else 0  # spread writers' starts
                    mine = (k + offset) % self.dp_world == self.dp_rank
                self._mine[(i, entry.name)] = mine
                if mine:
                    with self._cond:
                        if self.excluded_shards.intersection(entry.ancestors):
                            self.excluded_shards.add(entry.name)
                        self._feed(entry.domain).add(i, entry)
                        self.newest_published = max(self.newest_published, entry.published_at)
            if new and self.max_lag_s > 0:
                self._expire()
            emptied = {name for name in self.watchers[i].emptied if self._mine.pop((i, name), False)}
            if emptied:  # a takedown removed every sample of these: never train what is buffered
                self.drop_shards(emptied)
            return bool(new)

    def _feed(self, domain: str) -> DomainFeed:
        """The feed of ``domain``, created (and started if running) on first sight (cond held)."""
        feed = self.feeds.get(domain)
        if feed is None:
            feed = self.feeds[domain] = DomainFeed(
                domain, openers=self.openers, lock=self._lock, cond=self._cond, cap_bytes=self._cap(domain),
                backlog_shards=self.backlog_shards, max_lag_s=self.max_lag_s, accept=self._accept,
                newest=lambda: self.newest_published, excluded=self._excluded,
                on_corrupt=self._corrupt, on_error=self._fail)
            if self._pollers:
                feed.start()
        return feed

    def _cap(self, domain: str) -> int:
        if self._caps is None:
            return self.domain_buffer_bytes
        return self._caps.get(domain, MIN_CAP_BYTES)

    def set_read_ahead(self, token_shares: dict[str, float]) -> None:
        """Read-ahead per domain in tokens (e.g. a few batches at its draw weight): a domain drawn
        rarely buffers little, so its samples are as fresh as a busy domain's; capped by
        ``domain_buffer_bytes``; domains not named buffer :data:`MIN_CAP_BYTES`."""
        caps = {d: min(self.domain_buffer_bytes, MIN_CAP_BYTES + _round_up(int(t * TOKEN_BYTES)))
                for d, t in token_shares.items()}
        with self._cond:
            if caps == self._caps:
                return
            self._caps = caps
            for d, f in self.feeds.items():
                f.set_cap(self._cap(d))

    def _expire(self) -> None:
        """Mark buffered documents that became stale (a newer shard came): they no longer count as
        data this rank has, and their readers may refill."""
        with self._cond:
            for f in self.feeds.values():
                if f.expire():
                    f.wake()

    def drop_if_stale(self, doc: Doc) -> bool:
        """True if ``doc`` (e.g. the packer's carried rest of a split document) comes from a stale
        shard (trainer/data/feed.py); it is then counted as a skipped sample of its domain."""
        with self._cond:
            feed = self.feeds.get(doc.domain)
            return feed is not None and feed.skip_stale((doc.root, doc.shard))

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            self.error = e
            self._cond.notify_all()

    def check(self) -> None:
        """Raise :class:`PrefetchError` if a reader thread died (the training loop must not wait
        forever on buffers nobody fills)."""
        if self.error is not None:
            raise PrefetchError(f"stream prefetch thread failed: {type(self.error).__name__}: {self.error}") \
                from self.error

    def _corrupt(self, root: int, shard: str, reason: str) -> None:
        if self._on_corrupt is not None:
            self._on_corrupt(self.roots[root], shard, reason)

    def _excluded(self, key: ShardKey) -> bool:
        return key[1] in self.excluded_shards

    def _accept(self, root: int, entry: ShardEntry, sample: dict[str, Any]) -> Doc | None:
        """The document of a sample read (called by a feed thread), None if it must not be trained."""
        source = str(sample.get("source") or "")
        with self._cond:
            self.domain_sources.setdefault(entry.domain, set()).add(canonical_source(source))
            self.available[entry.domain] = self.available.get(entry.domain, 0) + 1
            self.last_sample_at = time.monotonic()
        if canonical_source(source) in self.excluded_sources:
            return None
        tokens = np.asarray(sample["tokens"], dtype=np.int32)
        if self.vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            self.bad_samples.append((sample["id"], f"token id outside [0, {self.vocab_size})"))
            log.warning("dropping sample %s: token id outside vocab [0, %d)", sample["id"], self.vocab_size)
            return None
        return Doc(id=str(sample["id"]), domain=entry.domain, tokens=tokens,
                   produced_at=float(sample.get("produced_at") or 0.0), shard=entry.name, source=source,
                   root=root, index=int(sample["_index"]), license=str(sample.get("license") or ""))

    # -- consumer side -------------------------------------------------------------------------------
    def domains(self) -> list[str]:
        """Domains with documents buffered now."""
        with self._cond:
            return sorted(d for d, f in self.feeds.items() if f.docs)

    def take(self, domain: str, timeout_s: float) -> Doc | None:
        """Pop the next document of ``domain``; wait up to ``timeout_s`` for one (None on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                feed = self.feeds.get(domain)
                doc = feed.pop() if feed is not None else None
                if doc is not None:
                    return doc
                if feed is not None:
                    feed.wake(if_low=False)
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def take_nowait(self, domain: str) -> Doc | None:
        """Pop the next document of ``domain`` if one is buffered (the fast path of :meth:`take`)."""
        with self._cond:
            feed = self.feeds.get(domain)
            doc = feed.pop() if feed is not None else None
            if doc is None:
                self.check()
            return doc

    def refill(self) -> None:
        """Wake the readers of buffers a quarter full or less (call between batches)."""
        with self._cond:
            for f in self.feeds.values():
                f.wake()

    def retired_domains(self) -> set[str]:
        """Domains whose every source seen so far is quarantined: no data will come, never draw them."""
        with self._cond:
            return {d for d, srcs in self.domain_sources.items() if srcs <= self.excluded_sources}

    def has_data(self, domain: str) -> bool:
        with self._cond:
            feed = self.feeds.get(domain)
            return feed is not None and feed.docs > 0

    def can_fill(self, among: set[str], tokens: int) -> bool:
        """``tokens`` are buffered in the domains of ``among``, or some are and none of their readers
        can add more now (each buffer at its read-ahead cap or its domain read to the end)."""
        with self._cond:
            feeds = [f for d, f in self.feeds.items() if d in among]
            have = sum(f.tokens for f in feeds)
            return have >= tokens or (have > 0 and all(f.settled for f in feeds))

    def expecting(self, domain: str) -> bool:
        """``domain`` has documents buffered or its reader has something to read."""
        with self._cond:
            feed = self.feeds.get(domain)
            return feed is not None and feed.expecting

    def wait_until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``pred()`` (evaluated under the buffers' lock, after each change) holds; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            for f in self.feeds.values():
                f.wake(if_low=False)
            while not pred():
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def wait_any(self, timeout_s: float, among: set[str] | None = None) -> bool:
        """Wait until some domain (of ``among``, if given) has data; False on timeout."""
        return self.wait_until(
            lambda: any(f.docs for d, f in self.feeds.items() if among is None or d in among), timeout_s)

    def drop_shards(self, shards: set[str]) -> int:
        """Quarantine: skip these shards from now on (also mid-shard) and drop their buffered samples."""
        with self._cond:
            self.excluded_shards |= shards
        return self._purge(lambda doc: doc.shard in shards)

    def drop_sources(self, sources: set[str]) -> int:
        """Quarantine: drop samples of these sources from now on, buffered ones included."""
        sources = {canonical_source(s) for s in sources}  # look-alike spellings are the same source
        with self._cond:
            self.excluded_sources |= sources
        return self._purge(lambda doc: canonical_source(doc.source) in sources)

    def _purge(self, bad: Callable[[Doc], bool]) -> int:
        with self._cond:
            return sum(f.purge(bad) for f in self.feeds.values())

    def buffered_shards(self, except_domains: set[str] = frozenset()) -> set[str]:
        """Shards not fully trained yet (buffered, being read, or published and still unread: a
        rollback quarantines them all, so no shard of an implicated domain is trained after it),
        except those of ``except_domains``."""
        with self._cond:
            return {name for d, f in self.feeds.items() if d not in except_domains for name in f.unfinished_shards()}

    def skipped(self) -> dict[str, dict[str, int]]:
        """Per domain: shards (wholly or in part) and samples skipped by the freshness policy."""
        with self._cond:
            return {d: {"shards": f.skipped_shards, "samples": f.skipped_samples}
                    for d, f in sorted(self.feeds.items()) if f.skipped_shards}

    def fetch_tokens(self, root: int, shard: str, index: int) -> np.ndarray:
        """Tokens of one sample, read now (a checkpoint's carried document; quarantine not applied).
        If a takedown replaced the shard since, the sample is read from the replacement, and a
        sample it removed has no tokens."""
        self._poll(root)
        watcher = self.watchers[root]
        if shard in watcher.emptied:  # a takedown removed every sample of it
            return np.zeros(0, dtype=np.int32)
        replacement = next((e for e in watcher.entries.values() if shard in e.ancestors), None)
        if replacement is not None:
            mapped = replacement.map_index(shard, index)
            if mapped is None:
                return np.zeros(0, dtype=np.int32)
            shard, index = replacement.name, mapped
        entry = watcher.entries.get(shard)
        if entry is None:
            raise ValueError(f"checkpoint cursor names shard {shard!r}, not published in {self.roots[root]}")
        opener = ShardOpener(self.roots[root])
        try:
            return np.asarray(opener.read(opener.open(shard, entry.info), index)["tokens"], dtype=np.int32)
        finally:
            opener.close()

    # -- checkpoint ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Cursor per domain (shards done, next sample of the shard being consumed); no samples."""
        with self._cond:
            return {
                "roots": len(self.roots),
                "feeds": {d: f.state_dict() for d, f in self.feeds.items()},
                "available": dict(self.available),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["roots"] != len(self.roots):
            raise ValueError(f"checkpoint has {state['roots']} stream roots, run has {len(self.roots)}")
        running = self.running
        if running:  # a rollback mid-run: readers stop, restart at the restored cursor
            self.stop()
        with self._cond:
            for d, s in state["feeds"].items():
                self._feed(d).restore(s)
            for d, f in self.feeds.items():
                if d not in state["feeds"]:
                    f.restore({"done": [], "current": None, "skipped_shards": 0, "skipped_samples": 0})
            self.available = dict(state["available"])
        if running:
            self.start()


def _round_up(n: int) -> int:
    """``n`` rounded up to 1/8 of its power of two (caps move in steps, not at every weight update)."""
    if n <= 8:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step
