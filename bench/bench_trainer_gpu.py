"""One-GPU trainer benchmark (H100/H200, < 8 min): tokens/s, MFU, peak memory, data stall, attention kernels.

Arms, each on a freshly initialised model of ``--flavor`` (1b: 4 x 8192 tokens per step, bf16
parameters, fp32 AdamW states, the chunked loss of trainer/loss.py compiled):

- ``flash/memory``: the flash varlen attention (trainer/models/attention_select.py: flash-attn-4,
  flash-attn 2 or torch's own varlen kernel, whichever imports) fed from pre-built device batches;
- ``flex/memory``: FlexAttention with torchtitan's document block mask, same batches;
- ``<best>/live``: the faster attention fed by the live MDS loader (trainer/data) reading a
  synthetic stream written before the arm, with the mixer on: its data stall is the share of step
  time spent waiting in ``next(loader)``.

Per arm: ``--warmup`` untimed steps (compilation), then ``--steps`` timed steps, each ended by
``torch.cuda.synchronize()``. MFU = flops per token x tokens/s / peak bf16 flops, with flops per
token = 6 x matmul parameters + 12 x layers x heads x head_dim x seq_len (the PaLM/torchtitan
convention: attention counted as if unmasked; packed documents make the real attention work
smaller). Peak memory is ``torch.cuda.max_memory_allocated`` of the arm.

``--dry-run`` runs every arm on the CPU with the debug_cpu model and the dense CPU attention
(a few steps of 2 x 128 tokens) so the script is exercised without a GPU.

    PYTHONPATH=. python bench/bench_trainer_gpu.py --out bench_gpu.json            # on the GPU
    PYTHONPATH=. .venv/bin/python bench/bench_trainer_gpu.py --dry-run              # CPU check
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core flops (SXM datasheets)
SYNTH_VOCAB = 512  # token ids of the synthetic stream (the model keeps its full vocabulary)


@dataclass
class ArmResult:
    arm: str
    attention: str
    loader: str
    tokens_per_s: float
    step_s: float
    mfu: float | None
    peak_mem_gib: float | None
    data_stall: float
    final_loss: float


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build(flavor: str, vocab: int, backend: str, device: torch.device, *, compile_loss: bool):
    """Model (bf16 on CUDA), fused AdamW and the chunked loss wired to the model's lm_head."""
    from torchtitan.config import CompileConfig

    from trainer.loss import ChunkedTokenLoss
    from trainer.models.qwen import qwen_config

    torch.manual_seed(0)
    config = qwen_config(flavor, vocab_size=vocab, attn_backend=backend)
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    loss_fn = ChunkedTokenLoss.Config().build(
        compile_config=CompileConfig(enable=compile_loss, components=["loss"]))
    loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    return model, opt, loss_fn


def flops_per_token(model, flavor: str, seq_len: int) -> float:
    from trainer.models.qwen import FLAVORS

    s = FLAVORS[flavor]
    params = sum(p.numel() for p in model.parameters())
    if not s.tied_embeddings:  # the input embedding is a lookup, not a matmul
        params -= model.tok_embeddings.weight.numel()
    return 6 * params + 12 * s.n_layers * s.n_heads * s.head_dim * seq_len


