"""The ingest pipeline body as one composite transform: SourceRecords -> ShardPublished."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam

from beam_jobs.control import GateMedia, GateText
from beam_jobs.control_stream import GateLive, LiveControls
from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.settled import sync as sync_settled
from beam_jobs.dedup.transform import Dedup
from beam_jobs.filters import FilterChain, FilterStep
from beam_jobs.media_hook import HealthConfig, RouteMedia, media_available
from beam_jobs.records import KafkaCoords, Outcome
from beam_jobs.sink import SinkConfig, WriteShards
from beam_jobs.tokenize import PIPELINE_VERSION, TOKENIZER_VERSION, DomainMap, TokenizeText
from beam_jobs.validate import ValidateConfig, ValidateDecode
from streams.governance import dead_letter_source
from streams.source_names import canonical_source
from streams.storage import is_remote

log = logging.getLogger(__name__)
#: Runners that run the pipeline in this process or on this machine (they can read its dedup cache).
IN_PROCESS_RUNNERS = frozenset({"DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner",
                                "PrismRunner", "TestDirectRunner", "InteractiveRunner"})

__all__ = ["IngestConfig", "IngestText"]


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    """Everything the ingest transforms need (sources are configured separately)."""

    sink: SinkConfig
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    filters: FilterChain.Config = field(default_factory=FilterChain.Config)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    domains: DomainMap = field(default_factory=DomainMap)
    media: bool = True
    media_config: Any = None  # beam_jobs.media.MediaConfig (None: its defaults)
    health: HealthConfig = field(default_factory=HealthConfig)
    blocked_sources: dict[str, str] = field(default_factory=dict)  # source -> drop reason (control)

    def manifest(self) -> dict:
        """Stream manifest: vocab/tokenizer/pipeline versions + the media discretizers when enabled."""
        from streams.vocab import Vocab

        out = {
            "vocab_version": Vocab.default().version,
            "tokenizer_version": TOKENIZER_VERSION,
            "pipeline_version": PIPELINE_VERSION,
        }
        if self.media and media_available():
            from beam_jobs.media import MediaConfig, MediaProcessor

            out.update(MediaProcessor(self.media_config or MediaConfig()).manifest())
        return out


def _dead_outcome(dead, blocked: dict[str, str]) -> Outcome:
    """A dead letter's outcome; one of a blocked source (e.g. taken down) is dropped, not kept."""
    coords = KafkaCoords(dead.topic, dead.partition, dead.offset)
    source = dead_letter_source(dead)
    reason = None if source is None else blocked.get(canonical_source(source))
    if reason is not None:
        return Outcome(coords, dropped=f"control:{reason}", record_id=dead.record_id, source=source)
    return Outcome(coords, dead=dead, record_id=dead.record_id)


class IngestText(beam.PTransform):
    """Validate/Decode -> filters -> Dedup -> Tokenize (+ media hook) -> WriteShards.

    Sources are gated by ``config.blocked_sources`` (fixed for the pipeline: the micro-batch loop
    builds one per batch), or, given ``controls``, by the live control state (the streaming graph:
    :mod:`beam_jobs.control_stream`)."""

    def __init__(self, config: IngestConfig, *, streaming: bool, controls: LiveControls | None = None):
        super().__init__()
        self.config, self.streaming, self.controls = config, streaming, controls

    def _settled_here(self, pipeline: beam.Pipeline) -> bool:
        """Whether this pipeline dedups against the settled indexes kept on this machine: always
        for a local root; for an object-store root in bounded and micro-batch runs on an
        in-process runner (the indexes live in this machine's cache, folded from every writer's
        published shards); not in the streaming graph, nor on a remote runner (Dataflow, Flink,
        a portable job server), whose workers would not see this machine's cache: there Beam
        state is the index."""
        if not is_remote(self.config.sink.stream_root):
            return True
        if self.streaming:
            return False
        runner = type(pipeline.runner).__name__
        if runner not in IN_PROCESS_RUNNERS:
            log.warning("bounded run on %s with object-store root %s: the settled dedup indexes live in this "
                        "machine's cache, which its workers cannot read; deduplicating within the run only",
                        runner, self.config.sink.stream_root)
            return False
        return True

    def _media_settled(self, pipeline: beam.Pipeline):
        """The media (image, video) near-dup index's settlement point, like the text one's."""
        if not self._settled_here(pipeline):
            return None
        from beam_jobs.media import MediaConfig
        from beam_jobs.media.dedup_settled import sync as sync_media

        media = self.config.media_config or MediaConfig()
        dedup = media.dedup
        return sync_media(self.config.sink.stream_root, dedup.near, horizon_images=dedup.horizon_images,
                          horizon_age_s=dedup.horizon_age_s, video=media.video_dedup,
                          cache_dir=self.config.dedup.cache_dir)

    def expand(self, records):
        c = self.config
        c.validate.media_enabled = c.media and media_available()
        decoded = records | "Validate" >> ValidateDecode(c.validate)
        if self.controls is not None:
            gated = {"controls": self.controls.records, "text": decoded.text, "dlq": decoded.dlq}
            if c.validate.media_enabled:
                gated["media"] = decoded.media
            live = (gated | "GateSourcesLive" >> GateLive(self.controls, c.blocked_sources))
            docs, dead, media_active, media_blocked = live["text"], live["outcomes"], live["media"], None
        else:
            docs = decoded.text | "GateSources" >> GateText(c.blocked_sources)
            dead = decoded.dlq | "DeadLetters" >> beam.Map(_dead_outcome, {canonical_source(k): v for k, v in c.blocked_sources.items()})
            if c.validate.media_enabled:
                media = decoded.media | "GateMediaSources" >> GateMedia(c.blocked_sources)
                media_active, media_blocked = media.active, media.blocked
        for text_filter in c.filters.build():
            docs = docs | FilterStep(text_filter)
        # A settlement point: fold what was published since the last snapshot into the next one,
        # and pin this pipeline to it (retries of its bundles see the same settled index).
        settled = sync_settled(c.sink.stream_root, horizon_docs=c.dedup.horizon_docs, horizon_age_s=c.dedup.horizon_age_s,
                               cache_dir=c.dedup.cache_dir) if self._settled_here(records.pipeline) else None
        docs = docs | "Dedup" >> Dedup(c.dedup, settled=settled)
        text = docs | "Tokenize" >> TokenizeText(c.domains)
        branches = [text, dead]
        if c.validate.media_enabled:
            if media_blocked is not None:
                branches.append(media_blocked)
            branches.append(media_active | "Media" >> RouteMedia(c.media_config, health=c.health, streaming=self.streaming,
                                                                 settled=self._media_settled(records.pipeline)))
        outcomes = tuple(branches) | "AllOutcomes" >> beam.Flatten()
        return outcomes | "Sink" >> WriteShards(c.sink, c.manifest(), streaming=self.streaming)
