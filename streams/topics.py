"""The one registry of Kafka topics headwater uses; everything else imports it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METRICS_TOPICS", "RAW_TOPICS", "TOPICS", "Topic", "metrics_component", "metrics_topic", "raw_topic",
           "topic"]


@dataclass(frozen=True, slots=True)
class Topic:
    """A Kafka topic with its creation settings."""

    name: str
    partitions: int
    purpose: str
    retention_ms: int = 7 * 24 * 3600 * 1000
    cleanup_policy: str = "delete"


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in (
        Topic("raw.text", 2, "RawRecord JSON from text producers"),
        Topic("raw.audio", 2, "RawRecord JSON from audio producers"),
        Topic("raw.image", 2, "RawRecord JSON from image producers"),
        Topic("raw.video", 2, "RawRecord JSON from video producers"),
        Topic("dlq", 1, "DeadLetter events: reason, stage and original bytes"),
        Topic("shards", 1, "ShardPublished events from the MDS stream writer"),
        Topic("checkpoints", 1, "CheckpointSaved events from the trainer"),
        Topic("evals", 1, "EvalReport events from evaluators"),
        Topic("alerts", 1, "Alert events from rules and guards"),
        # the log of every source's state: ingest replays it from the start, so nothing may expire
        Topic("control", 1, "Signed Control commands: rollback, pause, quarantine", retention_ms=-1),
        Topic("metrics.ingest", 1, "MetricsEvents of ingest (only ingest's credential writes here)"),
        Topic("metrics.trainer", 1, "MetricsEvents of the trainer (only the trainer's credential writes here)"),
    )
}

METRICS_TOPICS: dict[str, str] = {"ingest": "metrics.ingest", "trainer": "metrics.trainer"}
"""component -> its own metrics topic. Each credential may write only its own (streams/access.py),
so the topic, not ``MetricsEvent.component`` (which the sender writes), says who produced a metric."""

RAW_TOPICS: tuple[str, ...] = ("raw.text", "raw.audio", "raw.image", "raw.video")


def raw_topic(modality: str) -> str:
    """The raw.* topic a producer of ``modality`` writes to."""
    name = f"raw.{modality}"
    if name not in TOPICS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {RAW_TOPICS}")
    return name


def metrics_topic(component: str) -> str:
    """The metrics topic ``component`` publishes to."""
    try:
        return METRICS_TOPICS[component]
    except KeyError:
        raise ValueError(f"no metrics topic for component {component!r}; expected one of "
                         f"{sorted(METRICS_TOPICS)}") from None


def metrics_component(topic_name: str) -> str | None:
    """The component whose credential alone writes ``topic_name``; None if it is no metrics topic."""
    return next((c for c, t in METRICS_TOPICS.items() if t == topic_name), None)


def topic(name: str) -> Topic:
    """Look up a registered topic by name, with a clear error for unknown names."""
    try:
        return TOPICS[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; registered: {sorted(TOPICS)}") from None
