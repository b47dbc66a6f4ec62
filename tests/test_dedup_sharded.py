"""The sharded dedup chain: retried bundles, deterministic resolution, settled snapshots, bounded state.

Streaming cases run under TestStream on the DirectRunner in streaming mode (the bundle-based
runner, which retries a failed bundle with its state rolled back); batch cases on FnApiRunner.
"""

from __future__ import annotations

import random

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.settled import SettledIndex, sync
from beam_jobs.dedup.transform import Dedup
from beam_jobs.records import Doc, KafkaCoords
from beam_jobs.sink import SinkConfig, WriteShards
from beam_jobs.synthetic import edit_words, english_doc
from beam_jobs.tokenize import TokenizeText

RNG = random.Random(11)
TEXTS = [english_doc(RNG) for _ in range(8)]
_FAILED: list[str] = []


class FlakyLineage(dict):
    """Lineage whose first write fails once per process: the bundle holding it is retried."""

    def __setitem__(self, key, value):
        if not _FAILED:
            _FAILED.append(key)
            raise RuntimeError("injected transient failure")
        super().__setitem__(key, value)


def _doc(i: int, text: str, *, doc_id: str | None = None, offset: int | None = None, **kw) -> Doc:
    return Doc(coords=KafkaCoords("raw.text", 0, i if offset is None else offset), id=doc_id or f"doc-{i}",
               source="web", license="cc", text=text, language="en", **kw)


def _streaming() -> TestPipeline:
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    return TestPipeline(options=options)


def _rows(docs):
    return docs | beam.Map(lambda d: (d.id, d.dropped, d.lineage.get("dup_of")))


def test_retried_bundle_never_marks_a_record_duplicate_of_itself():
    # doc-8 repeats doc-3 and its lineage write fails once: its bundle is retried after doc-7
    # (and everything else) was already indexed in that attempt.
    docs = [_doc(i, TEXTS[i]) for i in range(8)] + [_doc(8, TEXTS[3], lineage=FlakyLineage())]
    expected = [(f"doc-{i}", None, None) for i in range(8)] + [("doc-8", "dedup:exact", "doc-3")]
    _FAILED.clear()
    stream = (TestStream().add_elements([TimestampedValue(d, 10) for d in docs]).advance_watermark_to(20)
              .advance_watermark_to_infinity())
    with _streaming() as p:
        out = _rows(p | stream | Dedup(DedupConfig()))

        def check(rows):
            assert not [r for r in rows if r[2] == r[0]], rows  # never a duplicate of itself
            equal_to(expected)(rows)

        assert_that(out, check)
    assert _FAILED, "the injected failure did not happen: nothing was retried"


def test_same_moment_near_dups_on_any_worker_keep_exactly_one():
    base = TEXTS[0]
    twin = edit_words(random.Random(1), base, 0.01)
    for order in ((0, 1), (1, 0)):
        pair = [_doc(0, base), _doc(1, twin)]
        stream = (TestStream().add_elements([TimestampedValue(pair[i], 10) for i in order])
                  .advance_watermark_to(20).advance_watermark_to_infinity())
        with _streaming() as p:
            out = _rows(p | stream | Dedup(DedupConfig()))
            # Same event time: the smaller offset wins, whatever the arrival order.
            assert_that(out, equal_to([("doc-0", None, None), ("doc-1", "dedup:near", "doc-0")]))


def test_event_time_decides_not_arrival_and_late_data_is_the_one_dropped():
    a, b, c = _doc(0, TEXTS[1]), _doc(1, edit_words(random.Random(2), TEXTS[1], 0.01)), _doc(2, TEXTS[1] + " Yes.")
    stream = (TestStream()
              .add_elements([TimestampedValue(b, 15)])  # the later event arrives first...
              .add_elements([TimestampedValue(a, 12)])  # ...the earlier one before the watermark passes it
              .advance_watermark_to(30)
              .add_elements([TimestampedValue(c, 5)])  # late: behind the watermark
              .advance_watermark_to_infinity())
    with _streaming() as p:
        out = _rows(p | stream | Dedup(DedupConfig()))
        assert_that(out, equal_to([("doc-0", None, None), ("doc-1", "dedup:near", "doc-0"),
                                   ("doc-2", "dedup:near", "doc-0")]))


