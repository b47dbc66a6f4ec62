"""Bounded source: JSON-lines and Parquet files of RawRecords, for backfills.

Each record gets coordinates (absolute path, 0, line/row number), so a backfill
settles offsets exactly like a Kafka partition and re-running it is a no-op.
"""

from __future__ import annotations

import json
import os

import apache_beam as beam

from beam_jobs.records import KafkaCoords
from beam_jobs.settlement import ResumePlan

__all__ = ["ReadRecordFiles", "read_records"]


def _parquet_rows(path: str):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, row in enumerate(table.to_pylist()):
        obj = {k: v for k, v in row.items() if v is not None}
        yield i, json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")


def _jsonl_rows(path: str):
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield i, line


def read_records(path: str, plan: ResumePlan | None = None):
    """Yield (KafkaCoords, bytes) for every record of ``path`` not settled yet."""
    topic = os.path.abspath(path)
    rows = _parquet_rows(path) if path.endswith((".parquet", ".pq")) else _jsonl_rows(path)
    for i, raw in rows:
        if plan is None or not plan.is_settled(topic, 0, i):
            yield KafkaCoords(topic, 0, i), raw


class ReadRecordFiles(beam.PTransform):
    """Paths -> (KafkaCoords, bytes), skipping offsets already settled in the stream root."""

    def __init__(self, paths: list[str], plan: ResumePlan | None = None):
        super().__init__()
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"ingest input not found: {missing}")
        self.paths, self.plan = list(paths), plan

    def expand(self, pbegin):
        return pbegin | "Paths" >> beam.Create(self.paths) | "Records" >> beam.FlatMap(read_records, self.plan)
