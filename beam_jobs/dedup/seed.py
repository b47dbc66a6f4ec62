"""Restart seed of the dedup index: the text of every sample already published in the stream root.

The published stream *is* the dedup snapshot: it holds exactly the kept documents, is
written atomically with the offsets they settled, and decodes back to the text that was
fingerprinted (BPE round-trips exactly). So a restart's index agrees with what was published.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from beam_jobs.dedup.transform import shard_key
from beam_jobs.records import Doc, KafkaCoords

__all__ = ["StreamSeed"]


class StreamSeed:
    """Picklable reader of (shard_key, doc_id, text) for published text samples, shard by shard."""

    def __init__(self, stream_root: str, how: str):
        self.stream_root, self.how = stream_root, how

    def read(self, skip_shards: Iterable[str] = ()) -> Iterator[tuple[str, str, str, str]]:
        """(shard, shard_key, doc_id, text) of text samples in shards not in ``skip_shards``."""
        if not os.path.exists(os.path.join(self.stream_root, "index.json")):
            return
        from streams.mds import TailReader
        from streams.vocab import Vocab

        vocab = Vocab.default()
        eos = vocab.special("<|endoftext|>")
        with TailReader(self.stream_root, exclude_shards=skip_shards) as reader:
            for s in reader.samples(timeout_s=0):
                if s["modality"] != "text":
                    continue
                tokens = [int(t) for t in s["tokens"]]
                if tokens and tokens[-1] == eos:
                    tokens.pop()
                doc = Doc(coords=KafkaCoords("", 0, 0), id=s["id"], source=s["source"], license="", text="",
                          language=s["language"])
                yield s["_shard"], shard_key(doc, self.how), s["id"], vocab.decode(tokens)