def _publish(root: str, docs: list[Doc], settled) -> None:
    config = SinkConfig(stream_root=root)
    with TestPipeline(runner="FnApiRunner") as p:
        _ = (p | beam.Create(docs) | Dedup(DedupConfig(), settled=settled) | TokenizeText()
             | WriteShards(config, {"vocab_version": "t"}, streaming=False))


def test_settled_snapshot_restart_and_replay(tmp_path):
    root = str(tmp_path / "root")
    first = [_doc(i, TEXTS[i]) for i in range(4)]
    _publish(root, first, sync(root))
    ref = sync(root)  # a settlement point: the published shards fold into a snapshot segment
    index = SettledIndex.load(root)
    assert (index.generation, len(index)) == (ref.generation, 4)
    assert index.nbytes() / len(index) <= 300

    # The next batch: a near-dup of a published doc, a replay of a published record (same id and
    # offset), the same id at another offset, and a new doc.
    later = [_doc(10, edit_words(random.Random(3), TEXTS[2], 0.01)), _doc(1, TEXTS[1]),
             _doc(11, TEXTS[0], doc_id="doc-0"), _doc(12, TEXTS[5])]
    with TestPipeline(runner="FnApiRunner") as p:
        out = _rows(p | beam.Create(later) | Dedup(DedupConfig(), settled=ref))
        assert_that(out, equal_to([("doc-10", "dedup:near", "doc-2"), ("doc-1", None, None),
                                   ("doc-0", None, None), ("doc-12", None, None)]))

    # A restart after publishing without a snapshot: the snapshot plus the tail agree with the stream.
    _publish(root, [_doc(20, TEXTS[6])], ref)
    assert len(SettledIndex.load(root)) == 4
    ref2 = sync(root)
    assert ref2.generation == ref.generation + 1 and len(SettledIndex.load(root)) == 5


def test_horizon_by_count_forgets_oldest_segments(tmp_path):
    root = str(tmp_path / "root")
    ref = sync(root)
    for batch in range(3):
        _publish(root, [_doc(batch * 10 + i, TEXTS[batch * 2 + i]) for i in range(2)], ref)
        ref = sync(root, horizon_docs=4)
    index = SettledIndex.load(root)
    assert len(index) == 4 and len(index.segments) == 2


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_semantic_index_recall_against_flat(kind):
    import numpy as np

    from beam_jobs.dedup.semantic import SemanticIndex

    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    flat, approx = SemanticIndex(32, "flat"), SemanticIndex(32, kind, nlist=32, nprobe=8, train_size=2000, gpu=False)
    flat.add_many(data, [str(i) for i in range(len(data))])
    approx.add_many(data, [str(i) for i in range(len(data))])
    queries = data[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    _, exact = flat.search_many(queries)
    _, found = approx.search_many(queries)
    assert (exact[:, 0] == found[:, 0]).mean() >= 0.95


def test_a_document_whose_fingerprint_fails_is_dead_lettered_alone():
    # A text the hasher cannot take (not a str): that one document fails, its neighbours are decided.
    docs = [_doc(0, TEXTS[0]), _doc(1, b"\xff not text"), _doc(2, TEXTS[0])]  # type: ignore[arg-type]
    with TestPipeline() as p:
        out = p | beam.Create(docs) | Dedup(DedupConfig())
        rows = out | beam.Map(lambda d: (d.id, d.dropped, d.dead.reason if d.dead else None))
        assert_that(rows, equal_to([("doc-0", None, None), ("doc-1", "dedup:fingerprint_error", "fingerprint_error"),
                                    ("doc-2", "dedup:exact", None)]))
