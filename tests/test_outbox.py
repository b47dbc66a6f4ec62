"""The ShardPublished outbox on the real tansu broker: a process killed between the index write
and the Kafka send has its event re-emitted by the next ingest start; consumers dedupe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from beam_jobs.ingest import run
from beam_jobs.outbox import Outbox, drain_all
from beam_jobs.workers import WriterLock
from streams.events import OffsetRange, ShardPublished, decode_event
from streams.kafka import KafkaSettings, make_consumer, make_producer, poll_records, publish
from streams.mds import LiveStreamWriter
from streams.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "tests" / "helpers"))
from kafka_topics import create_topic

# Writes two shards; the send of the second kills the process (SIGKILL) after its index write.
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from beam_jobs.outbox import Outbox
    from streams.events import OffsetRange
    from streams.kafka import KafkaSettings, make_producer, publish
    from streams.mds import LiveStreamWriter
    from streams.vocab import Vocab

    root, bootstrap = sys.argv[1], sys.argv[2]
    producer = make_producer(KafkaSettings(bootstrap=bootstrap))
    sent = []

    def send(event):
        if sent:
            os.kill(os.getpid(), signal.SIGKILL)  # dies between the index write and the publish
        publish(producer, "shards", event, key=event.domain)
        sent.append(event.shard)

    writer = LiveStreamWriter(root, writer_id="w", manifest={"vocab_version": Vocab.default().version},
                              publisher=Outbox(root, "w", send).publish)
    for i in range(2):
        row = {"id": f"s{i}", "modality": "text", "tokens": np.arange(5, dtype=np.int32), "source": "web",
               "license": "cc-by-4.0"}
        writer.write_shard([row], domain="web_en",
                           settled=[OffsetRange(topic="t", partition=0, start=i, end=i + 1)])
""")


def _never(event: ShardPublished) -> None:
    raise AssertionError("pending() sends nothing")


def shard_events(bootstrap: str, root: str) -> list[ShardPublished]:
    """Every ShardPublished of ``root`` on the shards topic, in order."""
    from kafka import TopicPartition

    consumer = make_consumer(KafkaSettings(bootstrap=bootstrap), assign=[TopicPartition("shards", 0)])
    try:
        consumer.seek_to_beginning()
        end = consumer.end_offsets([TopicPartition("shards", 0)])[TopicPartition("shards", 0)]
        out = []
        for rec in poll_records(consumer, timeout_s=15, until=lambda seen: bool(seen) and seen[-1].offset >= end - 1):
            event = decode_event(rec.value)
            if isinstance(event, ShardPublished) and event.stream_root == root:
                out.append(event)
        return out
    finally:
        consumer.close()


def test_kill_between_index_write_and_publish_is_re_emitted_on_restart(broker, tmp_path):
    root = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, root, broker.bootstrap], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    from streams.manifest import read_index, shard_name_of

    published = [shard_name_of(i) for i in read_index(root)["shards"]]
    assert len(published) == 2  # both shards are in the index...
    assert [e.shard for e in shard_events(broker.bootstrap, root)] == published[:1]  # ...one event reached Kafka
    pending = Outbox(root, "w", _never).pending()
    assert [e.shard for e in pending] == published[1:]

    # The restart of writer w (a streaming ingest run) re-emits it before reading anything.
    topic = create_topic(broker.bootstrap, "test.outbox", partitions=1)
    run(["--bootstrap", broker.bootstrap, "--topics", topic, "--stream-root", root, "--writer-id", "w",
         "--until-caught-up", "--no-control", "--window-s", "1", "--group", f"g-{topic}"])
    events = shard_events(broker.bootstrap, root)
    assert [e.shard for e in events] == published  # each exactly once here: at least once in general
    assert events[1] == pending[0]  # the original event: same ranges, same published_at
    assert not Outbox(root, "w", _never).pending()


def test_a_refused_send_stays_pending_and_drains_for_dead_writers_only(broker, tmp_path):
    """A send that fails leaves the event pending (ingest does not stop); drain_all re-sends the
    events of its own writer id and of ids no live process holds, never a live writer's."""
    root = str(tmp_path / "s")
    manifest = {"vocab_version": Vocab.default().version}

    def refuse(event):
        raise ConnectionError("broker refused")

    names = {}
    for writer_id in ("dead", "busy"):
        writer = LiveStreamWriter(root, writer_id=writer_id, manifest=manifest,
                                  publisher=Outbox(root, writer_id, refuse).publish)
        row = {"id": writer_id, "modality": "text", "tokens": np.arange(3, dtype=np.int32), "source": "web",
               "license": "cc"}
        names[writer_id] = writer.write_shard([row], domain="web_en", settled=[
            OffsetRange(topic="t", partition=0 if writer_id == "dead" else 1, start=0, end=1)]).shard
    producer = make_producer(KafkaSettings(bootstrap=broker.bootstrap))
    sent: list[str] = []

    def send(event):
        publish(producer, "shards", event, key=event.domain)
        sent.append(event.shard)

    busy = WriterLock(root, "busy").acquire()
    try:
        assert drain_all(root, send, own="me") == 1
    finally:
        busy.release()
    assert sent == [names["dead"]]
    assert [e.shard for e in shard_events(broker.bootstrap, root)] == [names["dead"]]
    assert [e.shard for e in Outbox(root, "busy", send).pending()] == [names["busy"]]
    assert drain_all(root, send, own="busy") == 1 and not Outbox(root, "busy", send).pending()
    producer.close()


def test_outbox_log_starts_with_the_writers_earlier_shards(tmp_path):
    """A root written before the outbox existed: its shards' events count as delivered."""
    root = str(tmp_path / "s")
    writer = LiveStreamWriter(root, writer_id="old", manifest={"vocab_version": Vocab.default().version})
    row = {"id": "a", "modality": "text", "tokens": np.arange(3, dtype=np.int32), "source": "web", "license": "cc"}
    writer.write_shard([row], domain="web_en", settled=[OffsetRange(topic="t", partition=0, start=0, end=1)])
    assert Outbox(root, "old", lambda e: None).pending() == []
    writer.publisher = Outbox(root, "old", lambda e: 1 / 0).publish  # a send that fails
    row = {**row, "id": "b"}
    event = writer.write_shard([row], domain="web_en", settled=[OffsetRange(topic="t", partition=0, start=1, end=2)])
    assert Outbox(root, "old", lambda e: None).pending() == [event]


def test_the_shards_topic_consumer_dedupes_by_shard_name():
    """The rollback policy (the sentinel's view of the shards topic) is unchanged by a re-sent event."""
    from evaluators.rollback import RollbackPolicy

    first = ShardPublished(stream_root="/r", shard="web_en.w.1", domain="web_en", samples=1, bytes=10,
                           vocab_version="v", writer_id="w", published_at=100.0)
    later = ShardPublished(stream_root="/r", shard="web_en.w.2", domain="web_en", samples=1, bytes=10,
                           vocab_version="v", writer_id="w", published_at=200.0)
    policy = RollbackPolicy()
    for event in (first, later, first, later):  # at-least-once delivery: re-sent after a crash
        policy.observe(event)
    assert policy.first_shard_at == {"web_en": 100.0}
