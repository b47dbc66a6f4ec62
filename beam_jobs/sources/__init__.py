"""Sources of (KafkaCoords, original bytes): files (bounded) and Kafka (streaming)."""
