"""HeadwaterTrainer: torchtitan's Trainer on live streams with online mixing, guards and control.

It runs torchtitan's own ``train()``/``train_step()`` (GC, profiler, process-group timeouts,
metrics processor, gradient accumulation) and adds, through its hooks (docs/ARCHITECTURE.md,
"The training loop"):
- per-domain losses each step, reduced with the step's one device all-reduce and read one
  step late (trainer/step_stats.py: no per-step host sync), feeding the Mixer;
- a NaN/spike guard decided on the device that skips the optimizer step (fused AdamW's
  ``found_inf``), alerts, and after N spikes rolls back;
- control commands (rollback, pause/resume domain, quarantine shards/sources; see
  trainer/control.py) applied by all ranks at the same step (broadcast from rank 0 only when a
  step's vector says it has some); a rollback quarantines the shards
  trained since the restored checkpoint and those read but not trained yet (only the
  regressed ``domains``' when the control names them), moves the abandoned checkpoints to
  ``checkpoints/abandoned/rollback-<from>-to-<to>-<control id>/``; the quarantine persists in
  RUN/quarantine.json, paused domains and applied control ids in RUN/control.json; rollbacks
  are idempotent (by control id) and crash-atomic through RUN/rollbacks.json
  (trainer/rollback_journal.py), and wait for an async checkpoint save in flight first;
- RUN/metrics.jsonl (with the shards and sources rank 0 trained) + wandb + ``metrics.trainer``
  topic every step, one step late; once a DCP save is complete (async saves finish later): ``headwater.json``,
  a manifest of every file signed with the trainer key (trainer/checkpoint_out.py), then a
  CheckpointSaved event on the ``checkpoints`` topic.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pickle
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torchtitan.tools import utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from streams.broker_watch import BrokerWatch
from streams.events import CheckpointSaved, Control
from streams.signing import RUN_ID_PATTERN, ControlVerifier, SigningError, load_signing_key
from streams.source_names import canonical_source
from trainer.checkpoint_out import CheckpointFinisher
from trainer.checkpointer import HeadwaterCheckpointManager
from trainer.control import ControlListener
from trainer.control_state import ControlState
from trainer.data import freshness
from trainer.events_out import EventSink
from trainer.guard import LossGuard
from trainer.lineage import SourceLineage
from trainer.metrics_log import MetricsLog
from trainer.quarantine import Quarantine
from trainer.resume import load_latest_intact
from trainer.rollback_journal import RollbackJournal
from trainer.step_stats import PendingStep, StepReading, StepStats

__all__ = ["HeadwaterTrainer", "RunOptions"]

SHARD_LOG_STEPS = 5000
"""steps of per-step shard history kept in checkpoints (what a rollback quarantines)"""


@dataclass(kw_only=True, slots=True)
class RunOptions:
    """Headwater-specific options of a training run."""

    config_name: str = "debug_cpu"
    run_id: str = ""
    vocab_size: int = 0
    """0: the unified vocabulary size (streams.vocab); >0 overrides (synthetic test streams)"""
    bootstrap: str = ""
    """Kafka bootstrap; empty: no topics (files under the run dir only)"""
    lock_wait_s: float = 15.0
    """rank 0 waits this long for a previous trainer's lock on the run directory (trainer/run_guard.py)"""
    guard: LossGuard.Config = field(default_factory=LossGuard.Config)
    metrics: MetricsLog.Config = field(default_factory=MetricsLog.Config)


