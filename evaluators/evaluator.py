"""The checkpoint evaluator: CheckpointSaved -> EvalReport (+ regression Alert).

One instance per process, in a Kafka consumer group on ``checkpoints`` (instances share the
topic's partitions). For each checkpoint: skip it if the ledger (the ``evals`` topic) already
holds its report for this suite; otherwise load it, scan the training streams for leaked eval
items, score the remaining items, compare with the latest passed report of the checkpoint's
branch (evaluators/regression.py), publish the EvalReport (and an ``eval_regression`` Alert if
it regressed), then commit the offset. A transient error (the guard's ``REDELIVER``: e.g. the
broker timing out a publish) commits nothing: the consumer seeks back and retries with backoff.
Alerts decided for a published report stay pending until the broker acknowledged them, so a
redelivered checkpoint (already settled in the ledger) still gets its alerts out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from beam_jobs.dedup.index import DedupConfig
from evaluators.checkpoint import CheckpointError, CheckpointTrust, load_checkpoint
from evaluators.evalsets import EvalSuite, SuiteError, load_suite
from evaluators.identity import checkpoint_key
from evaluators.leakage import LeakageDetector
from evaluators.ledger import EvalLedger
from evaluators.metrics import item_table, score_items, summarize, text_bytes
from evaluators.regression import RegressionConfig, assess, regression_alert
from evaluators.wandb_log import WandbLogger
from streams.checkpoint_manifest import CheckpointRejected
from streams.events import Alert, CheckpointSaved, EvalReport, Event
from streams.guard import REDELIVER, ConsumerGuard
from streams.kafka import KafkaSettings, make_consumer, make_producer, publish
from streams.signing import Keyring, SigningError
from streams.vocab import Vocab

__all__ = ["Evaluator"]

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates checkpoints from the ``checkpoints`` topic on one suite."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        bootstrap: str
        eval_root: str
        suite: str
        group: str = "headwater-evaluators"
        train_roots: list[str] = field(default_factory=list)
        checkpoint_roots: list[str] = field(default_factory=list)
        """only checkpoints whose real path lies under one of these are loaded (required)"""
        keyring: str | None = None
        """keyring JSON with the trainer's public key; None: ``HEADWATER_KEYRING_FILE``"""
        semantic_leakage: bool = False
        batch_size: int = 4
        seq_len: int | None = None      # default: the checkpoint's seq_len
        device: str = "cpu"
        regression: RegressionConfig = field(default_factory=RegressionConfig)
        wandb_mode: str = "disabled"    # disabled | offline | online
        wandb_dir: str | None = None
        instance: str = "evaluator"

    def __init__(self, config: Config, *, vocab: Vocab | None = None):
        self.config = c = config
        if not c.checkpoint_roots:
            raise ValueError("no checkpoint roots: the evaluator loads checkpoints only under configured "
                             "roots (--checkpoint-root DIR)")
        keyring = Keyring.load(c.keyring) if c.keyring else Keyring.from_env()
        if keyring is None:
            raise SigningError("no keyring: checkpoint manifests cannot be verified (--keyring FILE or "
                               "HEADWATER_KEYRING_FILE)")
        self.trust = CheckpointTrust(roots=list(c.checkpoint_roots), keyring=keyring)
        self.vocab = vocab or Vocab.default()
        self.suite: EvalSuite = load_suite(c.eval_root, c.suite, img_open_id=self.vocab.special("<img>"))
        if self.suite.vocab_version != self.vocab.version:
            raise SuiteError(f"suite {c.suite!r} was tokenized with vocab {self.suite.vocab_version}, "
                             f"this evaluator has {self.vocab.version}; rebuild the suite or the evaluator")
        self._bytes = [text_bytes(self.vocab.decode, it.tokens, self.vocab.text_size) if it.modality == "text" else 0
                       for it in self.suite.items]
        self.settings = KafkaSettings.load(bootstrap=c.bootstrap, client_id=f"headwater-{c.instance}")
        self.producer = make_producer(self.settings)
        self.guard = ConsumerGuard(c.instance, self.producer)
        self.ledger = EvalLedger(self.settings, self.guard)
        self.leakage = LeakageDetector(self.suite.items, decode_text=self.vocab.decode, text_size=self.vocab.text_size,
                                       train_roots=c.train_roots,
                                       config=DedupConfig(shard_key="none", semantic=c.semantic_leakage))
        self.wandb = WandbLogger(mode=c.wandb_mode, dir=c.wandb_dir, name=f"{c.instance}-{c.suite}")
        self._pending: list[tuple[Alert, str]] = []  # alerts of published reports, not yet acknowledged

    # --- one checkpoint --------------------------------------------------------------------
    def evaluate(self, ckpt: CheckpointSaved) -> EvalReport:
        """The EvalReport of one checkpoint (an error report if it cannot be evaluated)."""
        t0 = time.perf_counter()
        report = EvalReport(run_id=ckpt.run_id, step=ckpt.step, checkpoint_path=ckpt.path, suite=self.suite.name,
                            vocab_version=ckpt.vocab_version, passed=False,
                            details={"suite_version": self.suite.version, "instance": self.config.instance,
                                     "checkpoint_wall_time": checkpoint_key(ckpt)[1],
                                     "tokenizer_version": ckpt.tokenizer_version,
                                     "discretizer_version": ckpt.discretizer_version})
        if ckpt.vocab_version != self.suite.vocab_version:
            report.error = (f"vocab mismatch: checkpoint {ckpt.vocab_version!r} vs suite "
                            f"{self.suite.vocab_version!r}; refusing to evaluate or compare")
            return report
        try:
            loaded = load_checkpoint(ckpt.path, trust=self.trust, run_id=ckpt.run_id, step=ckpt.step,
                                     device=self.config.device)
        except CheckpointRejected as e:
            report.error = f"checkpoint rejected ({e.reason}): {e.detail}"
            report.details["rejected"] = e.reason
            return report
        except CheckpointError as e:
            report.error = str(e)
            return report
        if loaded.meta.get("vocab_version") not in (None, ckpt.vocab_version):
            report.error = f"vocab mismatch: {ckpt.path}/headwater.json says {loaded.meta['vocab_version']!r}"
            return report
        vocab_size = int(loaded.meta.get("vocab_size") or self.vocab.size)
        too_big = max((int(it.tokens.max()) for it in self.suite.items if it.tokens.size), default=-1)
        if too_big >= vocab_size:
            report.error = (f"suite {self.suite.name!r} has token id {too_big}, outside the checkpoint's "
                            f"vocab of {vocab_size}; refusing to evaluate")
            return report
        self.leakage.scan()
        leaked = self.leakage.leaks
        keep = [i for i, it in enumerate(self.suite.items) if it.id not in leaked]
        items = [self.suite.items[i] for i in keep]
        seq_len = self.config.seq_len or int(loaded.meta.get("seq_len", 512))
        pad_id = self.vocab.special("<|pad|>")
        pad_id = pad_id if pad_id < vocab_size else 0  # masked and after every real token: any id works
        nll, count = score_items(loaded.model, items, seq_len=seq_len, batch_size=self.config.batch_size,
                                 pad_id=pad_id)
        table = item_table(items, nll, count, [self._bytes[i] for i in keep])
        report.metrics = {**summarize(table), "eval_items": float(len(items)), "leaked_items": float(len(leaked))}
        report.details.update(items=table, leakage=[leak.as_dict() for leak in leaked.values()])
        report.passed = True
        assess(report, [r for r in self.ledger.reports if r.run_id == ckpt.run_id], self.config.regression)
        report.details["eval_seconds"] = round(time.perf_counter() - t0, 3)
        return report

    def _rejected_alert(self, report: EvalReport) -> Alert:
        return Alert(rule="evaluator.checkpoint_rejected", severity="critical", source=self.config.instance,
                     dedup_key=f"evaluator.checkpoint_rejected|{report.checkpoint_path}",
                     message=f"checkpoint {report.checkpoint_path} not loaded: {report.error}",
                     evidence={"run_id": report.run_id, "step": report.step, "checkpoint": report.checkpoint_path,
                               "reason": report.details["rejected"]})

    def handle(self, ckpt: CheckpointSaved) -> EvalReport | None:
        """Evaluate and publish unless the ledger already settles this (checkpoint, suite)."""
        key = (checkpoint_key(ckpt), self.suite.name)
        self._publish_pending()
        self.ledger.refresh()
        if key in self.ledger.done:
            return None
        report = self.evaluate(ckpt)
        self.ledger.refresh()
        if key in self.ledger.done:  # another instance published first (rebalance race)
            return None
        publish(self.producer, "evals", report, key=f"{ckpt.path}|{self.suite.name}")
        self.ledger.add(report)
        if not report.passed and "regression" in report.details:
            self._pending.append((regression_alert(report, source=self.config.instance), "eval_regression"))
        if report.details.get("rejected") not in (None, "not_a_directory"):  # vanished (purged, rolled back): no page
            self._pending.append((self._rejected_alert(report), "evaluator.checkpoint_rejected"))
        self.wandb.log(report)
        self._publish_pending()
        return report

    def _publish_pending(self) -> None:
        """Publish pending alerts in order; one that fails stays pending (with those after it)."""
        while self._pending:
            alert, key = self._pending[0]
            publish(self.producer, "alerts", alert, key=key)
            self._pending.pop(0)

    # --- the service loop ------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None, max_idle_s: float | None = None) -> int:
        """Consume ``checkpoints`` until ``stop`` is set (or ``max_idle_s`` without records); returns #published."""
        stop = stop or threading.Event()
        consumer = make_consumer(self.settings, topics=["checkpoints"], group_id=self.config.group)
        published, idle_since = 0, time.monotonic()
        try:
            while not stop.is_set():
                batches = consumer.poll(timeout_ms=200, max_records=1)
                if not batches:
                    self.guard.flush()
                    if not consumer.assignment():  # still joining the group: not idle yet
                        idle_since = time.monotonic()
                    elif max_idle_s is not None and time.monotonic() - idle_since > max_idle_s:
                        break
                    continue
                for tp, records in batches.items():
                    for record in records:
                        result = self.guard.handle(record, self._process)
                        if result is REDELIVER:  # not done: redeliver it, offset not committed
                            consumer.seek(tp, record.offset)
                            stop.wait(self.guard.retry_delay_s())
                            break
                        published += result or 0
                        consumer.commit({TopicPartition(tp.topic, tp.partition):
                                         OffsetAndMetadata(record.offset + 1, "", -1)})
                idle_since = time.monotonic()
        finally:
            consumer.close()
        return published

    def _process(self, event: Event) -> int:
        if not isinstance(event, CheckpointSaved):
            log.error("checkpoints: expected CheckpointSaved, got %s; skipped", event.KIND)
            return 0
        report = self.handle(event)
        if report is not None:
            log.info("evaluated %s step %d: passed=%s error=%s", event.run_id, event.step, report.passed, report.error)
        return int(report is not None)

    def close(self) -> None:
        self.guard.flush(force=True)
        self.leakage.close()
        self.ledger.close()
        self.producer.close()
        self.wandb.close()
