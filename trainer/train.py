"""HeadwaterTrainer: torchtitan's Trainer on live streams with online mixing, guards and control.

What it adds to ``torchtitan.trainer.Trainer``:
- per-domain losses each step (reduced over data-parallel ranks) feeding the Mixer;
- a NaN/spike guard that skips the optimizer step, alerts, and after N spikes rolls back;
- control commands (rollback, pause/resume domain, quarantine shards) applied by all ranks
  at the same step;
- RUN/metrics.jsonl + wandb + ``metrics`` topic every step; ``headwater.json`` beside each DCP
  checkpoint and a CheckpointSaved event on the ``checkpoints`` topic.
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
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools import utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from streams.events import CheckpointSaved, Control
from trainer.control import ControlListener
from trainer.events_out import EventSink
from trainer.guard import LossGuard
from trainer.metrics_log import MetricsLog

__all__ = ["HeadwaterTrainer", "RunOptions"]


@dataclass(kw_only=True, slots=True)
class RunOptions:
    """Headwater-specific options of a training run."""

    config_name: str = "debug_cpu"
    run_id: str = ""
    vocab_size: int = 0
    """0: the unified vocabulary size (streams.vocab); >0 overrides (synthetic test streams)"""
    bootstrap: str = ""
    """Kafka bootstrap; empty: no topics (files under the run dir only)"""
    guard: LossGuard.Config = field(default_factory=LossGuard.Config)
    metrics: MetricsLog.Config = field(default_factory=MetricsLog.Config)


class _ExtraState(Stateful):
    """Guard state (same on all ranks) and each rank's torch RNG state, saved in every checkpoint."""

    def __init__(self, trainer: HeadwaterTrainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {
            "guard": pickle.dumps(self.trainer.guard.state_dict()),
            f"rng_rank_{rank}": pickle.dumps(torch.get_rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.trainer.guard.load_state_dict(pickle.loads(state["guard"]))
        if f"rng_rank_{rank}" in state:
            torch.set_rng_state(pickle.loads(state[f"rng_rank_{rank}"]))


class HeadwaterTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        headwater: RunOptions = field(default_factory=RunOptions)

    def __init__(self, config: Config):
        opts = config.headwater
        from trainer.vocab_info import unified_vocab

        self.vocab = unified_vocab()
        if opts.vocab_size > 0 and opts.vocab_size != config.model_spec.model.vocab_size:
            from trainer.models import model_registry
            from trainer.models.dense_attention import DenseMaskAttention

            inner = config.model_spec.model.first_attention.inner_attention
            backend = "cpu" if isinstance(inner, DenseMaskAttention.Config) else "flex"
            config.model_spec = model_registry(config.model_spec.flavor, vocab_size=opts.vocab_size, attn_backend=backend)
            config.loss.global_vocab_size = opts.vocab_size
        self.run_id = opts.run_id or f"run-{uuid.uuid4().hex[:8]}"
        super().__init__(config)
        self.vocab_size = config.model_spec.model.vocab_size
        self.dataloader.buffers.vocab_size = self.vocab_size if self.dataloader.config.check_vocab else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.run_dir = config.dump_folder
        self.guard = opts.guard.build()
        self.events = EventSink(self.run_dir, bootstrap=opts.bootstrap) if self.rank == 0 else None
        self.dataloader.on_corrupt = self._on_corrupt_shard
        self.control = ControlListener(opts.bootstrap, run_id=self.run_id) if opts.bootstrap and self.rank == 0 else None
        self.metrics_log = (
            MetricsLog(opts.metrics, run_dir=self.run_dir, run_id=self.run_id) if self.rank == 0 else None
        )
        self.checkpointer.states["headwater"] = _ExtraState(self)
        self.quarantined: set[str] = set()
        self.skipped_steps: list[int] = []
        self._meta = None
        self._step_record: dict[str, Any] = {}

    # -- data plumbing ---------------------------------------------------------------
    def post_dataloading_process(self, input_dict, labels):
        self._meta = input_dict.pop("_meta", None)
        return super().post_dataloading_process(input_dict, labels)

    def _dp_group(self):
        if not self.parallel_dims.dp_enabled:
            return None
        return self.parallel_dims.get_mesh("batch").get_group()

    def _gather(self, obj: Any) -> list[Any]:
        group = self._dp_group()
        if group is None:
            return [obj]
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    def _domain_stats(self, labels: torch.Tensor) -> dict[str, Any]:
        meta = self._meta
        token_losses = self.loss_fn.last_token_losses.to("cpu").double()
        valid = (labels.to("cpu") != IGNORE_INDEX)
        idx = meta.domain_idx
        stats: dict[str, Any] = {"loss_sum": {}, "tokens": {}, "docs": {}}
        for i, d in enumerate(meta.domains):
            m = valid & (idx == i)
            stats["loss_sum"][d] = float(token_losses[m].sum())
            stats["tokens"][d] = int(m.sum())
        stats["available"] = dict(self.dataloader.buffers.available)
        stats["trained_docs"] = dict(Counter(meta.doc_domains))
        stats["wait_s"] = meta.wait_s
        stats["produced_at"] = [p for p in meta.produced_at if p > 0]
        stats["shards"] = meta.shards
        stats["batch_tokens"] = int(labels.numel())
        return stats

    # -- one step --------------------------------------------------------------------
    def train_step(self, data_iterator):
        if self.gradient_accumulation_steps != 1 or self.parallel_dims.pp_enabled:
            raise NotImplementedError("HeadwaterTrainer supports one micro-batch per step without PP")
        t0 = time.perf_counter()
        self.optimizers.zero_grad(set_to_none=self.config.training.disable_cuda_graphs)
        lr_metrics = self.lr_schedulers.get_metrics()
        t_data = time.perf_counter()
        input_dict, labels = next(data_iterator)
        data_s = time.perf_counter() - t_data
        local_valid = (labels != IGNORE_INDEX).sum()
        global_valid = (
            dist_utils.dist_sum_tensor(local_valid.to(self.device), self.parallel_dims.get_mesh("batch"))
            if self.parallel_dims.dp_enabled
            else local_valid.to(self.device)
        )
        input_dict = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in input_dict.items()}
        self.forward_backward_step(input_dict=input_dict, labels=labels.to(self.device), global_valid_tokens=global_valid)

        gathered = self._gather(self._domain_stats(labels))
        loss_sum = _sum_dicts(g["loss_sum"] for g in gathered)
        tokens = _sum_dicts(g["tokens"] for g in gathered)
        total_tokens = sum(tokens.values())
        loss = sum(loss_sum.values()) / max(total_tokens, 1)

        grad_norm = dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=self.parallel_dims.get_optional_mesh("pp"),
            ep_enabled=self.parallel_dims.ep_enabled,
        )
        grad_norm_f = float(grad_norm.item())
        reason = self.guard.check(loss if math.isfinite(grad_norm_f) else float("nan"))
        if reason is None:
            self.checkpointer.maybe_wait_for_staging()
            self.optimizers.step()
            self.lr_schedulers.step()
            available = _sum_dicts(g["available"] for g in gathered)
            trained = _sum_dicts(g["trained_docs"] for g in gathered)
            self.dataloader.mixer.observe(loss_sum, tokens, trained, available)
        else:
            self.optimizers.zero_grad(set_to_none=True)
            self.skipped_steps.append(self.step)
            shards = sorted({s for g in gathered for s in g["shards"]})
            if self.events is not None:
                self.events.alert("trainer.loss_guard", f"step {self.step} skipped: {reason}", evidence={
                    "step": self.step, "loss": loss if math.isfinite(loss) else str(loss), "shards": shards,
                    "run_id": self.run_id})
        step_s = time.perf_counter() - t0
        wait_s = max(g["wait_s"] for g in gathered)
        now = time.time()
        produced = [p for g in gathered for p in g["produced_at"]]
        batch_tokens = sum(g["batch_tokens"] for g in gathered)
        self._step_record = {
            "step": self.step,
            "loss": loss if math.isfinite(loss) else None,
            "domain_loss": {d: loss_sum[d] / tokens[d] for d in sorted(tokens) if tokens[d] > 0},
            "domain_tokens": {d: tokens[d] for d in sorted(tokens)},
            "weights": self.dataloader.mixer.weight_dict(),
            "tokens": batch_tokens,
            "tokens_seen": self.ntokens_seen * max(len(gathered), 1),
            "tokens_per_s": batch_tokens / step_s if step_s > 0 else 0.0,
            "data_stall": min(1.0, max(data_s, wait_s) / step_s) if step_s > 0 else 0.0,
            "freshness_s": (now - sum(produced) / len(produced)) if produced else None,
            "grad_norm": grad_norm_f if math.isfinite(grad_norm_f) else None,
            "lr": float(next(iter(lr_metrics.values()))) if lr_metrics else None,
            "skipped": reason is not None,
            "paused": sorted(self.dataloader.paused),
            "data_status": self.dataloader.status,
            "wall_time": now,
        }
        mfu = self._mfu(batch_tokens / step_s if step_s > 0 else 0.0)
        if mfu is not None:
            self._step_record["mfu"] = mfu
        if self.rank == 0:
            logger.info(
                f"step {self.step:5d} loss {loss:.4f} tok/s {self._step_record['tokens_per_s']:.0f} "
                f"stall {self._step_record['data_stall']:.1%} weights "
                + " ".join(f"{d}={w:.2f}" for d, w in self._step_record["weights"].items())
                + (f" SKIPPED ({reason})" if reason else "")
            )

    def _mfu(self, tokens_per_s: float) -> float | None:
        if utils.device_type != "cuda":
            return None
        peak = utils.get_peak_flops(self.metrics_processor.device_memory_monitor.device_name)
        world = dist.get_world_size() if dist.is_initialized() else 1
        return 100.0 * self.metrics_processor.num_flops_per_token * tokens_per_s / (peak * world)

    # -- loop ------------------------------------------------------------------------
    def train(self):
        config = self.config
        self.checkpointer.load(step=config.checkpoint.load_step)
        self._reapply_quarantine()
        logger.info(f"Training starts at step {self.step + 1} (run {self.run_id})")
        data_iterator = self.batch_generator(self.dataloader)
        try:
            while self.step < config.training.steps:
                self._apply_control(self._collect_commands())
                self.step += 1
                self.train_step(data_iterator)
                self._write_metrics()
                if self.checkpointer.save(self.step, last_step=self.step == config.training.steps):
                    self._on_checkpoint_saved()
                if self.guard.should_roll_back():
                    self._auto_rollback()
        finally:
            self.dataloader.close()
        logger.info("Training completed")

    def _write_metrics(self) -> None:
        if self.rank != 0:
            return
        rec = self._step_record
        self.metrics_log.write(rec)
        if self.events is not None:
            flat = {"loss": rec["loss"] or float("nan"), "tokens_per_s": rec["tokens_per_s"],
                    "data_stall": rec["data_stall"], "grad_norm": rec["grad_norm"] or float("nan")}
            flat.update({f"weight/{d}": w for d, w in rec["weights"].items()})
            flat.update({f"loss/{d}": v for d, v in rec["domain_loss"].items()})
            if rec["freshness_s"] is not None:
                flat["freshness_s"] = rec["freshness_s"]
            self.events.metrics(self.step, flat)

    # -- checkpoints -----------------------------------------------------------------
    def _step_dir(self, step: int) -> str:
        return os.path.join(self.checkpointer.folder, f"step-{step}")

    def _on_checkpoint_saved(self) -> None:
        cursor = self.dataloader.cursor_summary()
        good = self.guard.trips_since_checkpoint == 0
        self.guard.trips_since_checkpoint = 0
        if self.rank != 0:
            return
        path = os.path.abspath(self._step_dir(self.step))
        info = {
            "config": self.config.headwater.config_name, "step": self.step, "run_id": self.run_id,
            "tokens": self.ntokens_seen * self.parallel_dims.dp_shard * self.parallel_dims.dp_replicate,
            "vocab_size": self.vocab_size, "vocab_version": self.vocab.version,
            "seq_len": self.config.training.seq_len, "good": good, "wall_time": time.time(),
            "data_cursor": cursor, "weights": self.dataloader.mixer.weight_dict(),
        }
        tmp = os.path.join(path, "headwater.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(path, "headwater.json"))
        self.events.checkpoint(CheckpointSaved(
            run_id=self.run_id, path=path, step=self.step, tokens=info["tokens"],
            vocab_version=self.vocab.version, tokenizer_version=self.vocab.version,
            data_cursor=cursor, wall_time=info["wall_time"],
        ))

    def _checkpoint_steps(self, *, good_only: bool) -> list[int]:
        steps = []
        for meta in glob.glob(os.path.join(self.checkpointer.folder, "step-*", "headwater.json")):
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
        box = [[e.to_dict() for e in self.control.drain()] if self.control is not None else []]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _apply_control(self, commands: list[dict[str, Any]]) -> None:
        for raw in commands:
            cmd = Control.from_dict(raw)
            logger.warning(f"[control] {cmd.command} {cmd.args} ({cmd.reason})")
            if cmd.command == "pause_domain":
                self.dataloader.paused.add(str(cmd.args["domain"]))
            elif cmd.command == "resume_domain":
                self.dataloader.paused.discard(str(cmd.args["domain"]))
            elif cmd.command == "quarantine_shards":
                self.quarantined.update(map(str, cmd.args.get("shards", [])))
                self._reapply_quarantine()
            elif cmd.command == "rollback":
                self.quarantined.update(map(str, cmd.args.get("quarantine_shards", [])))
                for d in cmd.args.get("pause_domains", []):
                    self.dataloader.paused.add(str(d))
                target = cmd.args.get("to_step", "last_good")
                self._rollback(target, reason=cmd.reason or "control message")

    def _auto_rollback(self) -> None:
        self._rollback("last_good", reason=f"{self.guard.spikes} loss spikes")
        self.guard.reset_spikes()

    def _rollback(self, target: int | str, *, reason: str) -> None:
        if target == "last_good":
            steps = [s for s in self._checkpoint_steps(good_only=True) if s <= self.step]
        else:
            steps = [s for s in self._checkpoint_steps(good_only=False) if s == int(target)]
        if not steps:
            if self.events is not None:
                self.events.alert("trainer.rollback_failed", f"no checkpoint for rollback to {target!r} ({reason})",
                                  severity="critical", evidence={"step": self.step, "run_id": self.run_id})
            return
        to_step, from_step = steps[-1], self.step
        self.checkpointer.load(step=to_step)
        self._reapply_quarantine()
        logger.warning(f"[rollback] step {from_step} -> {to_step}: {reason}")
        if self.events is not None:
            self.events.alert("trainer.rollback", f"rolled back from step {from_step} to {to_step}: {reason}",
                              severity="warning", evidence={"from_step": from_step, "to_step": to_step,
                                                            "run_id": self.run_id, "quarantined": sorted(self.quarantined)})
        if self.rank == 0:
            self.metrics_log.write({"step": self.step, "event": "rollback", "from_step": from_step, "to_step": to_step,
                                    "reason": reason, "wall_time": time.time()})

    def _reapply_quarantine(self) -> None:
        if self.quarantined:
            dropped = self.dataloader.quarantine(self.quarantined)
            logger.warning(f"[quarantine] {len(self.quarantined)} shards excluded, {dropped} buffered samples dropped")

    def _on_corrupt_shard(self, root: str, shard: str, reason: str) -> None:
        self.quarantined.add(shard)
        if self.events is not None:
            self.events.alert("trainer.corrupt_shard", f"corrupt shard {shard} skipped: {reason}",
                              evidence={"stream_root": root, "shard": shard, "reason": reason, "run_id": self.run_id})
        elif self.rank != 0:
            logger.warning(f"[rank {self.rank}] corrupt shard {shard} skipped: {reason}")

    def close(self) -> None:
        for closer in (self.control, self.events, self.metrics_log):
            if closer is not None:
                closer.close()
        super().close()


def _sum_dicts(dicts) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out
