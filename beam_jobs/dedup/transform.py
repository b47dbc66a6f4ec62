"""Dedup as a sharded Beam chain: every lookup is keyed state, spread over many keys.

1. ``Fingerprint`` (stateless): shingles, MinHash band keys, exact key, sketch; looks the
   document up in the *settled* index (what earlier micro-batches published; local runner
   only) and fans out: one probe per (band, bucket) key plus one per exact key, a
   registration of its sketch under its id hash, and the document itself under its own key.
2. ``Buckets`` keyed by ``(band, bucket)`` (exact: ``(-1, hash)``): buffers probes until the
   watermark passes them, then handles them in priority order (event time, then offset,
   partition and id hash):
   each probe asks every id already in the bucket (never its own) to verify, then joins it.
3. ``Verify`` keyed by a candidate's id hash holds its sketch and answers queries with the
   estimated Jaccard similarity (exact keys: 1.0); a query never matches the same
   (topic, partition, offset).
4. ``Decide`` keyed by the document: once every probe has reported and every query asked on
   its behalf is answered, the document is a duplicate iff a settled match or a verified
   candidate exists (completion is counted, so it does not depend on watermark holds).

Since every bucket handles its probes in the same priority order, of two near-duplicates
the later one (larger (event time, id hash)) always asks about the earlier one and never
the reverse: exactly one is kept, whichever workers hold their keys. A probe arriving after
the watermark passed it (late) asks everyone in the bucket, so it is the one dropped.
Beam state is committed with its bundle: a retried bundle starts from the state before it,
and the settled index is a pinned, read-only generation, so retries give identical output.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import BytesCoder, PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.keyed import admit, hold_probe, register_or_answer, take_due
from beam_jobs.dedup.minhash import exact_key
from beam_jobs.dedup.record import DedupRecord, encode_record
from beam_jobs.dedup.semantic_settled import SemanticSettledRef, write_pending
from beam_jobs.dedup.semantic_settled import sync as sync_semantic
from beam_jobs.dedup.settled import ID_BYTES, SettledRef
from beam_jobs.dedup.sketch import Sketch, coords_hash, estimate_jaccard, id_hash, make_sketch
from beam_jobs.records import Doc

__all__ = ["Dedup", "shard_key"]

EXACT_BAND = -1
_U64 = struct.Struct("<Q")


class _Probe(NamedTuple):
    dockey: tuple[int, int]
    idh: int
    coordh: int
    prio: int  # event time (micros)
    order: tuple[int, int, int]  # ties at one event time: (offset, partition, id hash)
    shingles: bytes  # uint32 shingle hashes (empty for exact probes)


class _Query(NamedTuple):
    dockey: tuple[int, int]
    coordh: int
    exact: bool
    shingles: bytes
    replay: bool  # the prober's own id was already in the bucket


def shard_key(doc: Doc, how: str) -> str:
    """The coarse key of the semantic index."""
    if how == "language":
        return doc.language or "und"
    if how == "source":
        return doc.source
    if how == "source_language":
        return f"{doc.source}/{doc.language or 'und'}"
    if how == "none":
        return "all"
    raise ValueError(f"unknown dedup shard_key {how!r}")


class _FingerprintFn(beam.DoFn):
    def __init__(self, config: DedupConfig, settled: SettledRef | None):
        self.config, self.settled = config, settled

    def setup(self):
        self.hasher = self.config.hasher()
        self.index = self.settled.open() if self.settled is not None else None

    def process(self, doc: Doc, ts=beam.DoFn.TimestampParam):
        if doc.dropped is not None:
            yield beam.pvalue.TaggedOutput("passed", doc)
            return
        Metrics.counter("dedup", "in").inc()
        try:  # all outputs or none: a half-emitted document would leave Decide waiting
            outputs = list(self._fingerprint(doc, ts))
        except Exception as e:  # noqa: BLE001 - one record's failure must not stop the pipeline
            Metrics.counter("dedup", "fingerprint_error").inc()
            outputs = [beam.pvalue.TaggedOutput("passed", doc.fail("dedup", "fingerprint_error",
                                                                   f"{type(e).__name__}: {e}"[:500]))]
        yield from outputs

    def _fingerprint(self, doc: Doc, ts):
        c = self.config
        idh, coordh = id_hash(doc.id), coords_hash(*doc.coords)
        dockey, prio, order = (idh, coordh), ts.micros, (doc.coords.offset, doc.coords.partition, idh)
        shingles = self.hasher.shingle_hashes(doc.text)
        exact = exact_key(doc.text) if c.exact else 0
        bands = self.hasher.band_keys(self.hasher.signature(doc.text, shingles)) if c.near else []
        sketch = make_sketch(idh, coordh, shingles, c.bloom_bytes, added=max(0, prio // 1_000_000))
        record = DedupRecord(sketch, [b & 0xFFFFFFFF for b in bands], exact)
        hit = None
        if self.index is not None:
            hit = self.index.lookup(idh=idh, coordh=coordh, exact=exact if c.exact else None,
                                    bands=record.bands if c.near else None, shingles=shingles,
                                    threshold=c.jaccard_threshold)
        yield dockey, ("doc", doc, record, hit[:2] if hit else None, len(bands) + int(c.exact))
        ident = (sketch.to_bytes() + doc.id.encode("utf-8", "surrogatepass")[:ID_BYTES])
        yield beam.pvalue.TaggedOutput("verify", (idh, ("reg", ident)))
        if c.exact:
            yield beam.pvalue.TaggedOutput("probe", ((EXACT_BAND, exact), _Probe(dockey, idh, coordh, prio, order, b"")))
        raw = shingles.tobytes()
        for band, key in enumerate(bands):
            yield beam.pvalue.TaggedOutput("probe", ((band, key), _Probe(dockey, idh, coordh, prio, order, raw)))


def _bucket_step(key: tuple[int, int], ids: list[int], ready: list[_Probe], cap: int):
    """Handle ``ready`` probes (in priority order) against the bucket's ``ids`` (updated in place):
    queries to Verify (main output) and one report per probe to Decide."""
    exact = key[0] == EXACT_BAND
    for p in ready:
        replay = p.idh in ids
        others = [i for i in ids if i != p.idh]
        asked = others[:1] if exact else others  # exact: the first holder is the original
        for cand in asked:
            yield cand, ("q", _Query(p.dockey, p.coordh, exact, p.shingles, replay))
        yield beam.pvalue.TaggedOutput("report", (p.dockey, ("band", len(asked))))
        if not replay:
            admit(ids, p.idh, cap, "dedup")


def _bucket_batch(element, cap: int):
    """Bounded input: a bucket's probes all at once (GroupByKey), in priority order."""
    key, probes = element
    yield from _bucket_step(key, [], sorted(probes, key=lambda p: (p.prio, p.order)), cap)


