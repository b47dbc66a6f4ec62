"""Run configs for ``--module trainer --config NAME``: ``debug_cpu``, ``1b``, ``10b``.

Each function returns a ``HeadwaterTrainer.Config`` (torchtitan style: runs are Python
functions; CLI flags like ``--training.steps 20`` override fields). ``1b``/``10b`` are
set for H100s (bf16 params, flash-attn varlen or flex attention, torch.compile, selective AC,
FSDP across the node); all use the chunked loss (trainer/loss.py). ``debug_cpu`` is tiny and
uses the CPU attention path so it trains under gloo.
"""

from __future__ import annotations

from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from trainer.checkpointer import HeadwaterCheckpointManager
from trainer.data import LiveStreamDataLoader
from trainer.loss import ChunkedTokenLoss
from trainer.models import model_registry
from trainer.tokenizer import UnifiedVocabTokenizer
from trainer.train import HeadwaterTrainer, RunOptions
from trainer.vocab_info import unified_vocab

__all__ = ["CONFIGS", "debug_cpu"]


def _base(name: str, *, attn_backend: str, lr: float, warmup: int) -> HeadwaterTrainer.Config:
    vocab_size = unified_vocab().size
    return HeadwaterTrainer.Config(
        model_spec=model_registry(name, vocab_size=vocab_size, attn_backend=attn_backend),
        hf_assets_path="",
        loss=ChunkedTokenLoss.Config(),
        tokenizer=UnifiedVocabTokenizer.Config(),
        dataloader=LiveStreamDataLoader.Config(),
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=warmup, decay_ratio=0.8, decay_type="cosine",
                                                  min_lr_factor=0.1),
        metrics=MetricsProcessor.Config(log_freq=10),
        checkpoint=HeadwaterCheckpointManager.Config(enable=True, folder="checkpoints", interval=500,
                                            last_save_model_only=False, keep_latest_k=5),
        debug=DebugConfig(seed=1234),
        headwater=RunOptions(config_name=name),
    )


def debug_cpu() -> HeadwaterTrainer.Config:
    """Tiny model, fp32, CPU attention path; FSDP over all ranks (or TP via --parallelism)."""
    config = _base("debug_cpu", attn_backend="cpu", lr=3e-3, warmup=2)
    config.training = TrainingConfig(local_batch_size=4, seq_len=128, steps=50,
                                     mixed_precision_param="float32", disable_cuda_graphs=True)
    config.activation_checkpoint = None
    config.checkpoint.interval = 10
    config.debug.deterministic = True
    return config


def _h100(name: str, *, seq_len: int, local_batch_size: int, lr: float) -> HeadwaterTrainer.Config:
    config = _base(name, attn_backend="auto", lr=lr, warmup=2000)
    config.training = TrainingConfig(local_batch_size=local_batch_size, seq_len=seq_len, steps=100_000,
                                     mixed_precision_param="bfloat16", disable_cuda_graphs=True)
    config.parallelism = ParallelismConfig(data_parallel_shard_degree=-1)
    config.compile = CompileConfig(enable=True, components=["model", "loss"])
    config.activation_checkpoint = SelectiveAC.Config()
    config.checkpoint.interval = 1000
    config.checkpoint.async_mode = "async"
    return config


def one_b() -> HeadwaterTrainer.Config:
    """~1.1B params (tied embeddings), 8k context, per-GPU batch 4."""
    return _h100("1b", seq_len=8192, local_batch_size=4, lr=3e-4)


def ten_b() -> HeadwaterTrainer.Config:
    """~10.5B params (untied), 8k context, FSDP over 8+ GPUs; add --parallelism.tensor_parallel_degree for >1 node."""
    config = _h100("10b", seq_len=8192, local_batch_size=1, lr=1.5e-4)
    config.activation_checkpoint = FullAC.Config()
    return config


# torchtitan's ConfigManager looks configs up with getattr(module, name): expose "1b"/"10b".
globals()["1b"] = one_b
globals()["10b"] = ten_b
CONFIGS = {"debug_cpu": debug_cpu, "1b": one_b, "10b": ten_b}
