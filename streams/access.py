"""Who may do what on Kafka: one credential (Strimzi KafkaUser) per component, least privilege.

This table is the single declaration of each component's produced and consumed topics and
consumer groups. ``infra/deploy/kafka/generate.py`` renders it into ``users.yaml`` (the
KafkaUser ACLs) and ``tests/test_kafka_access.py`` reads the code listed under ``code`` and
fails when a component produces, consumes or joins a group its credential does not allow, or
is allowed something its code never does.

Why the lines are drawn where they are:

- ``evaluator`` loads checkpoints (untrusted bytes, verified by streams/checkpoint_manifest.py)
  and so holds no right on ``control``: a compromised evaluator can at most publish false
  reports and alerts, which the sentinel only acts on as ``rules.toml`` allows.
- ``sentinel`` is the only automatic writer of ``control``; its controls are signed with the
  sentinel key (streams/signing.py), which cannot lift a quarantine or a pause.
- ``operator`` is a person's ``headwater control ...``; its controls carry the operator key.
- ``trainer``, ``ingest``, ``evaluator`` and ``sentinel`` write ``alerts`` (loss guard, codebook
  collapse, regressions, undecodable records) and ``dlq`` (the consumer guard of every loop).
  Kafka ACLs cannot tell one alert from another, so write access to ``alerts`` is not a right
  to act: the sentinel turns an alert into a Control only when ``rules.toml`` allows that
  action for that rule, and signs what it sends.
- ``monitor`` (``headwater status``) only describes topics and groups (end offsets, lag).
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.topics import RAW_TOPICS

__all__ = ["ACCESS", "Access", "access"]


@dataclass(frozen=True, slots=True)
class Access:
    """One component's Kafka rights, and where the code that uses them lives."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    """consumer groups it joins or commits to (Read on the group)"""
    describe_all: bool = False
    """Describe on every topic, every group and the cluster, nothing else (monitoring)"""
    code: tuple[str, ...] = ()
    """repository paths (files or packages) whose Kafka calls run with this credential;
    empty: the component lives outside this repository"""
    purpose: str = ""


ACCESS: dict[str, Access] = {
    "producer": Access(writes=RAW_TOPICS, purpose="data producers outside headwater: raw records in"),
    "ingest": Access(
        reads=(*RAW_TOPICS, "control"), writes=("dlq", "shards", "metrics.ingest", "alerts"), groups=("headwater-ingest",),
        code=("beam_jobs",), purpose="Beam ingest: raw.* -> MDS shards; follows control (quarantine/pause)"),
    "trainer": Access(
        reads=("control",), writes=("checkpoints", "metrics.trainer", "alerts", "dlq"),
        code=("trainer",), purpose="torchtitan trainer: follows control (rollback), announces checkpoints"),
    "evaluator": Access(
        reads=("checkpoints", "evals"), writes=("evals", "alerts", "dlq"), groups=("headwater-evaluators",),
        code=("evaluators/evaluator.py", "evaluators/ledger.py"),
        purpose="checkpoint evaluator: CheckpointSaved -> EvalReport (+ regression alert)"),
    "sentinel": Access(
        reads=("metrics.ingest", "metrics.trainer", "evals", "alerts", "checkpoints", "control", "shards"),
        writes=("alerts", "control", "dlq"), groups=("headwater-sentinel",),
        code=("evaluators/sentinel.py", "evaluators/alerts"),
        purpose="alert sentinel: rules over metrics/evals, hooks, signed automatic controls"),
    "operator": Access(
        reads=("dlq",), writes=("control",), code=("infra/control_cli.py", "infra/takedown.py"),
        purpose="people: signed `headwater control ...` commands; `headwater takedown` (dlq scan)"),
    "monitor": Access(describe_all=True, code=("infra/status.py",),
                      purpose="`headwater status`: end offsets and consumer lag"),
}


def access(component: str) -> Access:
    """The declared rights of ``component``, with a clear error for unknown names."""
    try:
        return ACCESS[component]
    except KeyError:
        raise KeyError(f"unknown component {component!r}; declared: {sorted(ACCESS)}") from None

