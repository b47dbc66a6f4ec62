"""A kept document's dedup record, as published in its sample's ``lineage["dedup"]``.

The record is what the settled index needs to remember the document (sketch, LSH band keys
truncated to 32 bits, exact-hash key), so shards carry their own index delta and a restart
never re-decodes or re-fingerprints text.
"""

from __future__ import annotations

import base64
import struct
from typing import NamedTuple

from beam_jobs.dedup.sketch import Sketch

__all__ = ["DedupRecord", "decode_record", "encode_record"]

_VERSION = 1


class DedupRecord(NamedTuple):
    sketch: Sketch
    bands: list[int]  # uint32 band keys
    exact: int  # uint64 exact-content key (0: exact dedup off)


def encode_record(rec: DedupRecord) -> str:
    body = rec.sketch.to_bytes()
    head = struct.pack("<BBQH", _VERSION, len(rec.bands), rec.exact, len(body))
    return base64.b64encode(head + struct.pack(f"<{len(rec.bands)}I", *rec.bands) + body).decode("ascii")


def decode_record(text: str) -> DedupRecord:
    data = base64.b64decode(text)
    version, nb, exact, nbody = struct.unpack_from("<BBQH", data)
    if version != _VERSION:
        raise ValueError(f"dedup record version {version} is not supported (expected {_VERSION})")
    off = struct.calcsize("<BBQH")
    bands = list(struct.unpack_from(f"<{nb}I", data, off))
    off += 4 * nb
    return DedupRecord(Sketch.from_bytes(data[off : off + nbody]), bands, exact)
