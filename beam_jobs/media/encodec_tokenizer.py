"""EnCodec 24 kHz RVQ tokenizer: frame-aligned chunking, batched inference, local weights only.

Bandwidth picks the number of codebooks (1.5/3/6/12/24 kbps -> 2/4/8/16/32 at 75 frames/s).
Long audio is cut into chunks of whole EnCodec frames (hop 320 samples) and the chunks are
encoded as one padded batch, so memory is bounded by ``chunk_seconds × batch_size`` instead
of the file length. The 24 kHz model is causal, so right-padding never changes earlier codes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["BANDWIDTH_LEVELS", "FRAME_RATE", "HOP", "SAMPLE_RATE", "EncodecTokenizer"]

SAMPLE_RATE = 24_000
HOP = 320
FRAME_RATE = SAMPLE_RATE // HOP  # 75
BANDWIDTH_LEVELS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}


class EncodecTokenizer:
    """Audio -> codes[levels, frames] with EnCodec; build with :class:`EncodecTokenizer.Config`."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        bandwidth: float = 6.0
        checkpoint: str | None = None  # local state_dict path; None -> random init (tests, benches)
        seed: int = 0  # random-init seed, part of the version string
        chunk_seconds: float = 10.0
        batch_size: int = 0  # chunks per forward pass; 0 -> 1 on CPU (batching is slower there), 16 on GPU
        device: str = "auto"  # "auto" -> cuda when available
        threads: int | None = None  # torch intra-op threads (None: leave as is)

        def build(self) -> EncodecTokenizer:
            return EncodecTokenizer(self)

        def version(self) -> str:
            """The tokenizer's version string, without building the model."""
            if self.checkpoint:
                path = Path(self.checkpoint)
                if not path.is_file():
                    raise FileNotFoundError(f"EnCodec checkpoint {path} not found")
                weights = "ckpt-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            else:
                weights = f"random-seed{self.seed}"
            return f"encodec_24khz-{self.bandwidth:g}kbps-{weights}"

    def __init__(self, config: EncodecTokenizer.Config):
        from encodec import EncodecModel

        if config.bandwidth not in BANDWIDTH_LEVELS:
            raise ValueError(f"bandwidth {config.bandwidth} not in {sorted(BANDWIDTH_LEVELS)}")
        self.config = config
        self.levels = BANDWIDTH_LEVELS[config.bandwidth]
        self.chunk = max(1, round(config.chunk_seconds * FRAME_RATE)) * HOP
        if config.threads:
            torch.set_num_threads(config.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = EncodecModel.encodec_model_24khz(pretrained=False)
        if config.checkpoint:
            path = Path(config.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"EnCodec checkpoint {path} not found")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            _random_codebooks(model, config.seed)
        model.set_target_bandwidth(config.bandwidth)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = config.batch_size or (16 if self.device.type == "cuda" else 1)
        self.version = config.version()

    def frames_for(self, n_samples: int) -> int:
        """Number of code frames EnCodec emits for ``n_samples`` samples."""
        return -(-n_samples // HOP)

    @torch.inference_mode()
    def encode_many(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """Encode mono float32 24 kHz waveforms; returns int16 codes[levels, frames] per input."""
        pieces: list[tuple[int, np.ndarray]] = []  # (owner, chunk)
        for i, wav in enumerate(wavs):
            for start in range(0, max(wav.size, 1), self.chunk):
                pieces.append((i, wav[start : start + self.chunk]))
        out: list[list[np.ndarray]] = [[] for _ in wavs]
        bs = self.batch_size
        for b in range(0, len(pieces), bs):
            batch = pieces[b : b + bs]
            width = max(p.size for _, p in batch)
            width = -(-width // HOP) * HOP
            x = np.zeros((len(batch), 1, width), np.float32)
            for j, (_, p) in enumerate(batch):
                x[j, 0, : p.size] = p
            (codes, _scale), = self.model.encode(torch.from_numpy(x).to(self.device))
            codes = codes.to("cpu", torch.int16).numpy()
            for j, (owner, p) in enumerate(batch):
                out[owner].append(codes[j, :, : self.frames_for(p.size)])
        return [np.concatenate(c, axis=1) for c in out]

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """Encode one waveform; codes[levels, frames]."""
        return self.encode_many([wav])[0]

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Reconstruct a waveform from codes[levels, frames] (for reconstruction-error health)."""
        c = torch.from_numpy(codes.astype(np.int64))[None].to(self.device)
        return self.model.decode([(c, None)])[0, 0].cpu().numpy()


@torch.inference_mode()
def _random_codebooks(model: torch.nn.Module, seed: int) -> None:
    """Give a random-init model usable codebooks (EnCodec's start as zeros awaiting k-means).

    Each level's codebook is sampled from the residual embeddings of seeded noise, as EnCodec's
    own k-means init would start, so codes spread over the codebook instead of collapsing.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, SAMPLE_RATE * 8, generator=g) * torch.rand(1, 1, SAMPLE_RATE * 8, generator=g)
    residual = model.encoder(noise)[0].T  # [frames, dim]
    for layer in model.quantizer.vq.layers:
        cb = layer._codebook
        pick = torch.randint(0, residual.shape[0], (cb.embed.shape[0],), generator=g)
        cb.embed.copy_(residual[pick] + 1e-3 * torch.randn(cb.embed.shape, generator=g))
        cb.inited.fill_(1)
        residual = residual - cb.decode(cb.encode(residual))
