"""`headwater` command line: one entry point, one subcommand per component.

Each subcommand is a ``main(argv) -> int`` function owned by the package it
drives, so components parse their own options (Beam jobs hand the rest to
PipelineOptions). A subcommand whose module is not part of this build says so
and exits 2; it never pretends.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["SUBCOMMANDS", "main"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("infra.broker_cli:up", "start the embedded Kafka broker on 127.0.0.1 and create all topics"),
    "down": ("infra.broker_cli:down", "stop the embedded Kafka broker"),
    "topics": ("infra.broker_cli:topics", "list topics on the broker"),
    "ingest": ("beam_jobs.ingest:main", "run the Beam ingest job (streaming from Kafka or bounded from files)"),
    "discretizer": ("beam_jobs.media.discretizer_cli:main", "train/inspect media RVQ codebooks"),
    "train": ("trainer.launch:main", "train on live MDS streams with torchtitan (torchrun)"),
    "evaluate": ("evaluators.service:main", "evaluate checkpoints as they are published"),
    "control": ("infra.control_cli:main", "send a signed operator command (rollback, quarantine/pause/resume)"),
    "demo": ("infra.demo:main", "run the whole loop on embedded defaults"),
    "status": ("infra.status:main", "live terminal dashboard"),
    "report": ("infra.report:main", "write a self-contained HTML report for a run directory"),
    "fold": ("infra.fold_cli:main", "fold the publish journal of local stream roots into their index.json"),
    "takedown": ("infra.takedown:main", "remove a source from a stream root, denylist it, report checkpoints that saw it"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: headwater <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `headwater <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"headwater: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"headwater {name}: not available in this build ({module_name} is not implemented yet)", file=sys.stderr)
            return 2
        raise
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