class _BucketFn(beam.DoFn):
    """Keyed by (band, bucket): the ids in the bucket (packed uint64, at most ``bucket_cap``)."""

    IDS = ReadModifyWriteStateSpec("ids", BytesCoder())
    PENDING = BagStateSpec("pending", PickleCoder())
    NEXT = ReadModifyWriteStateSpec("next", VarIntCoder())
    WAKE = TimerSpec("wake", TimeDomain.WATERMARK)

    def __init__(self, config: DedupConfig):
        self.cap = config.bucket_cap

    def process(self, element, pending=beam.DoFn.StateParam(PENDING), nxt=beam.DoFn.StateParam(NEXT),  # noqa: B008
                wake=beam.DoFn.TimerParam(WAKE)):  # noqa: B008
        hold_probe(element[1], pending, nxt, wake)

    @on_timer(WAKE)
    def handle(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
               ids_state=beam.DoFn.StateParam(IDS), pending=beam.DoFn.StateParam(PENDING),  # noqa: B008
               nxt=beam.DoFn.StateParam(NEXT), wake=beam.DoFn.TimerParam(WAKE)):  # noqa: B008
        ready = take_due(fired.micros, pending, nxt, wake)
        ids = np.frombuffer(ids_state.read() or b"", dtype=np.uint64).tolist()
        yield from _bucket_step(key, ids, ready, self.cap)
        ids_state.write(np.asarray(ids, dtype=np.uint64).tobytes())


