"""`headwater control ...`: an operator's signed commands on the ``control`` topic.

    headwater control rollback --bootstrap HOST:PORT --run-id ID --step N --reason TEXT
    headwater control quarantine-source|pause-source|resume-source --bootstrap HOST:PORT --source NAME --reason TEXT
    headwater control pause-domain|resume-domain --bootstrap HOST:PORT --domain NAME --run-id ID --reason TEXT

Each Control is signed with the operator key (``HEADWATER_OPERATOR_KEY_FILE`` or
``HEADWATER_OPERATOR_KEY``; ``headwater up`` writes a development one), printed as the JSON
that was sent, and counts as delivered only once the broker acknowledged it (acks=all) within
``--timeout-s``; otherwise the command exits 1. Exit 2: bad usage or no operator key. On
stderr one line says what was sent (command, target, control id, key, issue time) and where
it landed (``control@partition:offset``). Trainer commands name their run (``--run-id``).

Ingest applies source commands in the order the broker received them (offset order); it
ignores one as ``superseded`` only if its issue time is more than the clock skew allowance
(30 s) before the latest command already applied for that source, so a command sent now from
a host with a sane clock always takes effect after those sent before it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from streams.events import Control
from streams.signing import RUN_ID_PATTERN, SigningError, load_signing_key, sign_control

__all__ = ["build_control", "build_parser", "describe", "main"]

SOURCE_COMMANDS = ("quarantine-source", "pause-source", "resume-source")
DOMAIN_COMMANDS = ("pause-domain", "resume-domain")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--bootstrap", required=True, help="Kafka bootstrap HOST:PORT")
        c.add_argument("--reason", required=True, help="why (recorded with the command and in lineage)")
        c.add_argument("--timeout-s", type=float, default=30.0, help="wait this long for the broker's ack")
        return c

    r = command("rollback", "roll a trainer run back to one of its checkpoints")
    r.add_argument("--run-id", required=True, help="the run to roll back (a rollback always names one)")
    r.add_argument("--step", type=int, required=True, help="checkpoint step to restore")
    r.add_argument("--checkpoint", help="the checkpoint's path, checked by the trainer against the step")
    r.add_argument("--quarantine", choices=("none", "since"), default="none",
                   help="'since': also quarantine the shards trained after that step (default: none)")
    for name in SOURCE_COMMANDS:
        command(name, f"{name.replace('-', ' ')} in ingest (and, for quarantine, the trainer)").add_argument(
            "--source", required=True, help="the source name, as in RawRecord.source")
    for name in DOMAIN_COMMANDS:
        c = command(name, f"{name.replace('-', ' ')} in the trainer's mixer")
        c.add_argument("--domain", required=True)
        c.add_argument("--run-id", required=True, help="the trainer run (every trainer command names one)")
    return p


def build_control(a: argparse.Namespace) -> Control:
    """The unsigned Control the parsed arguments describe."""
    if a.command == "rollback":
        args = {"target": "step", "run_id": a.run_id, "step": a.step, "quarantine": a.quarantine}
        if a.checkpoint:
            args["checkpoint"] = a.checkpoint
    elif a.command in SOURCE_COMMANDS:
        args = {"source": a.source}
    else:
        args = {"domain": a.domain, "run_id": a.run_id}
    return Control(command=a.command.replace("-", "_"), args=args, reason=a.reason)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``headwater control``."""
    a = build_parser().parse_args(argv)
    if getattr(a, "run_id", None) is not None and not RUN_ID_PATTERN.fullmatch(a.run_id):
        print(f"headwater control: --run-id must match {RUN_ID_PATTERN.pattern}", file=sys.stderr)
        return 2
    try:
        control = sign_control(build_control(a), load_signing_key("operator"))
    except SigningError as e:
        print(f"headwater control: {e}", file=sys.stderr)
        return 2
    print(json.dumps(control.to_dict(), indent=1, sort_keys=True))
    from streams.kafka import KafkaSettings, make_producer

    try:
        ms = max(1000, int(a.timeout_s * 1000))
        producer = make_producer(KafkaSettings.load(bootstrap=a.bootstrap, client_id="headwater-operator"),
                                 bootstrap_timeout_ms=ms, max_block_ms=ms, request_timeout_ms=ms,
                                 delivery_timeout_ms=ms + 1000)
        try:
            meta = producer.send("control", value=control.to_bytes(), key=control.command.encode()).get(
                timeout=a.timeout_s)
        finally:
            producer.close(timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure to deliver is reported, exit 1
        print(f"headwater control: NOT delivered: {describe(control)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"delivered: {describe(control)} -> control@{meta.partition}:{meta.offset}", file=sys.stderr)
    return 0


def describe(control: Control) -> str:
    """One line naming what a control does and who signed it when."""
    target = " ".join(f"{k}={v}" for k, v in sorted(control.args.items()))
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(control.issued_at))
    return (f"{control.command} {target} (control {control.control_id}, key {control.key_id}, "
            f"issued {issued}, reason {control.reason!r})")


if __name__ == "__main__":
    sys.exit(main())