def memory_batches(n: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> list:
    """Pre-built packed batches: documents of 256-4096 tokens, positions restarting at each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, SYNTH_VOCAB, (batch, seq_len + 1), generator=g)
        positions = torch.empty(batch, seq_len, dtype=torch.long)
        for row in range(batch):
            i = 0
            while i < seq_len:
                span = min(int(torch.randint(256, 4097, (1,), generator=g)), seq_len - i)
                positions[row, i:i + span] = torch.arange(span)
                i += span
        inputs = {"input": tokens[:, :-1].to(device), "positions": positions.to(device)}
        out.append((inputs, tokens[:, 1:].to(device)))
    return out


def live_batches(root: str, batch: int, seq_len: int, vocab: int) -> Iterator:
    from trainer.data import LiveStreamDataLoader
    from trainer.mixing import Mixer

    cfg = LiveStreamDataLoader.Config(stream_roots=[root], mixing=Mixer.Config(policy="learnability"))
    loader = LiveStreamDataLoader(cfg, dp_world_size=1, dp_rank=0, seq_len=seq_len, local_batch_size=batch,
                                  vocab_size=vocab)
    for inputs, labels in loader:
        inputs.pop("_meta", None)
        yield inputs, labels


def run_arm(name: str, args, backend: str, batches, device: torch.device) -> ArmResult:
    model, opt, loss_fn = build(args.flavor, args.vocab, backend, device, compile_loss=device.type == "cuda")
    fpt = flops_per_token(model, args.flavor, args.seq_len)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    it = iter(batches)
    step_times, waits, loss = [], [], float("nan")
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        inputs, labels = next(it)
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        labels = labels.to(device, non_blocking=True)
        t_data = time.perf_counter() - t0
        masks = model.get_attention_masks(inputs["positions"])
        hidden = model(inputs["input"], positions=inputs["positions"], attention_masks=masks)
        valid = (labels >= 0).sum()
        out, _ = loss_fn(hidden, labels, valid)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            waits.append(t_data)
        loss = float(out)
    step_s = sum(step_times) / len(step_times)
    tokens_per_s = args.batch * args.seq_len / step_s
    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((flops for chip, flops in PEAK_BF16.items() if chip in name), None)
    result = ArmResult(
        arm=name, attention=backend if backend != "flash_varlen" else _flash_name(), loader=name.split("/")[1],
        tokens_per_s=round(tokens_per_s, 1), step_s=round(step_s, 4),
        mfu=round(fpt * tokens_per_s / peak, 4) if peak else None,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        data_stall=round(sum(waits) / sum(step_times), 4), final_loss=round(loss, 4),
    )
    del model, opt, loss_fn
    return result


def _flash_name() -> str:
    from trainer.models.attention_select import find_flash_kernel

    kernel = find_flash_kernel()
    return f"flash_varlen ({kernel.name})" if kernel else "flash_varlen (none)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=0, help="model vocabulary (0: the unified vocabulary)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, debug_cpu model, dense CPU attention, tiny steps")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    if args.dry_run:
        from trainer import cpu_compat

        cpu_compat.install()
        args.flavor, args.seq_len, args.batch, args.steps, args.warmup = "debug_cpu", 128, 2, 2, 1
        args.vocab = args.vocab or SYNTH_VOCAB
    if not args.vocab:
        from trainer.vocab_info import unified_vocab

        args.vocab = unified_vocab().size
    device = torch.device("cpu") if args.dry_run else _device()
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("bench_trainer_gpu: no CUDA device (use --dry-run for the CPU check)")

    from trainer.models.attention_select import find_flash_kernel

    backends = ["cpu"] if args.dry_run else (["flash_varlen"] if find_flash_kernel() else []) + ["flex"]
    n = args.warmup + args.steps
    batches = memory_batches(n, args.batch, args.seq_len, device)
    results: list[ArmResult] = []
    for backend in backends:
        results.append(run_arm(f"{backend}/memory", args, backend, batches, device))
        print(json.dumps(asdict(results[-1])), flush=True)
    best = max(results, key=lambda r: r.tokens_per_s)
    best_backend = next(b for b in backends if best.arm.startswith(b))
    with tempfile.TemporaryDirectory() as root:
        from trainer.synthetic import write_stream

        docs_needed = math.ceil(n * args.batch * args.seq_len / 200) * 2  # synthetic docs are ~100-300 tokens
        per_shard = 500
        write_stream(root, domains={"markov": "markov", "counting": "counting", "wide": "wide_markov"},
                     shards=max(3, math.ceil(docs_needed / per_shard)), per_shard=per_shard, vocab=SYNTH_VOCAB)
        results.append(run_arm(f"{best_backend}/live", args, best_backend,
                               live_batches(root, args.batch, args.seq_len, args.vocab), device))
        print(json.dumps(asdict(results[-1])), flush=True)
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "flavor": args.flavor, "seq_len": args.seq_len, "batch": args.batch,
               "steps": args.steps, "arms": [asdict(r) for r in results]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
