"""LiveStreamDataLoader: torchtitan dataloader over live MDS streams with online mixing.

Each document of a row is drawn from a domain sampled with the mixer's current
weights (a seeded per-rank RNG: one ``rng.random()`` per document against the
cumulative weights), then taken from that domain's prefetched buffer. The
distribution is computed once per batch over the domains not paused, starved or
retired, and again whenever that set changes mid-batch (a domain starves, or the
loader waited for data). If the buffer is empty the loader waits, logging a visible
status; all such waits of one batch together last at most ``starve_timeout_s`` (keep it
below the process group's timeout), after which a drawn empty domain counts as starved
and is not drawn until its buffer has data again (the one path whose outcome depends on
timing; it is logged). Batches carry a ``_meta`` entry (domains of the label tokens,
documents, shards, produced_at) that the trainer strips before the forward pass.

A batch starts only when every rank holds a batch's worth of tokens in domains it may
draw (:class:`~trainer.data.rendezvous.DataRendezvous`): on an empty or stalled stream all
ranks wait together, with a heartbeat collective every ``heartbeat_s``, and go on together.
Reading is per rank and per domain, byte-capped and newest shard first
(:mod:`trainer.data.buffers`, :mod:`trainer.data.feed`); checkpoints hold cursors only.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchtitan.components.dataloader import BaseDataLoader

from streams import manifest as mf
from trainer.data.buffers import StreamBuffers
from trainer.data.packer import IGNORE_INDEX, Doc, Packer
from trainer.data.rendezvous import DataRendezvous
from trainer.mixing import Mixer

__all__ = ["BatchMeta", "LiveStreamDataLoader", "batch_tokens_by", "freshness"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchMeta:
    """Side information of one batch, for per-domain losses, freshness and guards."""

    domains: list[str]  # domain names; domain_idx indexes this list
    domain_idx: torch.Tensor  # int64 [B, L]: domain of each label position
    doc_ids: list[str]
    doc_domains: list[str]
    doc_sources: list[str]
    shards: list[str]
    produced_at: list[float]
    wait_s: float  # time this batch waited for data
    starved: list[str]
    shard_domains: dict[str, str] = field(default_factory=dict)  # shard -> its domain (one per shard)
    source_tokens: dict[str, int] = field(default_factory=dict)  # input tokens per source (lineage)
    license_tokens: dict[str, int] = field(default_factory=dict)  # input tokens per license (lineage)

    def domain_sums(self, token_losses: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
        """Per-domain loss sums (float64) and label-token counts of CPU tensors, ``IGNORE_INDEX`` excluded."""
        k = len(self.domains)
        key = np.where(labels.numpy() != IGNORE_INDEX, self.domain_idx.numpy(), k).ravel()  # k: ignored
        loss = np.bincount(key, weights=token_losses.double().numpy().ravel(), minlength=k + 1)
        tokens = np.bincount(key, minlength=k + 1)
        return dict(zip(self.domains, loss[:k].tolist())), dict(zip(self.domains, tokens[:k].tolist()))


def freshness(produced_at: list[float], now: float) -> dict[str, float | None]:
    """Sample age at training over documents produced at ``produced_at`` (epoch s; 0: unknown):
    ``freshness_s`` (median) and ``freshness_p95_s``."""
    ages = np.asarray([now - p for p in produced_at if p > 0], dtype=np.float64)
    if not ages.size:
        return {"freshness_s": None, "freshness_p95_s": None}
    return {"freshness_s": float(np.median(ages)), "freshness_p95_s": float(np.percentile(ages, 95))}


def batch_tokens_by(docs: list[Doc], doc_index: np.ndarray, key: Callable[[Doc], str]) -> dict[str, int]:
    """Input tokens of a packed batch per ``key`` (source, license) of their document."""
    out: Counter[str] = Counter()
    for doc, n in zip(docs, np.bincount(doc_index.ravel(), minlength=len(docs)).tolist(), strict=True):
        out[key(doc)] += n
    return dict(out)


class LiveStreamDataLoader(BaseDataLoader):
    """Stateful, infinite loader of packed rows from live stream roots."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        stream_roots: list[str] = field(default_factory=list)
        domains: list[str] = field(default_factory=list)
        """domains to mix from the start (empty: those published at start-up, then any new ones)"""
        seed: int = 1234
        read_ahead_s: float = 2.0
        """read-ahead of each domain: this many seconds of its consumption at the current rate and
        draw weight (smaller: fresher samples, more exposure to read latency)"""
        read_ahead_batches: float = 2.0
        """... and at least this many batches at its draw weight"""
        domain_buffer_bytes: int = 64 << 20
        """hard cap of one domain's buffer on one rank; a full domain stops reading"""
        backlog_shards: int = 16
        """unread shards kept per domain and rank, newest first; older ones are skipped and counted
        (the freshness policy, trainer/data/feed.py; 0: no bound)"""
        max_lag_s: float = 30.0
        """never train data (unread, buffered, or the carried rest of a split document) of a shard
        published this long before this rank's newest shard: it is skipped and counted; a paused
        stream still trains (0: no bound; set both to 0 to replay a finished stream in full)"""
        poll_interval_s: float = 0.2
        starve_timeout_s: float = 30.0
        """longest a batch waits in all for drawn domains with no data (then they starve)"""
        status_every_s: float = 5.0
        heartbeat_s: float = 5.0
        """while any rank has no data: interval of the collective that keeps all ranks waiting together"""
        rendezvous_timeout_s: float = 600.0
        """timeout of the data rendezvous' gloo group (fires only if a rank is gone)"""
        check_vocab: bool = True
        mixing: Mixer.Config = field(default_factory=Mixer.Config)

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        seq_len: int,
        local_batch_size: int,
        vocab_size: int | None = None,
        on_corrupt: Callable[[str, str, str], None] | None = None,
        **_unused: Any,
    ):
        if not config.stream_roots:
            raise ValueError("dataloader.stream_roots is empty: pass --stream-root DIR")
        self.config = config
        self.dp_rank, self.dp_world = dp_rank, dp_world_size
        self.batch_size, self.seq_len = local_batch_size, seq_len
        self.batch_tokens = local_batch_size * (seq_len + 1)
        self.buffers = StreamBuffers(
            config.stream_roots,
            dp_rank=dp_rank,
            dp_world=dp_world_size,
            domain_buffer_bytes=config.domain_buffer_bytes,
            backlog_shards=config.backlog_shards,
            max_lag_s=config.max_lag_s,
            poll_interval_s=config.poll_interval_s,
            vocab_size=vocab_size if config.check_vocab else None,
            on_corrupt=self._corrupt,
        )
        self.on_corrupt = on_corrupt
        self.rendezvous = DataRendezvous(timeout_s=config.rendezvous_timeout_s)
        self.mixer = config.mixing.build()
        self.mixer.add_domains(config.domains or _published_domains(config.stream_roots))
        self.packer = Packer(seq_len)
        self.rng = np.random.Generator(np.random.PCG64([config.seed, dp_rank]))
        self.paused: set[str] = set()
        self.status = "idle"
        self.starved: set[str] = set()
        self.trained: dict[str, int] = {}
        self._last_status_log = 0.0
        self._draw: tuple[list[str], list[float]] | None = None  # domains, cumulative weights
        self._wait_deadline = 0.0  # end of this batch's waiting budget
        self._last_batch_at: float | None = None
        self._tokens_per_s = 0.0  # consumption rate (EMA over batches)

    # -- events ------------------------------------------------------------------------
    def _corrupt(self, root: str, shard: str, reason: str) -> None:
        log.error("corrupt shard %s in %s skipped: %s", shard, root, reason)
        if self.on_corrupt is not None:
            self.on_corrupt(root, shard, reason)

    def quarantine(self, shards: set[str] = frozenset(), sources: set[str] = frozenset()) -> int:
        """Never train these shards/sources again: skip them in the stream, drop what is buffered."""
        dropped = 0
        if shards:
            dropped += self.buffers.drop_shards(set(shards))
        if sources:
            dropped += self.buffers.drop_sources(set(sources))
        return dropped + int(self.packer.drop_carry(shards=set(shards), sources=set(sources)))

    def pending_shards(self, except_domains: set[str] = frozenset()) -> set[str]:
        """Shards of this rank not fully trained (read, buffered, carried by the packer, or still unread),
        except those of ``except_domains``."""
        carry = self.packer.carry
        carried = {carry.shard} if carry is not None and carry.domain not in except_domains else set()
        return self.buffers.buffered_shards(except_domains) | carried

    # -- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        self._set_read_ahead()
        self._last_batch_at = None  # the first rate is measured over a whole step, not over start()
        self.buffers.start()
        while True:
            yield self.next_batch()

    def next_batch(self) -> tuple[dict[str, Any], torch.Tensor]:
        t0 = time.monotonic()
        self._set_read_ahead()
        self._await_data()
        if self.packer.carry is not None and self.buffers.drop_if_stale(self.packer.carry):
            self.packer.carry = None  # the rest of a split document from a stale shard (a rollback's too)
        self._wait_deadline = time.monotonic() + self.config.starve_timeout_s
        starved: list[str] = []
        self._draw = None
        packed = self.packer.pack_batch(lambda: self._next_doc(starved), self.batch_size)
        docs = packed.docs
        doc_domains = [d.domain for d in docs]
        names = sorted(set(doc_domains))
        index = {d: i for i, d in enumerate(names)}
        for d, n in Counter(doc_domains).items():
            self.trained[d] = self.trained.get(d, 0) + n
        codes = np.fromiter((index[d] for d in doc_domains), dtype=np.int64, count=len(docs))
        meta = BatchMeta(
            domains=names,
            domain_idx=torch.from_numpy(codes[packed.doc_index]),
            doc_ids=[d.id for d in docs],
            doc_domains=doc_domains,
            doc_sources=[d.source for d in docs],
            shards=sorted({d.shard for d in docs}),
            produced_at=[d.produced_at for d in docs],
            wait_s=time.monotonic() - t0,
            starved=starved,
            shard_domains={d.shard: d.domain for d in docs},
            source_tokens=batch_tokens_by(docs, packed.doc_index, lambda d: d.source),
            license_tokens=batch_tokens_by(docs, packed.doc_index, lambda d: d.license),
        )
        self.status = "running"
        self.buffers.refill()  # readers run while the step computes, not while this batch is drawn
        batch = {
            "input": torch.from_numpy(packed.input),
            "positions": torch.from_numpy(packed.positions),
            "_meta": meta,
        }
        return batch, torch.from_numpy(packed.labels)

    def _set_read_ahead(self) -> None:
        """Each domain reads ahead ``read_ahead_s`` of its consumption at its draw weight, at least
        ``read_ahead_batches`` batches: memory stays bounded, a rarely drawn domain's samples do not
        sit in its buffer for long, and readers wake (and take the GIL) rarely on fast steps."""
        now = time.monotonic()
        if self._last_batch_at is not None and now > self._last_batch_at:
            rate = self.batch_tokens / (now - self._last_batch_at)
            self._tokens_per_s = rate if not self._tokens_per_s else 0.9 * self._tokens_per_s + 0.1 * rate
        self._last_batch_at = now
        weights = self.mixer.sampling_weights(exclude=self.paused | self.buffers.retired_domains())
        tokens = max(self.config.read_ahead_batches * self.batch_tokens, self.config.read_ahead_s * self._tokens_per_s)
        self.buffers.set_read_ahead({d: w * tokens for d, w in weights.items()})

    def _drawable(self) -> set[str]:
        return set(self.mixer.domains) - self.paused - self.buffers.retired_domains()

    def _ready(self) -> bool:
        """This rank holds a batch's worth of tokens in domains it may draw, or all it can hold now."""
        return self.buffers.can_fill(self._drawable(), self.batch_tokens)

    def _await_data(self) -> None:
        """Return when every rank is ready (all ranks call this at the same point of every batch)."""
        waits = 0
        while not self.rendezvous.all_ready(self._ready()):
            # domains that arrived since start-up (or since the stream went dry) join the mixer on
            # every rank at once: otherwise a stream whose only data is in a new domain waits forever
            self.mixer.add_domains(self.rendezvous.union(self.buffers.domains()))
            self.status = "waiting for data: some rank has less than a batch in the domains it may draw"
            if waits:  # the first wait is the usual read-ahead at start-up: not worth a warning
                self._log_status()
            waits += 1
            self.buffers.wait_until(
                lambda: self._ready() or not set(self.buffers.domains()) <= set(self.mixer.domains),
                self.config.heartbeat_s)

    def _domain_draw(self) -> tuple[list[str], list[float]] | None:
        """Domains that may be drawn now and their cumulative weights (None: none may)."""
        self.starved = {d for d in self.starved if not self.buffers.has_data(d)}
        weights = self.mixer.sampling_weights(exclude=self.paused | self.starved | self.buffers.retired_domains())
        if not weights:
            return None
        cdf = list(itertools.accumulate(weights.values()))
        return list(weights), [c / cdf[-1] for c in cdf]  # ends at exactly 1.0: rng.random() < 1 stays in range

    def _next_doc(self, starved: list[str]) -> Doc:
        while True:
            if self._draw is None:
                self._draw = self._domain_draw()
                if self._draw is None:
                    self._wait_for_any()
                    continue
            names, cdf = self._draw
            domain = names[bisect.bisect_right(cdf, self.rng.random())]
            doc = self.buffers.take_nowait(domain)
            if doc is None:
                self._draw = None  # waiting may change what is drawable
                # a domain with nothing to read on this rank (e.g. its shards are other ranks') starves at once
                doc = self._wait_for(domain) if self.buffers.expecting(domain) else None
            if doc is not None:
                return doc
            self.starved.add(domain)
            starved.append(domain)
            log.warning("domain %s starved (no data on this rank within the batch's wait budget of %.0fs): "
                        "not drawn until it has data", domain, self.config.starve_timeout_s)

    def _wait_for(self, domain: str) -> Doc | None:
        deadline = self._wait_deadline
        while True:
            self.status = f"waiting for data: domain {domain!r}"
            self._log_status()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            doc = self.buffers.take(domain, min(left, self.config.status_every_s))
            if doc is not None:
                return doc

    def _wait_for_any(self) -> None:
        known = set(self.mixer.domains)
        among = known - self.paused if known else None
        while not self.buffers.wait_any(self.config.status_every_s, among=among):
            self.status = "waiting for data: stream has no samples for any active domain"
            self._log_status()

    def _log_status(self) -> None:
        now = time.monotonic()
        if now - self._last_status_log >= self.config.status_every_s:
            self._last_status_log = now
            idle = now - self.buffers.last_sample_at
            log.warning("[data] %s (last sample %.1fs ago, paused=%s)", self.status, idle, sorted(self.paused))

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "buffers": self.buffers.state_dict(),
            "packer": self.packer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "mixer": self.mixer.state_dict(),
            "trained": dict(self.trained),
        }
        return {f"dp_rank_{self.dp_rank}": pickle.dumps(state), "world_size": self.dp_world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = f"dp_rank_{self.dp_rank}"
        if not state_dict or key not in state_dict:
            return
        if state_dict["world_size"] != self.dp_world:
            raise ValueError(
                f"checkpoint was written with {state_dict['world_size']} data-parallel ranks, "
                f"this run has {self.dp_world}; resume with the same world size"
            )
        state = pickle.loads(state_dict[key])
        self.buffers.load_state_dict(state["buffers"])
        self.packer.load_state_dict(state["packer"], self.buffers.fetch_tokens)
        self.rng.bit_generator.state = state["rng"]
        self.mixer.load_state_dict(state["mixer"])
        self.trained = dict(state["trained"])

    def cursor_summary(self) -> dict[str, Any]:
        """Small JSON-able view of the data cursor (for CheckpointSaved and headwater.json)."""
        feeds = self.buffers.state_dict()["feeds"]
        return {
            "roots": self.buffers.roots,
            "dp_rank": self.dp_rank,
            "shards_done": {d: len(f["done"]) for d, f in feeds.items()},
            "current": {d: f["current"] for d, f in feeds.items() if f["current"] is not None},
            "skipped": self.buffers.skipped(),
            "trained": dict(self.trained),
        }

    def close(self) -> None:
        self.buffers.close()


def _published_domains(roots: list[str]) -> list[str]:
    """Domains of the shards published now, agreed by all ranks (rank 0 reads, then broadcasts)."""
    found: set[str] = set()
    if not dist.is_initialized() or dist.get_rank() == 0:
        for root in roots:
            try:
                found |= {e["domain"] for e in mf.read_sidecar(root).get("shards", {}).values()}
            except (OSError, ValueError):
                pass
    if dist.is_initialized():
        box = [sorted(found)]
        dist.broadcast_object_list(box, src=0)
        found = set(box[0])
    return sorted(found)
