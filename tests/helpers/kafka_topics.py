"""Fresh, uniquely named topics on a test broker."""

from __future__ import annotations

import uuid


def create_topic(bootstrap: str, prefix: str, partitions: int = 2) -> str:
    """Create ``<prefix>.<8 hex>`` with ``partitions`` partitions (replication 1); its name."""
    from kafka.admin import NewTopic

    from streams.kafka import KafkaSettings, make_admin

    name = f"{prefix}.{uuid.uuid4().hex[:8]}"
    admin = make_admin(KafkaSettings(bootstrap=bootstrap))
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()
    return name
