"""Deployment files and their offline checks (Dataflow, Flink, Kafka on Kubernetes, evaluator)."""