class _ExtraState(Stateful):
    """Guard state (same on all ranks), each rank's shard log and torch RNG state, in every checkpoint."""

    def __init__(self, trainer: HeadwaterTrainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {
            "guard": pickle.dumps(self.trainer.guard.state_dict()),
            f"shard_log_rank_{rank}": pickle.dumps(self.trainer.shard_log),
            f"rng_rank_{rank}": pickle.dumps(torch.get_rng_state()),
            **self.trainer.lineage.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.trainer.guard.load_state_dict(pickle.loads(state["guard"]))
        key = f"shard_log_rank_{rank}" if f"shard_log_rank_{rank}" in state else "shard_log"  # older: one log
        if key in state:
            entries = pickle.loads(state[key])  # step -> {shard: domain}; older checkpoints: [shard]
            self.trainer.shard_log = {st: v if isinstance(v, dict) else dict.fromkeys(v, "") for st, v in entries.items()}
        if f"rng_rank_{rank}" in state:
            torch.set_rng_state(pickle.loads(state[f"rng_rank_{rank}"]))
        self.trainer.lineage.load_state_dict(state)


class HeadwaterTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        headwater: RunOptions = field(default_factory=RunOptions)

    def __init__(self, config: Config):
        opts = config.headwater
        try:  # fail fast, on every rank: with no keyring no control could be verified
            verifier = ControlVerifier.from_env() if opts.bootstrap else None
            manifest_key = load_signing_key("trainer", required=False)  # signs checkpoint manifests
        except SigningError as e:
            raise SystemExit(f"headwater train: {e}") from None
        if opts.run_id and not RUN_ID_PATTERN.fullmatch(opts.run_id):  # controls could never name it
            raise SystemExit(f"headwater train: run id {opts.run_id!r} must match {RUN_ID_PATTERN.pattern}")
        from trainer.vocab_info import unified_vocab

        self.vocab = unified_vocab()
        if opts.vocab_size > 0 and opts.vocab_size != config.model_spec.model.vocab_size:
            from trainer.models import model_registry
            from trainer.models.dense_attention import DenseMaskAttention

            inner = config.model_spec.model.first_attention.inner_attention
            backend = "cpu" if isinstance(inner, DenseMaskAttention.Config) else "auto"
            config.model_spec = model_registry(config.model_spec.flavor, vocab_size=opts.vocab_size, attn_backend=backend)
        self.run_id = opts.run_id or f"run-{uuid.uuid4().hex[:8]}"
        super().__init__(config)
        self.vocab_size = config.model_spec.model.vocab_size
        self.dataloader.buffers.vocab_size = self.vocab_size if self.dataloader.config.check_vocab else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.run_dir = config.dump_folder
        self.guard = opts.guard.build()
        self.events = EventSink(self.run_dir, bootstrap=opts.bootstrap) if self.rank == 0 else None
        self.finisher = CheckpointFinisher(self.events, key=manifest_key) if self.rank == 0 else None
        self.dataloader.on_corrupt = self._on_corrupt_shard
        # pauses and applied control ids outlive a restart (RUN/control.json); restored before listening
        self.control_state = ControlState(self.run_dir, writer=self.rank == 0,
                                          window_s=verifier.window_s if verifier is not None else 300.0)
        self._restore_control_state(verifier)
        self.control = (ControlListener(opts.bootstrap, verifier=verifier, run_id=self.run_id)
                        if verifier is not None and self.rank == 0 else None)
        self.broker_watch = (BrokerWatch(opts.bootstrap, who=f"trainer {self.run_id} (events, control)",
                                         on_restored=self._on_broker_restored)
                             if opts.bootstrap and self.rank == 0 else None)
        self.metrics_log = (
            MetricsLog(opts.metrics, run_dir=self.run_dir, run_id=self.run_id) if self.rank == 0 else None
        )
        if not isinstance(self.checkpointer, HeadwaterCheckpointManager):
            raise TypeError("HeadwaterTrainer needs checkpoint=HeadwaterCheckpointManager.Config(...)")
        self.checkpointer.states["headwater"] = _ExtraState(self)
        self.checkpointer.before_save = lambda step: self._read_pending()  # the checkpoint has seen its step
        self.checkpointer.after_save = lambda step: self._on_checkpoint_saved()
        self.step_stats = StepStats(self.device, tp=self.parallel_dims.tp)
        for opt in self.optimizers.optimizers:
            opt.register_step_pre_hook(self._before_optimizer_step)
        self.quarantine = Quarantine(self.run_dir, writer=self.rank == 0)
        self.rollbacks = RollbackJournal(self.run_dir, writer=self.rank == 0)
        self.shard_log: dict[int, dict[str, str]] = {}  # step -> {shard trained: its domain}
        self.lineage = SourceLineage()  # tokens trained per source (in every checkpoint)
        self.skipped_steps: list[int] = []
        self._step_pending: PendingStep | None = None  # this step's reduction, until the optimizer hook
        self._pending: PendingStep | None = None  # the step whose statistics the host has not read yet
        self._gated_step = -1
        self._control_due = False
        self._step_started = 0.0
        self._lr: dict[str, float] = {}
        self._facts: dict[str, Any] = {}
        self._microbatches = 0

    # -- torchtitan's loop and its hooks -------------------------------------------------
    def train(self):
        """torchtitan's own loop (GC, profiler, process-group timeouts, metrics processor,
        gradient accumulation, validation), after Headwater's start-up: finish a rollback a
        crash interrupted, load the checkpoint rank 0 chose, skip what is quarantined."""
        self._complete_rollback()
        if self.config.checkpoint.load_step == -1:  # newest intact checkpoint; corrupt ones are moved aside
            load_latest_intact(self.checkpointer, run_id=self.run_id, events=self.events)
        else:
            self.checkpointer.load(step=self.config.checkpoint.load_step)
        self._reapply_quarantine()
        self.checkpointer.mark_loaded()  # torchtitan's train() starts with a load: done above
        logger.info(f"run {self.run_id}: training from step {self.step + 1}")
        try:
            super().train()
            self._read_pending()  # the last step's statistics
            self.checkpointer.maybe_wait_for_saving()
            if self.finisher is not None:
                self.finisher.flush()
        finally:
            self.dataloader.close()

    def should_continue_training(self) -> bool:
        """Before every step, on all ranks: announce finished saves, apply control, auto-rollback."""
        if self.finisher is not None:
            self.finisher.poll()  # async saves completed since the last step
        if self._control_due:  # rank 0 had commands one step ago (read from the step vector)
            self._control_due = False
            self._read_pending()  # a rollback must not drop the step still in flight
            self._apply_control(self._collect_commands())
        if self.guard.should_roll_back():
            self._read_pending()
            self._auto_rollback()
        return super().should_continue_training()

    def train_step(self, data_iterator):
        """torchtitan's step; :meth:`forward_backward_step` and the optimizer pre-hook add the rest."""
        self._step_started = time.perf_counter()
        self._lr = self.lr_schedulers.get_metrics()
        self._microbatches = 0
        self._facts = {"started": self._step_started, "shards": {}, "sources": Counter(), "produced_at": [],
                       "wait_s": 0.0, "tokens": 0, "unknown": False}
        self.step_stats.begin(self.dataloader.mixer.domains)
        super().train_step(data_iterator)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        """One micro-batch: strip the loader's ``_meta``, run torchtitan's forward/backward, add the
        per-domain losses on the device; after the last micro-batch enqueue the step's all-reduce.

        Returns the loss for torchtitan's metrics with non-finite values zeroed: the loss guard
        (not torchtitan's crash-on-NaN check) decides what a non-finite step does."""
        dicts = input_dict if isinstance(input_dict, list) else [input_dict]
        label_list = labels if isinstance(labels, list) else [labels]
        metas = [d.pop("_meta") for d in dicts]
        loss = super().forward_backward_step(input_dict=input_dict, labels=labels,
                                             global_valid_tokens=global_valid_tokens)
        pd = self.parallel_dims
        # per-token losses of this micro-batch, in the loader's layout (not under PP or CP)
        token_losses = None if pd.pp_enabled or pd.cp_enabled else self.loss_fn.last_token_losses
        facts = self._facts
        for meta, lab in zip(metas, label_list, strict=True):
            facts["unknown"] |= not self.step_stats.add_microbatch(meta, lab, token_losses)
            facts["shards"].update(meta.shard_domains)
            facts["sources"].update(meta.doc_sources)
            self.lineage.add(meta.source_tokens, meta.license_tokens)
            facts["produced_at"] += [p for p in meta.produced_at if p > 0]
            facts["wait_s"] += meta.wait_s
            facts["tokens"] += lab.numel()
        self._microbatches += 1
        if self._microbatches == self.gradient_accumulation_steps:
            available = dict(self.dataloader.buffers.available)  # filled by the prefetch thread
            facts["tokens_seen"] = self.ntokens_seen  # the record is written a step later
            self._step_pending = self.step_stats.finish(
                step=self.step, params=[p for m in self.model_parts for p in m.parameters()],
                available=available,
                control_pending=self.control is not None and self.control.pending(),
                unknown_domains=facts["unknown"] or bool(set(available) - set(self.step_stats.domains)),
                facts=facts)
        loss = loss.detach()
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Optimizer pre-hook (once per step): read the previous step, then gate this one on the device.

        The previous step's vector is read here, after this step's forward/backward was queued
        behind it, so the host waits only for work already done. This step's loss is compared
        with the guard's limit on the device; a refused step is skipped by the fused optimizer
        (``found_inf``), with no host sync. A non-fused optimizer needs the decision on the host:
        one scalar read per step, the only sync left on that path."""
        if self._gated_step == self.step:
            return
        self._gated_step = self.step
        current, self._step_pending = self._step_pending, None
        self._read_pending()
        self._pending = current
        if current is None:
            return
        ok = current.gate(self.guard.limit())
        found_inf = (~ok).to(torch.float32)
        fused = [o for o in self.optimizers.optimizers if o.defaults.get("fused")]
        for o in fused:
            o.found_inf = found_inf
        if len(fused) < len(self.optimizers.optimizers) and not bool(ok):
            for o in self.optimizers.optimizers:  # a parameter without a gradient is not stepped
                if not o.defaults.get("fused"):
                    for group in o.param_groups:
                        for p in group["params"]:
                            p.grad = None

    def _read_pending(self) -> None:
        """Book the pending step on the host (all ranks together): guard, mixer, shard log,
        control flag, metrics record. Waits only for that step's reduction."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        r = pending.read()
        if not r.domains_agree or r.new_domains:  # rare: agree on the domain list over ranks
            names = set(self.dataloader.mixer.domains) | set(self.dataloader.buffers.available)
            self.dataloader.mixer.add_domains(self._union_over_ranks(names))
        facts, step = pending.facts, pending.step
        loss = r.loss
        reason = self.guard.record(loss if math.isfinite(r.grad_norm) else float("nan"), accepted=r.ok)
        if reason is None:
            self.dataloader.mixer.observe(r.loss_sum, r.tokens, r.docs, r.available)
        else:
            self.skipped_steps.append(step)
            shards = sorted(self._union_over_ranks(set(facts["shards"])))
            logger.warning(f"step {step} skipped by the loss guard: {reason}")
            if self.events is not None:
                self.events.alert("trainer.loss_guard", f"step {step} skipped: {reason}", evidence={
                    "step": step, "loss": loss if math.isfinite(loss) else str(loss), "shards": shards,
                    "run_id": self.run_id})
        self._control_due |= r.control_pending
        self.shard_log[step] = dict(facts["shards"])
        for old in [s for s in self.shard_log if s <= step - SHARD_LOG_STEPS]:
            del self.shard_log[old]
        if self.rank == 0:
            self._write_metrics(step, r, facts, reason)

    def _write_metrics(self, step: int, r: StepReading, facts: dict[str, Any], reason: str | None) -> None:
        """Rank 0: the step's record in RUN/metrics.jsonl (+ wandb) and on the metrics topic.

        Losses, tokens and the gradient norm are over all ranks; shards, sources, freshness and
        data wait are rank 0's own (gathering them every step would cost a host sync)."""
        now, started = time.time(), facts["started"]
        step_s = (self._step_started if self._step_started > started else time.perf_counter()) - started
        dp = self.parallel_dims.dp_shard * self.parallel_dims.dp_replicate
        batch_tokens = facts["tokens"] * dp
        loss = r.loss
        rec = {
            "step": step,
            "loss": loss if math.isfinite(loss) else None,
            "domain_loss": {d: r.loss_sum[d] / r.tokens[d] for d in sorted(r.tokens) if r.tokens[d] > 0},
            "domain_tokens": {d: r.tokens[d] for d in sorted(r.tokens)},
            "weights": self.dataloader.mixer.weight_dict(),
            "tokens": batch_tokens,
            "tokens_seen": facts["tokens_seen"] * dp,
            "tokens_per_s": batch_tokens / step_s if step_s > 0 else 0.0,
            "data_stall": min(1.0, facts["wait_s"] / step_s) if step_s > 0 else 0.0,
            "data_wait_s": facts["wait_s"],
            **freshness(facts["produced_at"], now),  # freshness_s (median age), freshness_p95_s
            "skipped_stale": self.dataloader.buffers.skipped(),  # rank 0's shards/samples skipped (backlog, max_lag_s)
            "grad_norm": r.grad_norm if math.isfinite(r.grad_norm) else None,
            "lr": float(next(iter(self._lr.values()))) if self._lr else None,
            "skipped": reason is not None,
            "paused": sorted(self.dataloader.paused),
            "data_status": self.dataloader.status,
            "shards": sorted(facts["shards"]),
            "sources": dict(facts["sources"]),
            "wall_time": now,
        }
        mfu = self._mfu(rec["tokens_per_s"])
        if mfu is not None:
            rec["mfu"] = mfu
        logger.info(
            f"step {step:5d} loss {loss:.4f} tok/s {rec['tokens_per_s']:.0f} stall {rec['data_stall']:.1%} weights "
            + " ".join(f"{d}={w:.2f}" for d, w in rec["weights"].items()) + (f" SKIPPED ({reason})" if reason else ""))
        self.metrics_log.write(rec)
        if self.events is not None:
            flat = {k: rec[k] for k in ("loss", "tokens_per_s", "data_stall", "data_wait_s", "grad_norm",
                                        "freshness_s", "freshness_p95_s") if rec[k] is not None}
            flat["skipped"] = float(rec["skipped"])
            flat.update({f"weight/{d}": w for d, w in rec["weights"].items()})
            flat.update({f"loss/{d}": v for d, v in rec["domain_loss"].items()})
            self.events.metrics(step, flat, labels={"run_id": self.run_id})

    def _mfu(self, tokens_per_s: float) -> float | None:
        if utils.device_type != "cuda":
            return None
        peak = utils.get_peak_flops(self.metrics_processor.device_memory_monitor.device_name)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return 100.0 * self.metrics_processor.num_flops_per_token * tokens_per_s / (peak * world)

    # -- checkpoints -----------------------------------------------------------------
    def _step_dir(self, step: int) -> str:
        return os.path.join(self.checkpointer.folder, f"step-{step}")

    def _on_checkpoint_saved(self) -> None:
        cursor = self.dataloader.cursor_summary()
        lineage = self.lineage.totals()  # a collective: before the rank check
        good = self.guard.trips_since_checkpoint == 0
        self.guard.trips_since_checkpoint = 0
        if self.rank != 0:
            return
        info = {
            "config": self.config.headwater.config_name, "step": self.step, "run_id": self.run_id,
            "tokens": self.ntokens_seen * self.parallel_dims.dp_shard * self.parallel_dims.dp_replicate,
            "vocab_size": self.vocab_size, "vocab_version": self.vocab.version,
            "seq_len": self.config.training.seq_len, "good": good, "wall_time": time.time(),
            "data_cursor": cursor, "weights": self.dataloader.mixer.weight_dict(), "lineage": lineage,
        }
        path = os.path.abspath(self._step_dir(self.step))
        self.finisher.add(path, info, CheckpointSaved(
            run_id=self.run_id, path=path, step=self.step, tokens=info["tokens"],
            vocab_version=self.vocab.version, tokenizer_version=self.vocab.version,
            data_cursor=cursor, wall_time=info["wall_time"], lineage=lineage,
        ))
        self.finisher.poll()  # a synchronous save is complete now

    def _checkpoint_steps(self, *, good_only: bool) -> list[int]:
        steps = []
        for meta in glob.glob(os.path.join(self.checkpointer.folder, "step-*", "headwater.json")):
            if not os.path.isfile(os.path.join(os.path.dirname(meta), ".metadata")):
                continue  # DCP has not finished it (the finisher writes headwater.json after .metadata anyway)
            step = int(re.search(r"step-(\d+)", meta).group(1))
            if good_only:
                with open(meta) as f:
                    if not json.load(f).get("good", True):
                        continue
            steps.append(step)
        return sorted(steps)

    # -- control ---------------------------------------------------------------------
    def _collect_commands(self) -> list[dict[str, Any]]:
        if not self.config.headwater.bootstrap:
            return []
        # rank 0's listener state goes with the commands: if it died, every rank stops at this
        # step (raising on rank 0 alone would leave the others waiting in the next collective)
        dead = self.control is not None and self.control.error is not None
        box = [(dead, [e.to_dict() for e in self.control.drain()] if self.control is not None else [])]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        dead, commands = box[0]
        if dead:
            if self.control is not None:
                self.control.check()  # rank 0: raises with the listener thread's error
            raise RuntimeError("the control listener on rank 0 died; every rank stops at this step")
        return commands

    def _apply_control(self, commands: list[dict[str, Any]]) -> None:
        # quarantines first: a rollback arriving in the same drain then restores around them
        seen: set[str] = set()
        for raw in sorted(commands, key=lambda c: c["command"] == "rollback"):
            cmd = Control.from_dict(raw)
            if cmd.control_id in seen:  # delivered twice in one drain
                continue
            seen.add(cmd.control_id)
            logger.warning(f"[control] {cmd.command} {cmd.args} ({cmd.reason})")
            reason = f"{cmd.reason or 'control message'} [control {cmd.control_id} by {cmd.issued_by or '?'}]"
            try:
                if cmd.command == "pause_domain":
                    self.dataloader.paused.add(str(cmd.args["domain"]))
                elif cmd.command == "resume_domain":
                    self.dataloader.paused.discard(str(cmd.args["domain"]))
                elif cmd.command == "quarantine_shards":
                    self._quarantine(shards=set(map(str, cmd.args["shards"])), reason=reason)
                elif cmd.command == "quarantine_source":
                    self._quarantine(sources={str(cmd.args["source"])}, reason=reason)
                elif cmd.command == "rollback":
                    self._rollback(cmd.args, reason=reason, control_id=cmd.control_id)
            except (KeyError, TypeError, ValueError) as e:
                self._refuse(cmd, f"bad args: {type(e).__name__}: {e}")
        if commands:
            self.control_state.record(paused=self.dataloader.paused,
                                      applied={c["control_id"]: float(c["issued_at"]) for c in commands})

    def _restore_control_state(self, verifier: ControlVerifier | None) -> None:
        """Pauses and applied control ids of RUN/control.json, before the listener starts: a
        restart keeps the pauses and a replay of a control applied before is still refused."""
        self.dataloader.paused |= self.control_state.paused
        if verifier is not None:
            verifier.seen.update(self.control_state.applied)

    def _refuse(self, cmd: Control, why: str) -> None:
        logger.error(f"[control] {cmd.command} refused: {why}")
        if self.events is not None:
            self.events.alert("trainer.control_refused", f"{cmd.command} {cmd.args} refused: {why}",
                              severity="critical", evidence={"control_id": cmd.control_id, "run_id": self.run_id})

    def _auto_rollback(self) -> None:
        self._rollback({"target": "last_good"}, reason=f"{self.guard.spikes} loss spikes")
        self.guard.reset_spikes()

    def _rollback(self, args: dict[str, Any], *, reason: str, control_id: str = "") -> None:
        """Restore a checkpoint: ``args`` as in trainer/control.py (the shape evaluators/rollback.py sends).

        A no-op for a control id already applied, and for a rollback to the step the run is at
        right after a rollback to that same step. Crash-atomic: the intent goes to the rollback
        journal before anything changes, and :meth:`_complete_rollback` finishes it on restart.
        """
        if control_id and self.rollbacks.is_applied(control_id):
            logger.warning(f"[rollback] control {control_id} was already applied: ignored")
            return
        target = args.get("target", "last_good")
        if target not in ("last_good", "step"):
            raise ValueError(f"target must be 'last_good' or 'step', got {target!r}")
        if args.get("step") is not None:
            steps = [s for s in self._checkpoint_steps(good_only=False) if s == int(args["step"])]
        elif target == "step":
            raise ValueError("target 'step' needs a step")
        else:  # no evaluator verdict: the trainer's own last good (no guard trips before it)
            steps = self._checkpoint_steps(good_only=True)
        steps = [s for s in steps if s <= self.step]
        if steps and args.get("checkpoint") and os.path.abspath(args["checkpoint"]) != os.path.abspath(
                self._step_dir(steps[-1])):
            raise ValueError(f"checkpoint {args['checkpoint']!r} is not this run's step-{steps[-1]}")
        if not steps:
            if self.events is not None:
                self.events.alert("trainer.rollback_failed", f"no checkpoint for rollback {args} ({reason})",
                                  severity="critical", evidence={"step": self.step, "run_id": self.run_id})
            return
        to_step, from_step = steps[-1], self.step
        control_id = control_id or f"auto-{uuid.uuid4().hex[:12]}"
        source = args.get("only_if_trained_on")
        if isinstance(source, str) and source:  # every rank applies controls at the same step: a collective is safe
            name = canonical_source(source)
            trained = sum(n for s, n in self.lineage.total().items() if canonical_source(s) == name)
            if not trained:
                self.rollbacks.skip(control_id, to_step=to_step, from_step=from_step)
                logger.warning(f"[rollback] {control_id}: this run never trained on source {source!r}: no rollback")
                return
        last = self.rollbacks.last
        if to_step == from_step and last is not None and last["to_step"] == to_step:
            self.rollbacks.skip(control_id, to_step=to_step, from_step=from_step)
            logger.warning(f"[rollback] already at step {to_step} since rollback {last['control_id']}: "
                           f"{control_id} is a no-op")
            return
        shards: set[str] = set()
        if args.get("quarantine", "since") == "since":
            # trained after to_step, or read and waiting in the buffers (bounded by their capacity). With
            # regressed `domains` named, only the data implicated: those domains' shards and those of
            # domains new since to_step (a new domain can harm another's eval); domains trained before
            # to_step that did not regress keep theirs. A shard of unknown domain counts as implicated.
            # each rank logged its own shards: the sets are united over ranks
            keep: set[str] = set()
            if args.get("domains"):
                known = {d for st, names in self.shard_log.items() if st <= to_step for d in names.values()}
                keep = self._union_over_ranks(known) - set(map(str, args["domains"])) - {""}
            trained = {s for st, names in self.shard_log.items() if st > to_step
                       for s, d in names.items() if d not in keep}
            shards = self._union_over_ranks(trained | self.dataloader.pending_shards(keep)) - {""}
            scope = (f" of regressed domain(s) {sorted(map(str, args['domains']))} and domains new since"
                     if keep else "")
            reason = f"{reason}; quarantine: shards{scope} trained or read since step {to_step}"
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", control_id)[:64]
        self.checkpointer.maybe_wait_for_saving()  # an async save in flight must land before its dir moves
        if self.finisher is not None:
            self.finisher.poll()  # ... and be announced if it completed (a moved one is not)
        self.rollbacks.begin({
            "control_id": control_id, "from_step": from_step, "to_step": to_step, "reason": reason,
            "quarantine": sorted(shards), "moves": self._step_dirs_after(to_step),
            "dest": os.path.join(self.checkpointer.folder, "abandoned",
                                 f"rollback-{from_step}-to-{to_step}-{safe_id}")})
        quarantined = self._finish_rollback_intent()
        self.checkpointer.load(step=to_step)
        self._reapply_quarantine()
        logger.warning(f"[rollback] step {from_step} -> {to_step}: {reason}; quarantined {len(quarantined)} shards")
        if self.events is not None:
            self.events.alert("trainer.rollback", f"rolled back from step {from_step} to {to_step}: {reason}",
                              severity="warning", evidence={"from_step": from_step, "to_step": to_step,
                                                            "run_id": self.run_id, "control_id": control_id,
                                                            "quarantined": sorted(quarantined)})
        if self.rank == 0:
            self.metrics_log.write({"step": self.step, "event": "rollback", "from_step": from_step, "to_step": to_step,
                                    "reason": reason, "control_id": control_id,
                                    "quarantined_shards": sorted(quarantined), "wall_time": time.time()})

    def _finish_rollback_intent(self) -> set[str]:
        """Quarantine and move aside what the journal's intent names, then mark it applied (idempotent)."""
        intent = self.rollbacks.intent
        quarantined = set()
        if intent["quarantine"]:
            quarantined = self._quarantine(shards=set(intent["quarantine"]), reason=intent["reason"])
        self._abandon_checkpoints(intent["moves"], intent["dest"])
        self.rollbacks.finish()
        return quarantined

    def _complete_rollback(self) -> None:
        """At start-up: finish a rollback a crash interrupted, before choosing the checkpoint to load."""
        intent = self.rollbacks.intent
        if intent is not None:
            logger.warning(f"[rollback] completing interrupted rollback {intent['control_id']} "
                           f"(step {intent['from_step']} -> {intent['to_step']})")
            self._finish_rollback_intent()
    @staticmethod
    def _union_over_ranks(names: set[str]) -> set[str]:
        if not dist.is_initialized():
            return set(names)
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, set(names))
        return set().union(*out)

    def _quarantine(self, *, shards: set[str] = frozenset(), sources: set[str] = frozenset(),
                    reason: str) -> set[str]:
        new_shards, new_sources = self.quarantine.add(shards=shards, sources=sources, reason=reason, step=self.step)
        if new_shards or new_sources:
            dropped = self.dataloader.quarantine(shards=new_shards, sources=new_sources)
            logger.warning(f"[quarantine] +{len(new_shards)} shards +{len(new_sources)} sources "
                           f"({sorted(new_sources)}), {dropped} buffered samples dropped: {reason}")
            if self.rank == 0:
                self.metrics_log.write({"step": self.step, "event": "quarantine", "shards": sorted(new_shards),
                                        "sources": sorted(new_sources), "dropped_buffered": dropped,
                                        "reason": reason, "wall_time": time.time()})
        return new_shards

    def _reapply_quarantine(self) -> None:
        """After a checkpoint load (restored readers and buffers): skip everything quarantined again."""
        q = self.quarantine
        if q.shards or q.sources:
            dropped = self.dataloader.quarantine(shards=set(q.shards), sources=set(q.sources))
            logger.warning(f"[quarantine] {len(q.shards)} shards, {len(q.sources)} sources excluded, "
                           f"{dropped} buffered samples dropped")

    def _step_dirs_after(self, step: int) -> list[int]:
        """Steps of the checkpoint directories beyond ``step``, complete or not."""
        found = (re.fullmatch(r"step-(\d+)", os.path.basename(p)) for p in glob.glob(os.path.join(self.checkpointer.folder, "step-*")))
        return sorted(s for s in (int(m.group(1)) for m in found if m) if s > step)

    def _abandon_checkpoints(self, steps: list[int], dest: str) -> None:
        """Move checkpoints of the abandoned branch into ``dest`` (unique per rollback) so a restart never
        resumes from them; steps already moved (a rollback completed after a crash) are skipped."""
        if self.rank == 0:
            os.makedirs(dest, exist_ok=True)
            for s in steps:
                if os.path.isdir(self._step_dir(s)) and not os.path.exists(os.path.join(dest, f"step-{s}")):
                    os.rename(self._step_dir(s), os.path.join(dest, f"step-{s}"))
        if dist.is_initialized():
            dist.barrier()

    def _on_corrupt_shard(self, root: str, shard: str, reason: str) -> None:
        if self.events is not None:
            self.events.alert("trainer.corrupt_shard", f"corrupt shard {shard} skipped: {reason}",
                              evidence={"stream_root": root, "shard": shard, "reason": reason, "run_id": self.run_id})
        elif self.rank != 0:
            logger.warning(f"[rank {self.rank}] corrupt shard {shard} skipped: {reason}")

    def _on_broker_restored(self, down_s: float) -> None:
        self.events.alert("kafka.broker_unreachable", f"Kafka broker {self.config.headwater.bootstrap} did not "
                          f"answer for {down_s:.0f}s; events were held back and control was not received meanwhile",
                          evidence={"duration_s": down_s, "run_id": self.run_id, "step": self.step})

    def close(self) -> None:
        for closer in (self.broker_watch, self.control, self.events, self.metrics_log):
            if closer is not None:
                closer.close()
        super().close()

