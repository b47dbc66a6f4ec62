"""Kubernetes manifests: Strimzi Kafka generated from the topic registry, evaluator Deployment, secrets."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from infra.cli import SUBCOMMANDS
from infra.deploy.kafka import generate
from streams.access import Access
from streams.kafka import KafkaSettings
from streams.topics import TOPICS, Topic

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "infra" / "deploy"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY", re.IGNORECASE)


def _docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(DEPLOY.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _walk(obj):
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        yield from _walk(child)


def test_checked_in_kafka_manifests_equal_the_generated_ones(tmp_path):
    assert generate.main(["--check"]) == 0, "run: python -m infra.deploy.kafka.generate"
    assert generate.main(["--out-dir", str(tmp_path)]) == 0
    for name in generate.FILES:
        assert (tmp_path / name).read_text() == (DEPLOY / "kafka" / name).read_text()
    (tmp_path / "topics.yaml").write_text("# edited by hand\n")
    assert generate.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_one_kafka_topic_per_registered_topic():
    topics = {d["spec"]["topicName"]: d for d in yaml.safe_load_all((DEPLOY / "kafka" / "topics.yaml").read_text())}
    assert set(topics) == set(TOPICS)
    for name, t in TOPICS.items():
        spec = topics[name]["spec"]
        assert spec["partitions"] == t.partitions and spec["config"]["retention.ms"] == t.retention_ms
        assert DNS1123.match(topics[name]["metadata"]["name"])
        assert topics[name]["metadata"]["labels"]["strimzi.io/cluster"] == generate.CLUSTER


def test_a_new_registry_topic_reaches_the_manifests_and_users_reject_unknown_topics(monkeypatch):
    monkeypatch.setitem(TOPICS, "raw.lidar", Topic("raw.lidar", 4, "test"))
    assert "raw.lidar" in {d["spec"]["topicName"] for d in generate.topic_docs()}
    monkeypatch.setitem(generate.USERS, "rogue", Access(reads=("nope",)))
    with pytest.raises(ValueError, match="not in streams.topics.TOPICS"):
        generate.user_docs()


def test_kafka_users_get_least_privilege_acls():
    users = {d["metadata"]["name"]: d["spec"] for d in generate.user_docs()}
    ingest = users["headwater-ingest"]["authorization"]["acls"]
    written = {a["resource"]["name"] for a in ingest if "Write" in a["operations"]}
    assert written == {"dlq", "shards", "metrics.ingest", "alerts"}  # alerts: codebook collapse (media_hook)
    assert all(u["authentication"]["type"] == "scram-sha-512" for u in users.values())
    (kafka,) = [d for d in generate.cluster_docs() if d["kind"] == "Kafka"]
    (listener,) = kafka["spec"]["kafka"]["listeners"]
    assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512"


def test_every_manifest_has_kubernetes_shape():
    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "FlinkDeployment",
                                            "Deployment", "Service", "ConfigMap", "Namespace"}
    for path, d in docs:
        where = f"{path.relative_to(ROOT)}:{d.get('kind')}"
        assert isinstance(d.get("apiVersion"), str) and isinstance(d.get("kind"), str), where
        assert DNS1123.match(d["metadata"]["name"]), where
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "headwater", where
            assert isinstance(d.get("spec", d.get("data")), dict), where
        if d["kind"] == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
            mounts = {v["name"] for v in d["spec"]["template"]["spec"].get("volumes", [])}
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert c["image"] and c.get("resources"), where
                assert {m["name"] for m in c.get("volumeMounts", [])} <= mounts, where


def test_evaluator_deployment_runs_real_subcommands_with_kafka_settings_from_env():
    (dep,) = yaml.safe_load_all((DEPLOY / "k8s" / "evaluator-deployment.yaml").read_text())
    fields = {f"HEADWATER_KAFKA_{f.name.upper()}" for f in dataclasses.fields(KafkaSettings)}
    (config,) = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "config.yaml").read_text()) if d["kind"] == "ConfigMap"]
    assert {k for k in config["data"] if k.startswith("HEADWATER_KAFKA_")} <= fields
    for c in dep["spec"]["template"]["spec"]["containers"]:
        assert c["command"][0] == "headwater" and c["command"][1] in SUBCOMMANDS
        names = {e["name"] for e in c["env"]}
        assert {n for n in names if n.startswith("HEADWATER_KAFKA_")} <= fields
        assert {"HEADWATER_KAFKA_SASL_PASSWORD_FILE", "HEADWATER_KAFKA_SSL_CAFILE"} <= names
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        for e in c["env"]:
            if e["name"].endswith("_FILE"):
                assert any(e["value"].startswith(m + "/") for m in mounted), e


def test_evaluator_container_args_parse_with_the_evaluate_command():
    from evaluators.service import build_parser

    (dep,) = yaml.safe_load_all((DEPLOY / "k8s" / "evaluator-deployment.yaml").read_text())
    users = {d["metadata"]["name"]: d for d in generate.user_docs()}
    roles, kafka_users = set(), set()
    for c in dep["spec"]["template"]["spec"]["containers"]:
        (user,) = [e["value"] for e in c["env"] if e["name"] == "HEADWATER_KAFKA_SASL_USERNAME"]
        kafka_users.add(user)
        groups = {a["resource"]["name"] for a in users[user]["spec"]["authorization"]["acls"]
                  if a["resource"]["type"] == "group"}
        env = {e["name"] for e in c["env"]} | set(yaml.safe_load((DEPLOY / "k8s" / "config.yaml").read_text().split("---")[1])["data"])
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            assert var in env, f"{c['name']}: $({var}) is not defined in the container's env"
        args = build_parser().parse_args([re.sub(r"\$\(\w+\)", "x", a) for a in c["args"]])
        roles.add(args.role)
        assert args.group in groups, f"{c['name']}: group {args.group} has no ACL for the {user} user"
    assert roles == {"evaluator", "sentinel"}
    assert kafka_users == {"headwater-evaluator", "headwater-sentinel"}  # one credential each


def test_nothing_secret_is_in_the_repo_and_every_secret_is_documented():
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    referenced = set()
    for path, d in _docs():
        assert d["kind"] != "Secret", f"{path}: Secrets are created at deploy time, never checked in"
        for node in _walk(d):
            if isinstance(node, dict) and isinstance(node.get("name"), str) and "value" in node:
                assert not SECRETISH.search(node["name"]) or node["name"].endswith("_FILE"), (path, node)
            if isinstance(node, dict):
                for key in ("secretName",):
                    if key in node:
                        referenced.add(node[key])
                if "secretKeyRef" in node:
                    referenced.add(node["secretKeyRef"]["name"])
    assert referenced >= {"headwater-wandb", "headwater-webhook", "headwater-kafka-cluster-ca-cert"}
    for name in referenced:
        assert f"`{name}`" in operations, f"secret {name} is not documented in docs/OPERATIONS.md"
