"""Strimzi Kafka manifests generated from streams.topics."""
