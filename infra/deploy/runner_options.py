"""Offline validation of Beam pipeline options for the Dataflow and Flink deployments.

``python -m infra.deploy.runner_options --runner DataflowRunner --project p ...`` prints
every problem and exits 1, or prints "ok" and exits 0. Nothing touches the network:
Beam's own :class:`PipelineOptionsValidator` checks are called one by one (its full
``validate()`` for a Dataflow runner looks up or creates a GCS bucket), plus the
settings a streaming headwater ingest job needs on each runner.
"""

from __future__ import annotations

import sys

from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

__all__ = ["main", "validate_runner_options"]

_PORTABLE_RUNNERS = ("FlinkRunner", "PortableRunner")
# Flink (Java) pipeline options that the Python SDK forwards to the job server untouched.
FLINK_PASSTHROUGH = ("--checkpointing_interval", "--checkpointing_mode", "--min_pause_between_checkpoints",
                     "--externalized_checkpoints_enabled", "--state_backend", "--state_backend_storage_path",
                     "--fail_on_checkpointing_errors", "--num_concurrent_checkpoints")


def _dataflow(options: PipelineOptions, v: PipelineOptionsValidator) -> list[str]:
    gcp = options.view_as(GoogleCloudOptions)
    errors = v.validate_cloud_options(gcp)
    if gcp.region is None:
        errors.append("Missing required option: region.")
    temp_errors = v.validate_gcs_path(gcp, "temp_location")
    staging_errors = v.validate_gcs_path(gcp, "staging_location")
    if temp_errors and staging_errors:
        errors += temp_errors
    worker = options.view_as(WorkerOptions)
    errors += v.validate_num_workers(worker) + v.validate_worker_region_zone(worker)
    errors += v.validate_sdk_container_image_options(worker)
    if not worker.sdk_container_image:
        errors.append("Missing required option: sdk_container_image (the flex template image, so workers "
                      "have headwater and its native dependencies).")
    return errors


def _portable(options: PipelineOptions, v: PipelineOptionsValidator, runner: str) -> list[str]:
    portable = options.view_as(PortableOptions)
    errors = v.validate_environment_options(portable)
    env = (portable.environment_type or "DOCKER").upper()
    if env == "LOOPBACK":
        errors.append("environment_type LOOPBACK runs workers in the submitting process: not for a cluster.")
    if runner == "PortableRunner" and not portable.job_endpoint:
        errors.append("Missing required option: job_endpoint (the Beam Flink job server, HOST:8099).")
    if runner == "FlinkRunner" and options.view_as(FlinkRunnerOptions).flink_master in ("[auto]", "[local]"):
        errors.append("flink_master must name the cluster's JobManager REST endpoint (HOST:8081).")
    return errors


def validate_runner_options(argv: list[str], *, job_flags: tuple[str, ...] = ()) -> list[str]:
    """Problems with pipeline options ``argv`` for their ``--runner`` (empty when valid).

    ``job_flags`` are the job's own flags (``--bootstrap`` ...), parsed by the job itself;
    any other option Beam does not know is reported, so a typo never passes silently.
    """
    options = PipelineOptions(argv)
    parsed = options.get_all_options(drop_default=True)
    own = {f.lstrip("-").replace("-", "_") for f in job_flags}
    unknown = [a for a in options.get_all_options(retain_unknown_options=True, drop_default=True)
               if a not in parsed and a not in own]
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    errors: list[str] = []
    if not options.view_as(StandardOptions).streaming:
        errors.append("ingest runs as a streaming job: add --streaming.")
    v = PipelineOptionsValidator(options, runner=None)
    errors += v.validate_pickle_library(options.view_as(SetupOptions))
    if runner == "DataflowRunner":
        errors += _dataflow(options, v)
    elif runner in _PORTABLE_RUNNERS:
        errors += _portable(options, v, runner)
        unknown = [a for a in unknown if f"--{a}" not in FLINK_PASSTHROUGH]
    else:
        errors.append(f"runner {runner!r}: expected DataflowRunner, FlinkRunner or PortableRunner.")
    errors += [f"unknown pipeline option --{a}" for a in unknown]
    return errors


def main(argv: list[str] | None = None) -> int:
    errors = validate_runner_options(list(sys.argv[1:] if argv is None else argv))
    for e in errors:
        print(f"invalid: {e}", file=sys.stderr)
    if not errors:
        print("ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