class _VerifyFn(beam.DoFn):
    """Keyed by a document's id hash: its sketch and id; answers queries about it."""

    SKETCH = ReadModifyWriteStateSpec("sketch", BytesCoder())
    WAITING = BagStateSpec("waiting", PickleCoder())

    def __init__(self, config: DedupConfig):
        self.threshold = config.jaccard_threshold
        self.head = len(Sketch(0, 0, 0, 0, 0, b"").to_bytes())
        self.bloom = config.bloom_bytes

    def answer(self, ident: bytes, q: _Query) -> tuple:
        """Every query is answered (Decide counts answers); a match carries a kind."""
        sketch = Sketch.from_bytes(ident[: self.head + self.bloom])
        cand_id = ident[self.head + self.bloom :].decode("utf-8", "replace")
        if sketch.coordh == q.coordh:  # the same record at the same offset: never its own duplicate
            Metrics.counter("dedup", "self_match_skipped").inc()
            return q.dockey, ("v", None, 0.0, cand_id, sketch.added, q.replay)
        if q.exact:
            return q.dockey, ("v", "exact", 1.0, cand_id, sketch.added, q.replay)
        j = estimate_jaccard(sketch, np.frombuffer(q.shingles, dtype=np.uint32))
        return q.dockey, ("v", "near" if j >= self.threshold else None, j, cand_id, sketch.added, q.replay)

    def process(self, element, sketch_state=beam.DoFn.StateParam(SKETCH),  # noqa: B008
                waiting=beam.DoFn.StateParam(WAITING)):  # noqa: B008
        _, (kind, payload) = element
        yield from register_or_answer(kind, payload, sketch_state, waiting, self.answer)


def _verify_batch(element, verify: _VerifyFn):
    """Bounded input: a candidate's registration and every query about it (GroupByKey)."""
    _, messages = element
    regs = [payload for kind, payload in messages if kind == "reg"]
    for kind, q in messages:
        if kind == "q":
            yield verify.answer(regs[0], q)


class _DecideFn(beam.DoFn):
    """Keyed by (id hash, coords hash): collects the document, one report per probe and one
    answer per query asked on its behalf; decides once all are in (no watermark needed)."""

    DOCS = BagStateSpec("docs", PickleCoder())
    TALLY = ReadModifyWriteStateSpec("tally", PickleCoder())  # [probes due, probes in, answers due, answers in, best]

    def __init__(self, count_kept: bool):
        self.count_kept = count_kept  # False: the semantic stage has the last word

    @staticmethod
    def tally(t: list, msg: tuple) -> tuple | None:
        """Fold ``msg`` into the tally ``t``; returns the (doc, record, settled hit) it carries."""
        if msg[0] == "doc":
            t[0] += msg[4]
            return msg[1:4]
        if msg[0] == "band":
            t[1] += 1
            t[2] += msg[1]
            return None
        _, kind, j, cand_id, cand_added, replay = msg
        t[3] += 1
        rank = (kind == "exact", j)
        if kind is not None and (t[4] is None or rank > t[4][0]):
            t[4] = (rank, kind, cand_id, cand_added, replay)
        return None

    def batch(self, element):
        """Bounded input: a document's messages all at once (GroupByKey)."""
        _, messages = element
        t = [0, 0, 0, 0, None]
        held = [h for h in (self.tally(t, m) for m in messages) if h is not None]
        yield from self._decide(held, t[4])

    def process(self, element, docs=beam.DoFn.StateParam(DOCS), tally=beam.DoFn.StateParam(TALLY)):  # noqa: B008
        _, msg = element
        t = tally.read() or [0, 0, 0, 0, None]
        carried = self.tally(t, msg)
        if carried is not None:
            docs.add(carried)
        held = list(docs.read())
        if not held or t[1] < t[0] or t[3] < t[2]:
            tally.write(t)
            return
        docs.clear()
        tally.clear()
        yield from self._decide(held, t[4])

    def _decide(self, held: list, verdict):
        for doc, record, settled_hit in held:
            hit = settled_hit
            if hit is None and verdict is not None:
                _, kind, cand_id, cand_added, replay = verdict
                # A replay only counts what was there before it (its first decision's view).
                if not replay or cand_added <= record.sketch.added:
                    hit = (kind, cand_id)
            if hit is None:
                if self.count_kept:
                    Metrics.counter("dedup", "out").inc()
                doc.lineage["dedup"] = encode_record(record)
                yield doc
                continue
            kind, original = hit
            Metrics.counter("dedup", f"drop_{kind}").inc()
            doc.lineage["dup_of"] = original
            yield doc.drop("dedup", kind)


