"""Independent Kafka clients against the embedded broker (no mocks): aiokafka, confluent-kafka, kafka-python."""

import asyncio
import uuid

from confluent_kafka import Consumer as CKConsumer
from confluent_kafka import Producer as CKProducer
from confluent_kafka import TopicPartition as CKTopicPartition
from confluent_kafka.admin import AdminClient

from streams.events import Alert, MetricsEvent, RawRecord, decode_event
from streams.kafka import make_consumer, make_producer, poll_records, publish
from streams.topics import TOPICS


def test_confluent_admin_lists_every_registered_topic(broker):
    md = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10)
    assert set(TOPICS) <= set(md.topics)
    assert len(md.topics["raw.text"].partitions) == TOPICS["raw.text"].partitions


def test_confluent_produce_then_assign_consume(broker):
    tag = uuid.uuid4().hex
    p = CKProducer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True, "acks": "all"})
    for i in range(20):  # valid events: other tests on this session's broker read the topic
        event = MetricsEvent(component="client-test", values={"i": i}, labels={"tag": tag})
        p.produce("metrics.ingest", key=tag, value=event.to_bytes(), partition=0)
    assert p.flush(10) == 0
    c = CKConsumer({"bootstrap.servers": broker.bootstrap, "group.id": f"g-{tag}", "enable.auto.commit": False})
    c.assign([CKTopicPartition("metrics.ingest", 0, 0)])
    got = []
    for _ in range(100):
        m = c.poll(0.2)
        if m is not None and not m.error():
            event = decode_event(m.value())
            if event.labels.get("tag") == tag:
                got.append(f"{tag}:{int(event.values['i'])}")
        if len(got) == 20:
            break
    c.close()
    assert got == [f"{tag}:{i}" for i in range(20)]


def test_our_producer_to_aiokafka_consumer_group_with_resume(broker):
    """kafka-python idempotent producer -> aiokafka group consumer; a restart resumes from the commit."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    topic, group = "dlq", f"g-{uuid.uuid4().hex}"
    prod = make_producer(broker.settings)
    recs = [RawRecord(id=f"{group}-{i}", modality="text", source="t", license="l", text=f"doc {i}") for i in range(10)]
    for r in recs:
        publish(prod, topic, r, flush=False)
    prod.flush()
    prod.close()

    async def consume(n: int) -> list[str]:
        c = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=group,
                             enable_auto_commit=False, auto_offset_reset="earliest")
        await c.start()
        ids: list[str] = []
        try:
            while len(ids) < n:
                batch = await asyncio.wait_for(c.getmany(timeout_ms=500), 20)
                for msgs in batch.values():
                    for m in msgs:
                        event = decode_event(m.value)  # other tests dead-letter on this topic too
                        rid = getattr(event, "id", "")
                        if isinstance(event, RawRecord) and rid.startswith(group) and len(ids) < n:
                            ids.append(rid)
                            await c.commit({TopicPartition(m.topic, m.partition): m.offset + 1})
        finally:
            await c.stop()
        return ids

    first = asyncio.run(consume(4))
    rest = asyncio.run(consume(6))
    assert first + rest == [r.id for r in recs]


def test_aiokafka_producer_to_our_group_consumer(broker):
    from aiokafka import AIOKafkaProducer

    tag = uuid.uuid4().hex

    async def produce():
        p = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        await p.start()
        try:
            for i in range(5):  # valid events: other tests on this session's broker read the topic
                alert = Alert(rule="client-test", severity="info", message=f"{tag}:{i}", source="aiokafka")
                await p.send_and_wait("alerts", alert.to_bytes())
        finally:
            await p.stop()

    asyncio.run(produce())
    c = make_consumer(broker.settings, topics=["alerts"], group_id=f"g-{tag}")
    values = [decode_event(r.value).message for r in poll_records(
        c, timeout_s=20, until=lambda s: sum(tag in r.value.decode() for r in s) >= 5)]
    c.close()
    assert [v for v in values if v.startswith(tag)] == [f"{tag}:{i}" for i in range(5)]
