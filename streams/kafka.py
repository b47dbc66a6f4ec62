"""Kafka client settings and helpers: idempotent acks=all producers, poll-loop consumers.

Settings come from a TOML file and/or ``HEADWATER_KAFKA_*`` environment variables
(env wins), so deployments mount SASL/TLS material as files and nothing secret
lives in the repository.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.events import Event, EventError
from streams.topics import TOPICS

__all__ = [
    "KafkaSettings",
    "create_topics",
    "end_offsets",
    "make_admin",
    "make_consumer",
    "make_producer",
    "poll_records",
    "publish",
]

_SECURITY = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(kw_only=True, slots=True)
class KafkaSettings:
    """Connection settings shared by every client headwater creates."""

    bootstrap: str = "127.0.0.1:19092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_file: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "headwater"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.security_protocol not in _SECURITY:
            raise ValueError(f"security_protocol must be one of {_SECURITY}, got {self.security_protocol!r}")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in _SASL:
                raise ValueError(f"sasl_mechanism must be one of {_SASL} with {self.security_protocol}")
            if not self.sasl_username or not self.sasl_password_file:
                raise ValueError("SASL needs sasl_username and sasl_password_file (a mounted secret file)")
        for name in ("sasl_password_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{name}: file not found: {path}")

    @classmethod
    def load(cls, toml_path: str | os.PathLike | None = None, **overrides) -> KafkaSettings:
        """Settings from a TOML file's ``[kafka]`` table, then HEADWATER_KAFKA_* env, then overrides."""
        values: dict = {}
        if toml_path:
            with open(toml_path, "rb") as f:
                values.update(tomllib.load(f).get("kafka", {}))
        for f in fields(cls):
            env = os.environ.get(f"HEADWATER_KAFKA_{f.name.upper()}")
            if env is not None and f.name != "extra":
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown kafka settings: {sorted(unknown)}")
        return cls(**values)

    def client_kwargs(self) -> dict:
        """Keyword arguments common to kafka-python clients."""
        kw: dict = {
            "bootstrap_servers": self.bootstrap.split(","),
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = Path(self.sasl_password_file).read_text().strip()  # type: ignore[arg-type]
        if self.security_protocol.endswith("SSL"):
            kw.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        kw.update(self.extra)
        return kw

    def java_client_config(self) -> dict[str, str]:
        """The same connection as Java Kafka client properties (Beam's cross-language KafkaIO).

        Built where the secret files are mounted (the job launcher) and shipped inside the
        pipeline: the password becomes ``sasl.jaas.config`` and certificates are inlined as PEM,
        since Dataflow/Flink workers do not have the launcher's files. Never log the result."""
        props = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol,
                 "client.id": self.client_id}
        if self.security_protocol.startswith("SASL"):
            module = ("org.apache.kafka.common.security.plain.PlainLoginModule" if self.sasl_mechanism == "PLAIN"
                      else "org.apache.kafka.common.security.scram.ScramLoginModule")
            password = Path(self.sasl_password_file).read_text().strip()  # type: ignore[arg-type]
            props["sasl.mechanism"] = self.sasl_mechanism  # type: ignore[assignment]
            props["sasl.jaas.config"] = (f'{module} required username="{_jaas_quote(self.sasl_username)}" '
                                         f'password="{_jaas_quote(password)}";')
        if self.security_protocol.endswith("SSL"):
            if self.ssl_cafile:
                props["ssl.truststore.type"] = "PEM"
                props["ssl.truststore.certificates"] = Path(self.ssl_cafile).read_text()
            if self.ssl_certfile and self.ssl_keyfile:
                props["ssl.keystore.type"] = "PEM"
                props["ssl.keystore.certificate.chain"] = Path(self.ssl_certfile).read_text()
                props["ssl.keystore.key"] = Path(self.ssl_keyfile).read_text()
        return props

    def with_bootstrap(self, bootstrap: str) -> KafkaSettings:
        return replace(self, bootstrap=bootstrap)


def _jaas_quote(value: str | None) -> str:
    """A JAAS option value inside double quotes: backslash and quote escaped."""
    return (value or "").replace("\\", "\\\\").replace('"', '\\"')


def make_producer(settings: KafkaSettings, **kw) -> KafkaProducer:
    """An idempotent producer with acks=all (no duplicates from producer retries)."""
    opts = {"acks": "all", "enable_idempotence": True, "linger_ms": 5, "retries": 2**31 - 1}
    opts.update(kw)
    return KafkaProducer(**settings.client_kwargs(), **opts)


def make_consumer(
    settings: KafkaSettings,
    *,
    topics: list[str] | None = None,
    assign: list[TopicPartition] | None = None,
    group_id: str | None = None,
    listener: ConsumerRebalanceListener | None = None,
    **kw,
) -> KafkaConsumer:
    """A consumer with manual commits: subscribe to ``topics`` in ``group_id`` (``listener``: told of
    rebalances), or ``assign`` partitions."""
    if (topics is None) == (assign is None):
        raise ValueError("give exactly one of topics= or assign=")
    # Short session/heartbeat: group joins against tansu take ~3 s instead of ~23 s with the defaults.
    opts = {"group_id": group_id, "enable_auto_commit": False, "auto_offset_reset": "earliest",
            "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}
    opts.update(kw)
    consumer = KafkaConsumer(**settings.client_kwargs(), **opts)
    if topics is not None:
        consumer.subscribe(topics, listener=listener)
    else:
        consumer.assign(assign)
    return consumer


def make_admin(settings: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**settings.client_kwargs())


def publish(producer: KafkaProducer, topic_name: str, event: Event, *, key: str | None = None, flush: bool = True):
    """Send one event as JSON; with ``flush`` wait until the broker acknowledged it. An event over
    its kind's ``MAX_BYTES`` (which every consumer would dead-letter) raises EventError here."""
    value = event.to_bytes()
    if len(value) > event.MAX_BYTES:
        raise EventError(event.KIND, "<root>", f"{len(value)} bytes > limit {event.MAX_BYTES}: not sent")
    future = producer.send(topic_name, value=value, key=key.encode() if key else None)
    if flush:
        producer.flush()
        return future.get(timeout=30)
    return future


def poll_records(
    consumer: KafkaConsumer,
    *,
    timeout_s: float,
    until: Callable[[list], bool] | None = None,
    poll_ms: int = 200,
) -> Iterator:
    """Yield records from a ``poll()`` loop until ``timeout_s`` passes or ``until(seen)`` holds."""
    seen: list = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=poll_ms).values():
            for record in batch:
                seen.append(record)
                yield record
        if until is not None and until(seen):
            return


def create_topics(settings: KafkaSettings, names: list[str] | None = None, *, timeout_s: float = 30) -> list[str]:
    """Create registered topics (all by default) that do not exist yet; return those created."""
    wanted = [TOPICS[n] for n in (names or list(TOPICS))]
    admin = make_admin(settings)
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(t.name, t.partitions, 1, topic_configs={"retention.ms": str(t.retention_ms), "cleanup.policy": t.cleanup_policy})
            for t in wanted
            if t.name not in existing
        ]
        created = []
        for nt in new:
            try:
                admin.create_topics([nt], timeout_ms=int(timeout_s * 1000))
                created.append(nt.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def end_offsets(settings: KafkaSettings, topic_name: str) -> dict[int, int]:
    """Latest offset of every partition of a topic."""
    consumer = KafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic_name, p) for p in sorted(consumer.partitions_for_topic(topic_name) or ())]
        return {tp.partition: off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()
