"""A cheap audio signature for the video near-dup decision: log band energies over time.

The audio track is decoded mono at :data:`RATE` (8 kHz), cut into 32 ms Hann windows, and the
power of each window summed into :data:`BANDS` log-spaced bands (62 Hz - 4 kHz); the windows of
each of :data:`SLOTS` equal fractions of the track are averaged. The matrix is kept in dB
relative to its loudest cell (gain does not matter), quantised to 1/3 dB in one byte per cell:
512 bytes. A silent or missing track gives ``b""``.

:func:`audio_agreement` compares two signatures on what a re-encode keeps and another recording
of the same kind does not: the long-term spectrum (a 440 Hz tone vs a 300 Hz one) and, for
tracks that change over time, the per-band temporal deviations (two episodes of one speaker
share a spectrum, never the timing), the best over a few slots of shift (a trimmed copy).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BANDS", "RATE", "SLOTS", "audio_agreement", "audio_signature"]

RATE = 8_000  # decode rate of the signature
SLOTS = 32  # time slots at equal fractions of the track
BANDS = 16  # log-spaced bands
_WIN = 256  # 32 ms windows, hop = window
_STEP = 3.0  # quantisation steps per dB
_RANGE_DB = 80.0  # cells more than this below the loudest one are clipped
_SILENT_RMS = 1e-3  # -60 dBFS: quieter tracks count as no audio
_EDGES = np.round(np.geomspace(2, _WIN // 2 + 1, BANDS + 1)).astype(int)
for _i in range(1, BANDS + 1):  # every band at least one rfft bin
    _EDGES[_i] = max(_EDGES[_i], _EDGES[_i - 1] + 1)


def audio_signature(wav: np.ndarray | None) -> bytes:
    """SLOTS × BANDS bytes of mono float audio at :data:`RATE`; ``b""`` if absent, too short
    (under one window) or silent."""
    if wav is None or wav.size < _WIN or float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) < _SILENT_RMS:
        return b""
    n = wav.size // _WIN
    win = wav[: n * _WIN].reshape(n, _WIN) * np.hanning(_WIN).astype(np.float32)
    power = np.square(np.abs(np.fft.rfft(win, axis=1)))  # [n, WIN/2 + 1]
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(power, axis=1)], axis=1)
    bands = cum[:, _EDGES[1:]] - cum[:, _EDGES[:-1]]  # [n, BANDS]
    lo = (np.arange(SLOTS) * n) // SLOTS
    hi = np.maximum(((np.arange(SLOTS) + 1) * n) // SLOTS, lo + 1)
    cumb = np.concatenate([np.zeros((1, BANDS)), np.cumsum(bands, axis=0)], axis=0)
    slots = (cumb[hi] - cumb[lo]) / (hi - lo)[:, None]
    db = 10.0 * np.log10(slots + 1e-12)
    q = np.clip(np.round((db - db.max() + _RANGE_DB) * _STEP), 0, 255)
    return q.astype(np.uint8).tobytes()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 1.0


def audio_agreement(a: bytes, b: bytes, *, seconds: tuple[float, float], max_shift: int,
                    steady_db: float) -> tuple[float, float]:
    """(spectrum correlation, temporal correlation) of two non-empty signatures of tracks lasting
    ``seconds``. The temporal one aligns ``b``'s slots on ``a``'s time axis (the slot widths
    differ with the durations) at every offset within the length difference plus ``max_shift``
    slots, in half-slot steps, over the bands within 40 dB of either loudest band, and keeps the
    best; 1.0 when both tracks are steady (deviation RMS under ``steady_db``), 0.0 when only one is."""
    sa = np.frombuffer(a, np.uint8).reshape(SLOTS, BANDS).astype(np.float64) / _STEP
    sb = np.frombuffer(b, np.uint8).reshape(SLOTS, BANDS).astype(np.float64) / _STEP
    pa, pb = sa.mean(0), sb.mean(0)
    spectrum = _corr(pa, pb)
    bands = (pa >= pa.max() - 40) | (pb >= pb.max() - 40)
    sa, sb = sa[:, bands], sb[:, bands]
    da, db = max(seconds[0], 1e-3), max(seconds[1], 1e-3)
    slot = da / SLOTS
    reach = abs(da - db) + max_shift * slot
    best = -1.0
    centres = (np.arange(SLOTS) + 0.5) * db / SLOTS
    for offset in np.arange(-reach, reach + slot / 4, slot / 2):
        pos = (centres + offset) / slot - 0.5  # b's slot centres on a's slot index axis
        inside = (pos >= 0) & (pos <= SLOTS - 1)
        if inside.sum() < SLOTS // 2:
            continue
        p = pos[inside]
        lo = np.floor(p).astype(int)
        hi = np.minimum(lo + 1, SLOTS - 1)
        w = (p - lo)[:, None]
        xa = sa[lo] * (1 - w) + sa[hi] * w
        xb = sb[inside]
        ea, eb = xa - xa.mean(0), xb - xb.mean(0)
        steady_a = float(np.sqrt(np.mean(ea * ea))) < steady_db
        steady_b = float(np.sqrt(np.mean(eb * eb))) < steady_db
        if steady_a and steady_b:
            score = 1.0
        elif steady_a or steady_b:
            score = 0.0
        else:
            score = _corr(ea.reshape(-1), eb.reshape(-1))
        best = max(best, score)
    return spectrum, best
