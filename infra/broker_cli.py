"""`headwater up|down|topics`: the embedded broker from the command line.

``up`` also creates, if absent, a development keyring and operator/sentinel/trainer keys (0600)
under ``<run-dir>/keys`` and prints the ``export`` lines that point the components at them.
"""

from __future__ import annotations

import argparse
import os
import sys

from streams.broker import BrokerError, EmbeddedBroker
from streams.kafka import KafkaSettings, make_admin
from streams.signing import write_dev_keys

DEFAULT_RUN_DIR = "runs/local"
DEFAULT_PORT = 19092


def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"headwater {prog}", description=doc)
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="where broker.pid/broker.port/broker.log live")
    return p


def up(argv: list[str]) -> int:
    """Start the broker detached and create every registered topic."""
    p = _parser("up", "start the embedded Kafka-protocol broker on 127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = p.parse_args(argv)
    try:
        broker = EmbeddedBroker(run_dir=args.run_dir, port=args.port).start()
    except BrokerError as e:
        print(f"headwater up: {e}", file=sys.stderr)
        return 1
    print(f"broker up at {broker.bootstrap} (pid {broker.pid}); topics created; stop with `headwater down --run-dir {args.run_dir}`")
    keys = os.path.join(args.run_dir, "keys")
    env = write_dev_keys(keys)
    print(f"development control keys in {keys} (keep them private); to use them:")
    for name, value in env.items():
        print(f"export {name}={value}")
    return 0


def down(argv: list[str]) -> int:
    """Stop the broker recorded under the run dir."""
    args = _parser("down", "stop the embedded broker").parse_args(argv)
    try:
        broker = EmbeddedBroker.from_run_dir(args.run_dir)
    except BrokerError as e:
        print(f"headwater down: {e}", file=sys.stderr)
        return 1
    broker.stop()
    print("broker stopped")
    return 0


def topics(argv: list[str]) -> int:
    """List topics on a broker (the embedded one by default)."""
    p = _parser("topics", "list topics on the broker")
    p.add_argument("--bootstrap", help="HOST:PORT (default: the embedded broker of --run-dir)")
    args = p.parse_args(argv)
    try:
        bootstrap = args.bootstrap or EmbeddedBroker.from_run_dir(args.run_dir).bootstrap
    except BrokerError as e:
        print(f"headwater topics: {e}", file=sys.stderr)
        return 1
    admin = make_admin(KafkaSettings.load(bootstrap=bootstrap))
    for name in sorted(admin.list_topics()):
        print(name)
    admin.close()
    return 0
