"""Discretization health: per-(modality, level) code usage, perplexity, throughput and alerts.

``CodebookHealth`` accumulates code histograms and reconstruction errors; ``report`` turns them
into a ``MetricsEvent`` for the metrics topic (and wandb) plus an ``Alert`` for every level whose
utilization fell under the collapse threshold. Accumulators merge, so a Beam CombineFn can
aggregate per window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from streams.events import Alert, MetricsEvent

__all__ = ["CodebookHealth", "HealthThresholds", "level_stats"]


def level_stats(counts: np.ndarray) -> tuple[float, float]:
    """(utilization = used codes / codebook size, perplexity = exp(entropy)) of one level's histogram."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum()))


@dataclass(kw_only=True, slots=True)
class HealthThresholds:
    """When code usage is a production incident."""

    min_utilization: float = 0.05  # of the codebook, per level
    min_codes_seen: int = 2048  # don't judge a level on fewer codes than this
    severity: str = "critical"
    action: str = "pause_domain"  # as the `codebook_collapse` rule of infra/alerts/rules.toml
    hooks: list[str] = field(default_factory=lambda: ["webhook", "log"])  # ditto


@dataclass(slots=True)
class CodebookHealth:
    """Mergeable accumulator of code usage and tokenizer throughput for one stream."""

    codebook_size: int = 1024
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # key "modality/level" -> histogram
    tokens: int = 0
    media_seconds: float = 0.0
    busy_seconds: float = 0.0
    samples: int = 0
    dropped_frames: int = 0
    recon_errors: dict[str, list[float]] = field(default_factory=dict)  # modality -> PSNR / SNR dB
    domains: dict[str, dict[str, int]] = field(default_factory=dict)  # modality -> {domain: items}

    def add_codes(self, modality: str, codes: np.ndarray, *, domain: str | None = None) -> None:
        """Count codes[levels, n] of one item (of ``domain``, default: the modality)."""
        seen = self.domains.setdefault(modality, {})
        seen[domain or modality] = seen.get(domain or modality, 0) + 1
        for level, row in enumerate(np.asarray(codes)):
            key = f"{modality}/{level}"
            hist = np.bincount(row.astype(np.int64), minlength=self.codebook_size)
            if key in self.counts:
                self.counts[key] += hist[: self.codebook_size]
            else:
                self.counts[key] = hist[: self.codebook_size].copy()

    def add_sample(self, *, tokens: int, media_seconds: float, busy_seconds: float, dropped_frames: int = 0) -> None:
        self.samples += 1
        self.tokens += tokens
        self.media_seconds += media_seconds
        self.busy_seconds += busy_seconds
        self.dropped_frames += dropped_frames

    def add_recon(self, modality: str, value_db: float) -> None:
        self.recon_errors.setdefault(modality, []).append(float(value_db))

    def merge(self, other: CodebookHealth) -> CodebookHealth:
        for key, hist in other.counts.items():
            self.counts[key] = self.counts[key] + hist if key in self.counts else hist.copy()
        self.tokens += other.tokens
        self.media_seconds += other.media_seconds
        self.busy_seconds += other.busy_seconds
        self.samples += other.samples
        self.dropped_frames += other.dropped_frames
        for m, vals in other.recon_errors.items():
            self.recon_errors.setdefault(m, []).extend(vals)
        for m, counts in other.domains.items():
            mine = self.domains.setdefault(m, {})
            for d, n in counts.items():
                mine[d] = mine.get(d, 0) + n
        return self

    def domain_of(self, modality: str) -> str:
        """The domain most of this modality's items went to (the one a collapse pauses)."""
        counts = self.domains.get(modality) or {modality: 1}
        return max(sorted(counts), key=counts.__getitem__)

    def usage(self) -> dict[str, float]:
        """Fraction of codes used per ``"modality/level"`` (the run-dir ``codebook_usage`` field)."""
        return {key: level_stats(hist)[0] for key, hist in sorted(self.counts.items())}

    def usage_events(self, *, stream: str, thresholds: HealthThresholds) -> list[MetricsEvent]:
        """One ``codebook_usage`` MetricsEvent per (modality, level) judged on enough codes.

        Labels ``{modality, level, domain, stream}`` (the ``codebook_collapse`` rule groups by
        modality and level); levels with fewer than ``min_codes_seen`` codes are not reported,
        since a small window cannot use many codes.
        """
        out = []
        for key, hist in sorted(self.counts.items()):
            if hist.sum() < thresholds.min_codes_seen:
                continue
            modality, level = key.split("/")
            util, ppl = level_stats(hist)
            out.append(MetricsEvent(
                component="ingest",
                values={"codebook_usage": util, "codebook_perplexity": ppl, "codes_seen": float(hist.sum())},
                labels={"modality": modality, "level": level, "domain": self.domain_of(modality), "stream": stream},
            ))
        return out

    def metrics(self) -> dict[str, float]:
        """Flat metric dict: codebook/<modality>/<level>/{utilization,perplexity}, throughput, recon."""
        out: dict[str, float] = {}
        bits = np.log2(self.codebook_size)
        for key in sorted(self.counts):
            util, ppl = level_stats(self.counts[key])
            out[f"codebook/{key}/utilization"] = util
            out[f"codebook/{key}/perplexity"] = ppl
        out["media/samples"] = float(self.samples)
        out["media/tokens"] = float(self.tokens)
        out["media/dropped_frames"] = float(self.dropped_frames)
        if self.busy_seconds > 0:
            out["media/tokens_per_s"] = self.tokens / self.busy_seconds
            out["media/media_seconds_per_s"] = self.media_seconds / self.busy_seconds
        if self.media_seconds > 0:
            out["media/bitrate_bps"] = self.tokens * bits / self.media_seconds
        for m, vals in self.recon_errors.items():
            out[f"recon/{m}/db_mean"] = float(np.mean(vals))
        return out

    def report(self, *, stream: str, thresholds: HealthThresholds, step: int | None = None) -> tuple[MetricsEvent, list[Alert]]:
        """The metrics event, and one Alert per collapsed (modality, level)."""
        values = self.metrics()
        alerts = []
        for key, hist in sorted(self.counts.items()):
            util, ppl = level_stats(hist)
            if hist.sum() >= thresholds.min_codes_seen and util < thresholds.min_utilization:
                modality, level = key.split("/")
                labels = {"modality": modality, "level": level, "domain": self.domain_of(modality)}
                alerts.append(Alert(
                    rule="codebook_collapse", severity=thresholds.severity, source=f"media/{stream}",
                    message=f"{stream} {key}: {util:.1%} of codes used (< {thresholds.min_utilization:.0%}), perplexity {ppl:.1f}",
                    dedup_key=f"codebook_collapse/{stream}/{key}",
                    evidence={"utilization": util, "perplexity": ppl, "codes_seen": int(hist.sum()),
                              "value": util, "limit": thresholds.min_utilization, "labels": labels,
                              "domain": labels["domain"], "action": thresholds.action, "hooks": thresholds.hooks},
                ))
        return MetricsEvent(component="media_tokenizer", values=values, step=step, labels={"stream": stream}), alerts