class _SemanticFn(beam.DoFn):
    """Keyed by the coarse shard key: embeddings of the kept documents (at most ``semantic_horizon``).

    A document is first looked up in the pinned *settled* semantic index (what earlier
    micro-batches published; local runner only), then in the state (this batch, or everything
    on Dataflow/Flink). The approximate index over the state is a per-process cache, valid
    only while its count equals the state's (a retried bundle rolls the state back, so the
    cache is rebuilt). With a settled index, the embeddings of the bundle's kept documents are
    written to one side file of the stream root at the end of the bundle (before its output can
    reach the sink's GroupByKey, so before any of their shards publishes); the settlement point
    folds the rows of published documents (:func:`semantic_settled.sync`). Samples carry no
    embedding."""

    KEPT = ReadModifyWriteStateSpec("kept", PickleCoder())

    def __init__(self, config: DedupConfig, settled: SemanticSettledRef | None):
        self.config, self.settled = config, settled
        self._cache: dict[str, tuple[int, object]] = {}

    def setup(self):
        from beam_jobs.dedup.semantic import embedder

        self.embedder = embedder(self.config.semantic_model)
        self.index = self.settled.open() if self.settled is not None else None
        if self.settled is not None:
            from beam_jobs.dedup.semantic import model_identity

            self.model_id = model_identity(self.config.semantic_model)[0]

    def start_bundle(self):
        self._pending: list[tuple[str, str, int, np.ndarray]] = []  # (shard key, id, coords hash, embedding)

    def finish_bundle(self):
        if self.settled is not None and self._pending:
            keys, ids, coordh, vecs = zip(*self._pending)
            write_pending(self.settled.home, model=self.model_id, keys=list(keys), ids=list(ids),
                          coordh=list(coordh), vecs=np.stack(vecs))
        self._pending = []

    def _index(self, key: str, kept: list):
        from beam_jobs.dedup.semantic import SemanticIndex

        cached = self._cache.get(key)
        if cached is None or cached[0] != len(kept):
            index = SemanticIndex(self.embedder.dim, self.config.semantic_index)
            if kept:
                index.add_many(np.stack([e for _, e in kept]), [i for i, _ in kept])
            cached = self._cache[key] = (len(kept), index)
        return cached[1]

    def process(self, element, kept_state=beam.DoFn.StateParam(KEPT)):  # noqa: B008
        key, doc = element
        if doc.dropped is not None:
            yield doc
            return
        kept = kept_state.read() or []
        index = self._index(key, kept)
        emb = self.embedder.embed([doc.text])[0]
        coordh = coords_hash(*doc.coords)
        hit = None
        if self.index is not None:
            hit = self.index.lookup(key, emb, idh=id_hash(doc.id), coordh=coordh,
                                    threshold=self.config.semantic_threshold)
        if hit is None:
            hit = index.search(emb, self.config.semantic_threshold, exclude=doc.id)
        if hit is not None:
            Metrics.counter("dedup", "drop_semantic").inc()
            doc.lineage["dup_of"] = hit
            doc.lineage.pop("dedup", None)
            yield doc.drop("dedup", "semantic")
            return
        grown = [*kept, (doc.id, emb)]
        kept_state.write(grown[-self.config.semantic_horizon :])
        index.add(emb, doc.id)
        # Past the horizon the cached index holds more than the state: rebuild it next time.
        self._cache[key] = (len(grown) if len(grown) <= self.config.semantic_horizon else -1, index)
        if self.settled is not None:
            self._pending.append((key, doc.id, coordh, emb))
        Metrics.counter("dedup", "out").inc()
        yield doc


