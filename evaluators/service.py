"""``headwater evaluate``: the checkpoint evaluator, or (``--role sentinel``) the alert sentinel.

    headwater evaluate --bootstrap HOST:PORT --group G --eval-root DIR --suite NAME --checkpoint-root DIR
                       [--keyring FILE] [--train-root R ...]
    headwater evaluate --role sentinel --bootstrap HOST:PORT --rules infra/alerts/rules.toml --lineage L.jsonl

Run several evaluators with the same ``--group`` to share the ``checkpoints`` partitions; run
one sentinel (it owns rule cooldowns and the rollback policy).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from evaluators.regression import RegressionConfig

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("evaluator", "sentinel"), default="evaluator")
    p.add_argument("--bootstrap", default="127.0.0.1:19092", help="Kafka bootstrap servers")
    p.add_argument("--group", default=None, help="consumer group (default per role)")
    p.add_argument("--instance", default="evaluator", help="name of this instance (in reports/alerts)")
    p.add_argument("--max-idle-s", type=float, default=None, help="exit after this long without records")
    ev = p.add_argument_group("evaluator")
    ev.add_argument("--eval-root", help="directory of eval suites (one MDS stream root per suite)")
    ev.add_argument("--suite", help="suite name (a directory under --eval-root)")
    ev.add_argument("--train-root", action="append", default=[], help="training stream root to scan for leakage")
    ev.add_argument("--checkpoint-root", action="append", default=[],
                    help="directory under which checkpoints may be loaded (repeatable; required)")
    ev.add_argument("--keyring", default=None,
                    help="keyring JSON with the trainer's public key (default: $HEADWATER_KEYRING_FILE)")
    ev.add_argument("--semantic-leakage", action="store_true", help="also use the FAISS MiniLM index for leakage")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--seq-len", type=int, default=None)
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ev.add_argument("--alpha", type=float, default=RegressionConfig().alpha,
                    help="family-wise significance level over the metrics of a checkpoint (Holm)")
    ev.add_argument("--min-rel-increase", type=float, default=RegressionConfig().min_rel_increase,
                    help="minimum effect size: smallest relative perplexity increase that counts")
    ev.add_argument("--n-boot", type=int, default=2000)
    ev.add_argument("--wandb", choices=("disabled", "offline", "online"), default="offline")
    ev.add_argument("--wandb-dir", default=None)
    se = p.add_argument_group("sentinel")
    se.add_argument("--rules", help="alert rules and hooks TOML (see infra/alerts/rules.toml)")
    se.add_argument("--lineage", default="lineage.jsonl", help="JSONL log of every rollback/quarantine")
    return p


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = _stop_on_signals()
    if args.role == "sentinel":
        from evaluators.sentinel import Sentinel

        if not args.rules:
            print("headwater evaluate --role sentinel: --rules FILE is required", file=sys.stderr)
            return 2
        from streams.signing import SigningError

        try:  # the sentinel signs its Controls and checks the ones it reads: keys are required
            sentinel = Sentinel(Sentinel.Config(bootstrap=args.bootstrap, rules=args.rules, lineage=args.lineage,
                                                group=args.group or "headwater-sentinel", instance=args.instance))
        except SigningError as e:
            print(f"headwater evaluate --role sentinel: {e}", file=sys.stderr)
            return 2
        try:
            sentinel.run(stop=stop, max_idle_s=args.max_idle_s)
        finally:
            sentinel.close()
        return 0
    if not args.eval_root or not args.suite:
        print("headwater evaluate: --eval-root and --suite are required", file=sys.stderr)
        return 2
    if not args.checkpoint_root:
        print("headwater evaluate: --checkpoint-root DIR is required (checkpoints are loaded only under "
              "configured roots)", file=sys.stderr)
        return 2
    import torch

    from evaluators.evalsets import SuiteError
    from evaluators.evaluator import Evaluator
    from streams.signing import SigningError

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = Evaluator.Config(
        bootstrap=args.bootstrap, eval_root=args.eval_root, suite=args.suite,
        group=args.group or "headwater-evaluators", train_roots=args.train_root,
        checkpoint_roots=args.checkpoint_root, keyring=args.keyring,
        semantic_leakage=args.semantic_leakage, batch_size=args.batch_size, seq_len=args.seq_len, device=device,
        regression=RegressionConfig(alpha=args.alpha, min_rel_increase=args.min_rel_increase, n_boot=args.n_boot),
        wandb_mode=args.wandb, wandb_dir=args.wandb_dir, instance=args.instance)
    try:
        evaluator = Evaluator(config)
    except (SuiteError, SigningError, ValueError) as e:
        print(f"headwater evaluate: {e}", file=sys.stderr)
        return 2
    try:
        n = evaluator.run(stop=stop, max_idle_s=args.max_idle_s)
    finally:
        evaluator.close()
    logging.getLogger(__name__).info("published %d eval reports", n)
    return 0
