"""Dataflow flex template and Flink deployment files, checked offline against the code they launch."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import apache_beam
import pytest
import yaml

from infra.deploy.runner_options import validate_runner_options

ROOT = Path(__file__).resolve().parents[1]
DATAFLOW = ROOT / "infra" / "deploy" / "dataflow"
FLINK = ROOT / "infra" / "deploy" / "flink"
VALID_DATAFLOW = ["--runner", "DataflowRunner", "--project", "my-proj", "--region", "us-central1", "--streaming",
                  "--temp_location", "gs://hw-bucket/tmp", "--sdk_container_image", "us-docker.pkg.dev/p/hw/ingest:1"]


def _ingest_flags() -> dict[str, bool]:
    """Every long flag of the ingest job's argparse -> whether it is required."""
    ingest = pytest.importorskip("beam_jobs.ingest", reason="beam_jobs/ingest.py is not in this checkout yet")
    return {s[2:]: a.required for a in ingest.build_parser()._actions for s in a.option_strings if s.startswith("--")}


@pytest.fixture()
def offline(monkeypatch):
    """Any network use fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _env(**kw) -> dict:
    return {**os.environ, "PYTHON": sys.executable, **kw}


# --- Dataflow -------------------------------------------------------------------------------

def test_flex_template_parameters_are_the_ingest_jobs_flags():
    meta = json.loads((DATAFLOW / "metadata.json").read_text())
    flags = _ingest_flags()
    names = [p["name"] for p in meta["parameters"]]
    assert len(names) == len(set(names)) and meta["streaming"] is True
    assert not set(names) - set(flags), f"metadata parameters the ingest job does not accept: {set(names) - set(flags)}"
    required = {n for n, req in flags.items() if req} | {"bootstrap"}  # streaming template needs Kafka
    optional = {p["name"] for p in meta["parameters"] if p.get("isOptional")}
    assert required <= set(names) and not required & optional
    for p in meta["parameters"]:
        assert p["label"] and p["helpText"]
        for rx in p.get("regexes", []):
            re.compile(rx)


def test_flex_template_regexes_accept_real_values_and_reject_bad_ones():
    rx = {p["name"]: p["regexes"][0] for p in json.loads((DATAFLOW / "metadata.json").read_text())["parameters"]
          if p.get("regexes")}
    assert re.fullmatch(rx["bootstrap"], "b-1.kafka:9093,b-2.kafka:9093")
    assert not re.fullmatch(rx["bootstrap"], "kafka")
    assert re.fullmatch(rx["stream-root"], "gs://bucket/streams/text")
    assert not re.fullmatch(rx["stream-root"], "/local/path")
    assert re.fullmatch(rx["topics"], "raw.text,raw.audio") and not re.fullmatch(rx["topics"], "dlq")


def test_dockerfile_matches_installed_beam_and_points_at_the_ingest_job():
    text = (DATAFLOW / "Dockerfile").read_text()
    assert f"ARG BEAM_VERSION={apache_beam.__version__}" in text
    assert f"beam_python{sys.version_info.major}.{sys.version_info.minor}_sdk" in text
    py_file = re.search(r'FLEX_TEMPLATE_PYTHON_PY_FILE="\$\{WORKDIR\}/([^"]+)"', text).group(1)
    _ingest_flags()  # skips until the job exists
    assert (ROOT / py_file).is_file()
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.MULTILINE):
        assert (ROOT / src).exists(), f"COPY source missing: {src}"
    assert "python_template_launcher" in text.split("ENTRYPOINT")[1]


def test_launch_script_dry_run_validates_and_prints_gcloud_commands():
    env = _env(PROJECT="my-proj", REGION="us-central1", BUCKET="hw-bucket", IMAGE="us-docker.pkg.dev/p/hw/ingest:1",
               BOOTSTRAP="kafka-0:9093,kafka-1:9093", STREAM_ROOT="gs://hw-bucket/streams/text")
    out = subprocess.run(check=False, args=["bash", str(DATAFLOW / "launch.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    build, run = [line for line in out.stdout.splitlines() if line.startswith("gcloud")]
    assert "flex-template build gs://hw-bucket/templates/headwater-ingest.json" in build
    argv = shlex.split(run)
    params = argv[argv.index("--parameters") + 1]
    assert params.startswith("^~^")  # gcloud custom delimiter: values contain commas
    values = dict(kv.split("=", 1) for kv in params[3:].split("~"))
    assert values["bootstrap"] == "kafka-0:9093,kafka-1:9093"
    keys = set(values)
    meta = {p["name"] for p in json.loads((DATAFLOW / "metadata.json").read_text())["parameters"]}
    assert keys - {"sdk_container_image"} <= meta
    missing = subprocess.run(check=False, args=["bash", str(DATAFLOW / "launch.sh"), "--dry-run"], env=_env(PROJECT="p"),
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "set REGION" in missing.stderr


def test_dataflow_options_validate_offline(offline):
    assert validate_runner_options(VALID_DATAFLOW) == []
    errors = validate_runner_options(["--runner", "DataflowRunner", "--temp_location", "/tmp/x", "--num_workers",
                                      "-1", "--job_name", "Bad_Name", "--num_worker", "3"])
    text = "\n".join(errors)
    for expected in ("add --streaming", "Missing required option: project", "Missing required option: region",
                     "Invalid GCS path (/tmp/x)", "num_workers", "Invalid job_name (Bad_Name)",
                     "sdk_container_image", "unknown pipeline option --num_worker"):
        assert expected in text, expected


def test_job_flags_are_not_reported_as_unknown_pipeline_options(offline):
    argv = VALID_DATAFLOW + ["--stream-root", "gs://hw-bucket/s"]
    assert validate_runner_options(argv) == ["unknown pipeline option --stream_root"]
    assert validate_runner_options(argv, job_flags=("--stream-root",)) == []


# --- Flink ----------------------------------------------------------------------------------

def _flink_options() -> list[str]:
    lines = (FLINK / "pipeline-options.txt").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def test_flink_pipeline_options_validate_offline(offline):
    assert validate_runner_options(_flink_options()) == []
    bad = validate_runner_options(["--runner=FlinkRunner", "--streaming", "--environment_type=LOOPBACK"])
    assert any("flink_master" in e for e in bad) and any("LOOPBACK" in e for e in bad)


def test_flink_deployment_matches_beam_and_the_pipeline_options():
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    (dep,) = yaml.safe_load_all((FLINK / "flink-deployment.yaml").read_text())
    assert dep["apiVersion"] == "flink.apache.org/v1beta1" and dep["kind"] == "FlinkDeployment"
    flink = dep["spec"]["flinkVersion"].removeprefix("v").replace("_", ".")
    assert flink in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS and dep["spec"]["image"] == f"flink:{flink}"
    assert dep["spec"]["flinkConfiguration"]["execution.checkpointing.mode"] == "EXACTLY_ONCE"
    (sidecar,) = dep["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]
    assert sidecar["args"] == ["--worker_pool"]
    opts = dict(o.removeprefix("--").split("=", 1) for o in _flink_options() if "=" in o)
    assert opts["environment_type"] == "EXTERNAL"
    assert opts["environment_config"] == f"localhost:{sidecar['ports'][0]['containerPort']}"
    server, service = yaml.safe_load_all((FLINK / "beam-job-server.yaml").read_text())
    image = server["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"apache/beam_flink{flink}_job_server:{apache_beam.__version__}"
    ports = {p["port"] for p in service["spec"]["ports"]}
    for key in ("job_endpoint", "artifact_endpoint"):
        host, port = opts[key].split(":")
        assert host == service["metadata"]["name"] and int(port) in ports
    assert server["spec"]["selector"]["matchLabels"].items() <= server["spec"]["template"]["metadata"]["labels"].items()


def test_flink_submit_dry_run_builds_an_ingest_command_the_job_accepts():
    out = subprocess.run(check=False, args=["bash", str(FLINK / "submit.sh"), "--dry-run", "--window-s", "5"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT,
                         env=_env(BOOTSTRAP="kafka:9093", STREAM_ROOT="s3://b/streams/text"))
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[1:3] == ["-m", "beam_jobs.ingest"]
    flags = _ingest_flags()
    job_args = [a[2:] for a in cmd if a.startswith("--") and "=" not in a and a[2:] not in ("streaming",)]
    assert set(job_args) <= set(flags), set(job_args) - set(flags)
