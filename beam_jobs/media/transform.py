"""Beam transforms of the media path: ``TokenizeMedia`` and ``MediaHealth``.

Element in: ``(coords, RawRecord)`` as emitted on ValidateDecode's ``media`` output (coords are
passed through untouched; a bare RawRecord is accepted with coords None). Outputs:

- main: ``(coords, sample)``, sample a dict with the MDS columns (tokens int32 ndarray)
- ``dlq``: :class:`streams.events.DeadLetter` (bad/unsafe input, with reason and coordinates)
- ``dropped``: ``(coords, "stage:reason", record id)`` for QA filter and dedup drops, so offsets still settle
- ``health``: :class:`CodebookHealth` deltas, combined by :class:`MediaHealth`

Models are built once per DoFn in ``setup()``; records are batched with ``BatchElements`` and each
batch is split by modality so EnCodec / RVQ run on many items at once.
"""

from __future__ import annotations

from collections import defaultdict

import apache_beam as beam
from apache_beam.metrics import Metrics

from streams.events import DeadLetter

from .errors import MediaConfigError, MediaRejected
from .health import CodebookHealth, HealthThresholds
from .process import MediaConfig, MediaProcessor, Result

__all__ = ["DLQ_TAG", "DROPPED_TAG", "HEALTH_TAG", "MediaHealth", "MergeHealthFn", "TokenizeMedia"]

DLQ_TAG, DROPPED_TAG, HEALTH_TAG = "dlq", "dropped", "health"
MEDIA_MODALITIES = ("audio", "image", "video")


def _coords_fields(coords) -> dict:
    try:
        topic, partition, offset = coords
        return {"topic": str(topic), "partition": int(partition), "offset": int(offset)}
    except (TypeError, ValueError):
        return {}


class _TokenizeMediaFn(beam.DoFn):
    def __init__(self, config: MediaConfig):
        self.config = config
        self.proc: MediaProcessor | None = None

    def setup(self) -> None:
        self.proc = self.config.build()

    def process(self, batch):
        by_modality: dict[str, list] = defaultdict(list)
        for element in batch:
            coords, record = element if isinstance(element, tuple) else (None, element)
            Metrics.counter("media", f"in_{record.modality}").inc()
            if record.modality not in MEDIA_MODALITIES:
                yield from self._emit(coords, Result(record, reason="read:not_media", dead=True,
                                                     detail=f"modality {record.modality!r}"))
                continue
            try:
                by_modality[record.modality].append((coords, record, self.proc.payload(record)))
            except MediaRejected as e:
                yield from self._emit(coords, Result(record, reason=f"read:{e.reason}", detail=e.detail, dead=True))
            except Exception as e:  # noqa: BLE001 - an unforeseen read failure is this record's
                yield from self._emit(coords, Result(record, reason="read:internal_error",
                                                     detail=f"{type(e).__name__}: {e}", dead=True))
        for modality, items in by_modality.items():
            for (coords, _, _), result in zip(items, self._tokenize(modality, items)):
                yield from self._emit(coords, result)
        if self.proc.health.samples:
            yield beam.pvalue.TaggedOutput(HEALTH_TAG, self.proc.health)
            self.proc.health = CodebookHealth()

    def _tokenize(self, modality: str, items: list) -> list[Result]:
        """Run one modality's batch; if it fails, run its records one by one so only the record that
        fails is dead-lettered (``tokenizer_error``). A configuration error stops the job."""
        run = getattr(self.proc, modality)
        try:
            return run([(r, d) for _, r, d in items])
        except MediaConfigError:
            raise
        except Exception:  # noqa: BLE001 - isolate the failing record below
            if len(items) == 1:
                return self._one(run, modality, items[0])
        return [r for item in items for r in self._one(run, modality, item)]

    @staticmethod
    def _one(run, modality: str, item) -> list[Result]:
        _, record, data = item
        try:
            return run([(record, data)])
        except MediaConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - this record's failure, dead-lettered with the error
            return [Result(record, reason=f"{modality}:tokenizer_error", detail=f"{type(e).__name__}: {e}", dead=True)]

    def _emit(self, coords, result: Result):
        record = result.record
        if result.sample is not None:
            Metrics.counter("media", f"out_{record.modality}").inc()
            yield (coords, result.sample)
        elif result.dead:
            Metrics.counter("media", f"dlq_{result.reason.replace(':', '_')}").inc()
            yield beam.pvalue.TaggedOutput(DLQ_TAG, DeadLetter.of(
                record.to_bytes(), reason=result.reason.split(":", 1)[1], stage=f"media_{result.reason.split(':', 1)[0]}",
                record_id=record.id, detail=result.detail[:500], **_coords_fields(coords)))
        else:
            Metrics.counter("media", f"drop_{result.reason.replace(':', '_')}").inc()
            yield beam.pvalue.TaggedOutput(DROPPED_TAG, (coords, result.reason, record.id, record.source))


class TokenizeMedia(beam.PTransform):
    """(coords, RawRecord) -> main (coords, sample dict); tagged ``dlq``, ``dropped``, ``health``."""

    def __init__(self, config: MediaConfig, *, max_batch_size: int = 8):
        super().__init__()
        self.config = config
        self.max_batch_size = max_batch_size

    def expand(self, pcoll):
        return (
            pcoll
            | "BatchMedia" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            | "Tokenize" >> beam.ParDo(_TokenizeMediaFn(self.config)).with_outputs(
                DLQ_TAG, DROPPED_TAG, HEALTH_TAG, main="samples")
        )


class MergeHealthFn(beam.CombineFn):
    def create_accumulator(self) -> CodebookHealth:
        return CodebookHealth()

    def add_input(self, acc: CodebookHealth, h: CodebookHealth) -> CodebookHealth:
        return acc.merge(h)

    def merge_accumulators(self, accs) -> CodebookHealth:
        out = CodebookHealth()
        for a in accs:
            out.merge(a)
        return out

    def extract_output(self, acc: CodebookHealth) -> CodebookHealth:
        return acc


class MediaHealth(beam.PTransform):
    """CodebookHealth deltas -> MetricsEvent and Alert events (per window of the input)."""

    def __init__(self, stream: str, thresholds: HealthThresholds | None = None):
        super().__init__()
        self.stream = stream
        self.thresholds = thresholds or HealthThresholds()

    def expand(self, pcoll):
        def events(h: CodebookHealth):
            metrics, alerts = h.report(stream=self.stream, thresholds=self.thresholds)
            yield metrics
            yield from alerts

        return (
            pcoll
            | "MergeHealth" >> beam.CombineGlobally(MergeHealthFn()).without_defaults()
            | "HealthEvents" >> beam.FlatMap(events)
        )