class Dedup(beam.PTransform):
    """Docs -> Docs with duplicates marked dropped (``lineage['dup_of']`` names the original);
    kept docs carry their dedup record in ``lineage['dedup']`` (published with the shard)."""

    def __init__(self, config: DedupConfig | None = None, *, settled: SettledRef | None = None):
        """``settled``: the pinned settled index of the stream root (local runner); ``None`` on
        runners whose Beam state outlives the job (Dataflow, Flink): the state is the index.
        With ``config.semantic`` and a settled index, the semantic index of the same root is
        brought to its settlement point here too (:func:`semantic_settled.sync`) and pinned."""
        super().__init__()
        self.config = c = config or DedupConfig()
        self.settled = settled
        self.semantic_settled = None if settled is None or not c.semantic else sync_semantic(
            settled.root, horizon=c.semantic_horizon, kind=c.semantic_index, model=c.semantic_model,
            cache_dir=c.cache_dir)

    def expand(self, docs):
        c = self.config
        fp = docs | "Fingerprint" >> beam.ParDo(_FingerprintFn(c, self.settled)).with_outputs(
            "probe", "verify", "passed", main="doc")
        decide = _DecideFn(not c.semantic)
        if docs.is_bounded:  # the same per-key logic over GroupByKey: all of a key's input at once
            buckets = (fp.probe | "GroupBuckets" >> beam.GroupByKey()
                       | "Buckets" >> beam.FlatMap(_bucket_batch, c.bucket_cap).with_outputs("report", main="query"))
            verdicts = ((fp.verify, buckets.query) | "ToVerify" >> beam.Flatten()
                        | "GroupVerify" >> beam.GroupByKey() | "Verify" >> beam.FlatMap(_verify_batch, _VerifyFn(c)))
            decided = ((fp.doc, buckets.report, verdicts) | "ToDecide" >> beam.Flatten()
                       | "GroupDecide" >> beam.GroupByKey() | "Decide" >> beam.FlatMap(decide.batch))
        else:  # streaming: keyed state, probes ordered by event-time timers
            buckets = fp.probe | "Buckets" >> beam.ParDo(_BucketFn(c)).with_input_types(
                tuple[tuple[int, int], Any]).with_outputs("report", main="query")
            verdicts = ((fp.verify, buckets.query) | "ToVerify" >> beam.Flatten()
                        | "Verify" >> beam.ParDo(_VerifyFn(c)).with_input_types(tuple[int, Any]))
            decided = ((fp.doc, buckets.report, verdicts) | "ToDecide" >> beam.Flatten()
                       | "Decide" >> beam.ParDo(decide).with_input_types(tuple[tuple[int, int], Any]))
        if c.semantic:
            decided = (decided | "KeySemantic" >> beam.Map(lambda d, how=c.shard_key: (shard_key(d, how), d))
                       | "Semantic" >> beam.ParDo(_SemanticFn(c, self.semantic_settled)))
        return (decided, fp.passed) | "Merge" >> beam.Flatten()
