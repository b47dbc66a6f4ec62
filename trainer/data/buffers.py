"""Per-domain sample buffers filled from live stream roots by a background thread.

One :class:`~streams.mds.TailReader` per stream root is drained by a prefetch thread
into per-domain deques, so a training step finds its documents already decoded.
Data-parallel sharding: each rank reads every root and keeps the samples whose
ordinal in the root (publish order, identical for all ranks) is ``≡ dp_rank (mod
dp_world)``: no sample goes to two ranks. Quarantined shards are skipped by the readers and
quarantined sources are dropped on arrival (their ordinals still count, so sharding stays
aligned across ranks); both are also purged from the buffers. A snapshot (:meth:`state_dict`) holds the
readers' cursors and the buffered-but-untrained samples, taken under the lock that
also guards each read, so restoring it yields exactly the same future samples.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from streams.mds import TailReader
from trainer.data.packer import Doc

__all__ = ["PrefetchError", "StreamBuffers"]

log = logging.getLogger(__name__)


class PrefetchError(RuntimeError):
    """The background prefetch thread died; raised to the consumer of the buffers."""


class StreamBuffers:
    """Background-filled per-domain buffers over one or more stream roots."""

    def __init__(
        self,
        roots: list[str],
        *,
        dp_rank: int,
        dp_world: int,
        soft_capacity: int = 4096,
        poll_interval_s: float = 0.2,
        vocab_size: int | None = None,
        on_corrupt: Callable[[str, str, str], None] | None = None,
    ):
        if not roots:
            raise ValueError("at least one stream root is required")
        self.roots = list(roots)
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.soft_capacity = soft_capacity
        self.vocab_size = vocab_size
        self._on_corrupt = on_corrupt
        self.readers = [
            TailReader(r, poll_interval_s=poll_interval_s, on_corrupt=self._corrupt_cb(r)) for r in self.roots
        ]
        self._ordinals = [0] * len(self.roots)
        self.buffers: dict[str, deque[Doc]] = {}
        self.available: dict[str, int] = {}  # samples of each domain this rank has received
        self.bad_samples: list[tuple[str, str]] = []
        self.excluded_sources: set[str] = set()
        self.domain_sources: dict[str, set[str]] = {}  # every source seen per domain (all ranks' samples)
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._wanted: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by load_state_dict: the fill thread reopens its generators
        self.last_sample_at = time.monotonic()
        self.error: BaseException | None = None  # set when the prefetch thread died; see check()

    def _corrupt_cb(self, root: str):
        def cb(shard: str, reason: str) -> None:
            if self._on_corrupt is not None:
                self._on_corrupt(root, shard, reason)

        return cb

    # -- background fill -----------------------------------------------------------
    def start(self) -> StreamBuffers:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stream-prefetch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for r in self.readers:
            r.close()

    def _full(self) -> bool:
        with self._cond:
            total = sum(len(b) for b in self.buffers.values())
            starving = any(not self.buffers.get(d) for d in self._wanted)
        return total >= self.soft_capacity and not starving

    def _run(self) -> None:
        try:
            self._fill()
        except BaseException as e:  # surfaced to the training loop by check()
            log.exception("stream prefetch thread failed")
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def check(self) -> None:
        """Raise :class:`PrefetchError` if the prefetch thread died (the training loop must not wait
        forever on buffers nobody fills)."""
        if self.error is not None:
            raise PrefetchError(f"stream prefetch thread failed: {type(self.error).__name__}: {self.error}") \
                from self.error

    def _fill(self) -> None:
        gens: list = [None] * len(self.readers)
        generation = self._generation
        while not self._stop.is_set():
            if self._full():
                time.sleep(0.01)
                continue
            got = False
            for i, reader in enumerate(self.readers):
                with self._read_lock:
                    if generation != self._generation:
                        gens, generation = [None] * len(self.readers), self._generation
                    if gens[i] is None:
                        gens[i] = reader.samples(timeout_s=0.05)
                    sample = next(gens[i], None)
                    if sample is None:
                        gens[i] = None
                        continue
                    got = True
                    self._accept(i, sample)
            if not got:
                self._stop.wait(0.05)

    def _accept(self, root_i: int, sample: dict[str, Any]) -> None:
        ordinal = self._ordinals[root_i]
        self._ordinals[root_i] += 1
        source = str(sample.get("source") or "")
        self.domain_sources.setdefault(str(sample.get("domain") or "default"), set()).add(source)
        if ordinal % self.dp_world != self.dp_rank:
            return
        if source in self.excluded_sources:
            return
        tokens = np.asarray(sample["tokens"], dtype=np.int32)
        if self.vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            self.bad_samples.append((sample["id"], f"token id outside [0, {self.vocab_size})"))
            log.warning("dropping sample %s: token id outside vocab [0, %d)", sample["id"], self.vocab_size)
            return
        doc = Doc(
            id=str(sample["id"]),
            domain=str(sample.get("domain") or "default"),
            tokens=tokens,
            produced_at=float(sample.get("produced_at") or 0.0),
            shard=str(sample.get("_shard", "")),
            source=source,
        )
        with self._cond:
            self.buffers.setdefault(doc.domain, deque()).append(doc)
            self.available[doc.domain] = self.available.get(doc.domain, 0) + 1
            self.last_sample_at = time.monotonic()
            self._cond.notify_all()

    # -- consumer side ---------------------------------------------------------------
    def domains(self) -> list[str]:
        with self._cond:
            return sorted(self.buffers)

    def take(self, domain: str, timeout_s: float) -> Doc | None:
        """Pop the next document of ``domain``; wait up to ``timeout_s`` for one (None on timeout)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._wanted.add(domain)
            try:
                while not self.buffers.get(domain):
                    self.check()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(min(left, 0.5))
                return self.buffers[domain].popleft()
            finally:
                self._wanted.discard(domain)

    def take_nowait(self, domain: str) -> Doc | None:
        """Pop the next document of ``domain`` if one is buffered (the fast path of :meth:`take`)."""
        with self._cond:
            buf = self.buffers.get(domain)
            if not buf:
                self.check()
            return buf.popleft() if buf else None

    def retired_domains(self) -> set[str]:
        """Domains whose every source seen so far is quarantined: no data will come, never draw them."""
        # No lock: the fill thread holds _read_lock while it polls; list() of the items is atomic.
        return {d for d, srcs in list(self.domain_sources.items()) if srcs <= self.excluded_sources}

    def has_data(self, domain: str) -> bool:
        with self._cond:
            return bool(self.buffers.get(domain))

    def wait_any(self, timeout_s: float, among: set[str] | None = None) -> bool:
        """Wait until some domain (of ``among``, if given) has data; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not any(buf for d, buf in self.buffers.items() if among is None or d in among):
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def drop_shards(self, shards: set[str]) -> int:
        """Quarantine: skip these shards from now on and drop their buffered samples."""
        with self._read_lock:
            for r in self.readers:
                r.exclude(shards)
        return self._purge(lambda doc: doc.shard in shards)

    def drop_sources(self, sources: set[str]) -> int:
        """Quarantine: drop samples of these sources from now on, buffered ones included."""
        with self._read_lock:
            self.excluded_sources.update(sources)
        return self._purge(lambda doc: doc.source in sources)

    def _purge(self, bad: Callable[[Doc], bool]) -> int:
        dropped = 0
        with self._cond:
            for d, buf in self.buffers.items():
                keep = deque(doc for doc in buf if not bad(doc))
                dropped += len(buf) - len(keep)
                self.buffers[d] = keep
        return dropped

    def buffered_shards(self, except_domains: set[str] = frozenset()) -> set[str]:
        """Shards with samples waiting in the buffers (read but not trained yet), except ``except_domains``'."""
        with self._cond:
            return {doc.shard for d, buf in self.buffers.items() if d not in except_domains for doc in buf}

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self._read_lock, self._cond:
            return {
                "readers": [r.state_dict() for r in self.readers],
                "ordinals": list(self._ordinals),
                "available": dict(self.available),
                "buffers": {
                    d: [(x.id, x.tokens.tolist(), x.produced_at, x.shard, x.source) for x in buf]
                    for d, buf in self.buffers.items()
                },
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["readers"]) != len(self.readers):
            raise ValueError(f"checkpoint has {len(state['readers'])} stream roots, run has {len(self.readers)}")
        with self._read_lock, self._cond:
            for r, s in zip(self.readers, state["readers"]):
                r.load_state_dict(s)
            self._generation += 1
            self._ordinals = list(state["ordinals"])
            self.available = dict(state["available"])
            self.buffers = {
                d: deque(Doc(i, d, np.asarray(t, dtype=np.int32), *rest) for i, t, *rest in items)
                for d, items in state["buffers"].items()
            }
