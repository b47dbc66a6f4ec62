"""Audio quality checks: each returns None (keep) or a drop reason; thresholds in one Config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AudioQA", "audio_stats"]


def audio_stats(wav: np.ndarray, rate: int, frame_ms: float = 20.0) -> dict[str, float]:
    """Duration, peak, clipping ratio, active (voice/energy) ratio and an SNR estimate in dB.

    Energy is measured on ``frame_ms`` frames; the noise floor is the 10th percentile of frame
    energy and the signal level the 90th, so SNR = 10·log10(p90/p10).
    """
    duration = wav.size / rate
    if wav.size == 0:
        return {"duration_s": 0.0, "peak": 0.0, "clip_ratio": 0.0, "active_ratio": 0.0, "snr_db": 0.0, "rms": 0.0}
    hop = max(1, int(rate * frame_ms / 1000))
    n = wav.size // hop
    frames = wav[: n * hop].reshape(n, hop) if n else wav.reshape(1, -1)
    energy = (frames.astype(np.float64) ** 2).mean(axis=1) + 1e-12
    floor, level = np.percentile(energy, 10), np.percentile(energy, 90)
    threshold = max(floor * 10 ** (6 / 10), 1e-7)  # 6 dB above the noise floor
    peak = float(np.abs(wav).max())
    return {
        "duration_s": duration,
        "peak": peak,
        "clip_ratio": float((np.abs(wav) >= 0.999).mean()),
        "active_ratio": float((energy > threshold).mean()),
        "snr_db": float(10 * np.log10(level / floor)),
        "rms": float(np.sqrt(energy.mean())),
    }


@dataclass(kw_only=True, slots=True)
class AudioQA:
    """Thresholds for keeping an audio clip."""

    min_seconds: float = 0.5
    max_seconds: float = 600.0
    silence_rms: float = 1e-3
    max_clip_ratio: float = 0.01
    min_active_ratio: float = 0.05
    min_snr_db: float = 3.0

    def check(self, stats: dict[str, float]) -> str | None:
        """The first failing check's reason, or None when the clip passes."""
        if stats["duration_s"] < self.min_seconds:
            return "too_short"
        if stats["duration_s"] > self.max_seconds:
            return "too_long"
        if stats["rms"] < self.silence_rms:
            return "silence"
        if stats["clip_ratio"] > self.max_clip_ratio:
            return "clipping"
        if stats["active_ratio"] < self.min_active_ratio:
            return "low_activity"
        if stats["snr_db"] < self.min_snr_db:
            return "low_snr"
        return None
