"""The deployed streaming graph under test: ``IngestText(streaming=True)``, everything after the
source, fed by TestStream on the DirectRunner in streaming mode (the bundle-based runner: it runs
stateful DoFns, event-time timers, processing-time triggers and TestStream's watermark and
clock). What a real runner delivers and the local micro-batch loop never does is covered here:
empty panes, late data, duplicate delivery of records already settled (a retried source bundle)
and a replay with other pane boundaries after a partial settle (a Flink restore). Everything is
checked on the real stream root: MDS shards read back by a stock ``StreamingDataset``, the
settled ranges, and the dead letters with their reasons.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from conftest import stock_ids

from beam_jobs.pipeline import IngestConfig, IngestText
from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.settlement import ResumePlan
from beam_jobs.sink import (
    SETTLE_DOMAIN,
    SealShardsFn,
    SinkConfig,
    WriteShards,
    partition_writer_id,
    unsettled,
)
from beam_jobs.synthetic import english_doc, raw_record
from streams import storage
from streams.events import DeadLetter, OffsetRange, TokenizedSample
from streams.mds import (
    LiveStreamWriter,
    OverlapError,
    TailReader,
    sample_from_event,
    settled_ranges,
)

TOPIC = "raw.text"
RNG = random.Random(12)
TEXTS = [english_doc(RNG) for _ in range(12)]
MISSING_LICENSE = json.dumps({"id": "no-license", "modality": "text", "source": "web", "text": TEXTS[0]}).encode()


def _corpus() -> dict[int, bytes]:
    """Offsets 0..11 of one partition: nine valid documents, an exact duplicate of offset 0 (a
    dedup drop), two dead letters (malformed JSON, a missing license)."""
    out = {i: raw_record(f"d{i}", TEXTS[i]) for i in range(12)}
    out[3] = b'{"id": "broken", "text": '
    out[7] = MISSING_LICENSE
    out[10] = raw_record("d10", TEXTS[0])  # the same text as d0, later: dropped as dedup:exact
    return out


CORPUS = _corpus()
VALID = sorted(f"d{i}" for i in range(12) if i not in (3, 7, 10))
DEAD = {3: "malformed_json", 7: "missing_field"}


def _records(offsets, at: float) -> list[TimestampedValue]:
    return [TimestampedValue((KafkaCoords(TOPIC, 0, i), CORPUS[i]), at) for i in offsets]


def _options() -> PipelineOptions:
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    return options


def _config(tmp_path) -> IngestConfig:
    """Panes of at most 3 outcomes or 1 s: the count fires first, its timer then finds nothing."""
    sink = SinkConfig(stream_root=str(tmp_path / "root"), dlq_dir=str(tmp_path / "dlq"),
                      drops_dir=str(tmp_path / "drops"), window_s=1, max_pane=3)
    return IngestConfig(sink=sink, media=False)


def _run(config: IngestConfig, stream: TestStream, caplog) -> dict[str, int]:
    """Run the graph; what the sink saw, from its debug log (this runner keeps only the first
    bundle's Beam counters): empty panes, duplicate and already-settled outcomes left out."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="beam_jobs.sink"):
        p = beam.Pipeline(options=_options())
        _ = p | stream | IngestText(config, streaming=True)
        p.run().wait_until_finish()
    seen = {"empty": 0, "duplicates": 0, "settled": 0}
    for record in caplog.records:
        message = record.getMessage()
        seen["empty"] += message.endswith(": empty pane")
        if m := re.search(r"left out (\d+) duplicate and (\d+) settled", message):
            seen["duplicates"] += int(m[1])
            seen["settled"] += int(m[2])
    return seen


def _dead_letters(tmp_path) -> list[tuple[int, str]]:
    return sorted((d.offset, d.reason) for f in (tmp_path / "dlq").iterdir()
                  for d in map(DeadLetter.from_json, f.read_text().splitlines()))


def _drops(tmp_path) -> list[tuple[int, str]]:
    return sorted((json.loads(line)["coords"][2], json.loads(line)["reason"]) for f in (tmp_path / "drops").iterdir()
                  for line in f.read_text().splitlines())


def _spans(root: str) -> list[tuple[str, int, int, int]]:
    return [(r.topic, r.partition, r.start, r.end) for r in settled_ranges(root)]


def test_empty_late_and_duplicate_panes_settle_every_record_once(tmp_path, caplog):
    config = _config(tmp_path)
    stream = (TestStream()
              .advance_watermark_to(0)
              .add_elements(_records(range(5), at=10))
              .advance_watermark_to(20)  # dedup releases what the watermark passed...
              .advance_processing_time(2)  # ...a pane fires (by count), then its timer: an empty pane
              .advance_processing_time(2)
              .advance_processing_time(2)
              .add_elements(_records(range(5, 10), at=21))
              .add_elements(_records([1, 2], at=12))  # re-delivered (a retried source bundle), late
              .add_elements(_records([11], at=5))  # a new record, behind the watermark: late data
              .add_elements(_records([8], at=21))  # delivered twice in one pane
              .advance_watermark_to(40)
              .advance_processing_time(2)
              .advance_processing_time(2)
              .add_elements(_records([10], at=41))
              .advance_watermark_to(100)
              .advance_processing_time(2)
              .advance_watermark_to_infinity())
    seen = _run(config, stream, caplog)

    root = config.sink.stream_root
    assert stock_ids(root) == VALID  # every valid record exactly once
    assert _spans(root) == [(TOPIC, 0, 0, 12)]  # every offset settled
    assert _dead_letters(tmp_path) == sorted(DEAD.items())
    assert _drops(tmp_path) == [(10, "dedup:exact")]
    assert seen["empty"] >= 1
    # The three extra copies (offsets 1, 2 once more, 8 twice in a pane) were left out.
    assert seen["settled"] + seen["duplicates"] == 3


def test_replay_with_other_pane_boundaries_after_partial_settle_writes_only_the_rest(tmp_path, caplog):
    config = _config(tmp_path)
    # The first job settled some panes (not a contiguous prefix: panes of two keys interleave,
    # and a group dies between its domain shard and its settled-only entry) and then died.
    first = [0, 1, 2, 3, 5, 8]
    _run(config, TestStream().advance_watermark_to(0).add_elements(_records(first, at=10))
         .advance_watermark_to(100).advance_processing_time(2).advance_watermark_to_infinity(), caplog)
    root = config.sink.stream_root
    assert ResumePlan.of_stream(root).count() == len(first)
    assert stock_ids(root) == ["d0", "d1", "d2", "d5", "d8"]

    # The restored job replays everything from offset 0, cut into other panes, one record twice.
    replay = (TestStream().advance_watermark_to(0)
              .add_elements(_records(range(4), at=10))
              .advance_processing_time(2)
              .add_elements(_records(range(4, 12), at=11) + _records([9], at=11))
              .advance_watermark_to(100)
              .advance_processing_time(2)
              .advance_watermark_to_infinity())
    seen = _run(config, replay, caplog)

    assert stock_ids(root) == VALID
    assert _spans(root) == [(TOPIC, 0, 0, 12)]
    assert _dead_letters(tmp_path) == sorted(DEAD.items())  # offset 3's was not written again
    assert _drops(tmp_path) == [(10, "dedup:exact")]
    assert (seen["settled"], seen["duplicates"]) == (len(first), 1)


# --- the sink on its own ---------------------------------------------------------------------

def _sample(i: int, domain: str = "a") -> TokenizedSample:
    return TokenizedSample(id=f"s{i}", domain=domain, modality="text", tokens=[1, 2, i], source="web",
                           license="cc", pipeline_version="t")


def _kept(i: int, domain: str = "a") -> Outcome:
    return Outcome(KafkaCoords("t", 0, i), sample=_sample(i, domain))


def _dropped(i: int) -> Outcome:
    return Outcome(KafkaCoords("t", 0, i), dropped="dedup:exact", record_id=f"x{i}", dup_of="s0")


def _event_row(e):
    return e.domain, e.samples, tuple((r.start, r.end) for r in e.settled)


def _dead(i: int) -> Outcome:
    return Outcome(KafkaCoords("t", 0, i), record_id=f"x{i}", dead=DeadLetter.of(
        b"{", reason="malformed_json", stage="parse", topic="t", partition=0, offset=i))


MANIFEST = {"vocab_version": "t"}


def test_unsettled_drops_settled_offsets_and_duplicates():
    plan = ResumePlan.from_ranges([OffsetRange(topic="t", partition=0, start=2, end=4)])
    outcomes = [_kept(5), _kept(2), _dropped(1), _kept(5), _kept(3), Outcome(KafkaCoords("t", 1, 2), dropped="x")]
    todo, duplicates, replayed, conflicts = unsettled(outcomes, plan)
    assert [o.coords for o in todo] == [KafkaCoords("t", 0, 1), KafkaCoords("t", 0, 5), KafkaCoords("t", 1, 2)]
    assert (duplicates, replayed, conflicts) == (1, 2, 0)
    assert unsettled([], plan) == ([], 0, 0, 0)


def test_conflicting_copies_of_an_offset_resolve_to_the_sample_whatever_their_order():
    """Finding 6: a GroupByKey yields a key's values in any order; copies that disagree (a sample,
    a dead letter, a drop) must resolve the same way every time, and never lose the sample."""
    plan = ResumePlan()
    copies = [_dropped(5), _kept(5), _dead(5)]
    for order in itertools.permutations(copies):
        (kept,), duplicates, _, conflicts = unsettled(order, plan)
        assert kept.sample is not None and (duplicates, conflicts) == (2, 2)
    for order in itertools.permutations([_dropped(6), _dead(6)]):
        assert unsettled(order, plan).todo[0].dead is not None
    for order in itertools.permutations([_kept(7, "a"), _kept(7, "b")]):  # two samples: one, always
        assert unsettled(order, plan).todo[0].sample.domain == "a"


def test_write_shards_streaming_tolerates_empty_late_and_duplicate_panes(tmp_path):
    # block=2 is ignored in streaming: a pane is one group per partition (finding 9), so offsets
    # 3 and 5 (blocks 1 and 2) go into one shard.
    config = SinkConfig(stream_root=str(tmp_path / "root"), window_s=1, max_pane=1_000, block=2)
    stream = (TestStream().advance_watermark_to(0)
              .add_elements([TimestampedValue(o, 10) for o in (_kept(0), _kept(1, "b"), _dropped(2), _kept(0))])
              .advance_processing_time(2)
              .advance_processing_time(2)  # an empty pane
              .advance_watermark_to(50)
              .add_elements([TimestampedValue(o, 5) for o in (_kept(1, "b"), _kept(3), _dropped(4), _kept(5))])  # late
              .advance_processing_time(2)
              .advance_watermark_to_infinity())
    with TestPipeline(options=_options()) as p:
        events = p | stream | WriteShards(config, MANIFEST, streaming=True)
        assert_that(events | beam.Map(_event_row), equal_to([
            ("a", 1, ((0, 1),)), ("b", 1, ((1, 2),)), ("settled", 0, ((2, 3),)),
            ("a", 2, ((3, 4), (5, 6))), ("settled", 0, ((4, 5),))]))
    assert _spans(config.stream_root) == [("t", 0, 0, 6)]
    assert stock_ids(config.stream_root) == ["s0", "s1", "s3", "s5"]


def test_write_shards_replay_with_other_group_boundaries_is_a_no_op_for_settled_offsets(tmp_path):
    root = str(tmp_path / "root")
    outcomes = [_kept(i, "ab"[i % 2]) if i % 3 else _dropped(i) for i in range(10)]
    # The first run settled groups of 4 offsets, but only some of them; the replay groups by 3.
    with TestPipeline(runner="FnApiRunner") as p:
        _ = (p | beam.Create([outcomes[i] for i in (0, 1, 2, 4, 5, 9)])
             | WriteShards(SinkConfig(stream_root=root, block=4), {"vocab_version": "t"}, streaming=False))
    with TestPipeline(runner="FnApiRunner") as p:
        events = (p | beam.Create(outcomes + outcomes[:2])
                  | WriteShards(SinkConfig(stream_root=root, block=3), {"vocab_version": "t"}, streaming=False))
        assert_that(events | beam.Map(lambda e: sorted(o for r in e.settled for o in range(r.start, r.end))),
                    lambda rows: equal_to([3, 6, 7, 8])(sorted(o for row in rows for o in row)))
    assert _spans(root) == [("t", 0, 0, 10)]
    assert stock_ids(root) == sorted(f"s{i}" for i in range(10) if i % 3)


# --- the sink DoFn as a runner drives it: retries, a stale cache, a zombie process ----------

def _seal(fn: SealShardsFn, outcomes: list[Outcome]) -> list[tuple]:
    """One attempt at one streaming pane of t[0] (a failed attempt raises, as a failed bundle)."""
    return [_event_row(e) for e in fn.process((("t", 0), outcomes))]


def _rows(*offsets: int) -> list[dict]:
    return [sample_from_event(_sample(i)) for i in offsets]


def _t0(start: int, end: int) -> OffsetRange:
    return OffsetRange(topic="t", partition=0, start=start, end=end)


def test_a_retry_after_a_crash_before_the_settle_only_entry_rewrites_the_same_files(tmp_path, monkeypatch):
    """Finding 3: the pane dies after its domain shard, before its settle-only entry; the retry of
    the same pane settles the rest and overwrites its dead-letter and drop files (no second copy)."""
    config = SinkConfig(stream_root=str(tmp_path / "root"), dlq_dir=str(tmp_path / "dlq"),
                        drops_dir=str(tmp_path / "drops"))
    fn = SealShardsFn(config, MANIFEST, streaming=True)
    pane = [_kept(0), _dead(1), _kept(2), _dropped(3), _dead(4), _kept(5)]
    write_shard = LiveStreamWriter.write_shard

    def killed_before_settle_only(self, samples, *, domain, **kw):
        if domain == SETTLE_DOMAIN:
            raise OSError("worker lost")
        return write_shard(self, samples, domain=domain, **kw)

    monkeypatch.setattr(LiveStreamWriter, "write_shard", killed_before_settle_only)
    with pytest.raises(OSError, match="worker lost"):
        _seal(fn, pane)
    monkeypatch.undo()
    assert _spans(config.stream_root) == [("t", 0, 0, 1), ("t", 0, 2, 3), ("t", 0, 5, 6)]

    assert _seal(fn, pane) == [("settled", 0, ((1, 2), (3, 5)))]  # the runner's retry
    assert _spans(config.stream_root) == [("t", 0, 0, 6)]
    assert stock_ids(config.stream_root) == ["s0", "s2", "s5"]
    assert sorted(os.listdir(tmp_path / "dlq")) == sorted(os.listdir(tmp_path / "drops")) == ["t-0-0-5.jsonl"]
    assert _dead_letters(tmp_path) == [(1, "malformed_json"), (4, "malformed_json")]


def test_streaming_sink_reads_the_root_once_per_partition_and_again_after_an_overlap(tmp_path, monkeypatch):
    """Finding 2: panes are checked against the process's cached settled ranges, not a read of the
    root's whole history each. A stale cache (another writer settled offsets behind this process's
    back) makes the commit raise OverlapError; the retry reads the root again and writes the rest."""
    root = str(tmp_path / "root")
    reads, settled = [], LiveStreamWriter.settled
    monkeypatch.setattr(LiveStreamWriter, "settled", lambda self, **kw: reads.append(1) or settled(self, **kw))
    fn = SealShardsFn(SinkConfig(stream_root=root), MANIFEST, streaming=True)
    assert _seal(fn, [_kept(0), _kept(1)]) == [("a", 2, ((0, 2),))]
    assert _seal(fn, [_kept(1), _kept(2)]) == [("a", 1, ((2, 3),))]  # 1 is settled: known from the cache
    assert _seal(fn, [_kept(0)]) == []
    assert len(reads) == 1

    with LiveStreamWriter(root, writer_id="other", manifest=MANIFEST) as other:
        other.write_shard(_rows(3, 4), domain="a", settled=[_t0(3, 5)])
    with pytest.raises(OverlapError):
        _seal(fn, [_kept(3), _kept(4), _kept(5)])
    assert _seal(fn, [_kept(3), _kept(4), _kept(5)]) == [("a", 1, ((5, 6),))]
    assert len(reads) == 2
    assert stock_ids(root) == [f"s{i}" for i in range(6)]
    assert _spans(root) == [("t", 0, 0, 6)]


def test_a_zombie_process_is_fenced_and_the_retry_writes_every_sample_once(s3_root):
    """Finding 1: streaming commits t[0] under one writer id. When another process takes the
    partition over, its claim fences this one: the zombie's pane fails without writing, and the
    runner's retry re-claims the id and writes only what is still unsettled."""
    fn = SealShardsFn(SinkConfig(stream_root=s3_root), MANIFEST, streaming=True)
    assert _seal(fn, [_kept(0), _kept(1)]) == [("a", 2, ((0, 2),))]
    wid = partition_writer_id(SinkConfig(stream_root=s3_root).writer_id, "t", 0)
    with LiveStreamWriter(s3_root, writer_id=wid, manifest=MANIFEST) as new_owner:
        new_owner.write_shard(_rows(2, 3), domain="a", settled=[_t0(2, 4)])

    with pytest.raises(storage.WriterFenced):  # the zombie runs the same pane, one offset more
        _seal(fn, [_kept(2), _kept(3), _kept(4)])
    assert settled_ranges(s3_root) == [_t0(0, 4)]  # it wrote nothing
    assert _seal(fn, [_kept(2), _kept(3), _kept(4)]) == [("a", 1, ((4, 5),))]  # the retry
    assert settled_ranges(s3_root) == [_t0(0, 5)]
    assert sorted(s["id"] for s in TailReader(s3_root).samples(timeout_s=0)) == [f"s{i}" for i in range(5)]
