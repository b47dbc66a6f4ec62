"""``headwater fold ROOT...``: fold the publish journal of local stream roots into index.json, so
that a copy of the root (or a stock ``streaming.StreamingDataset(local=ROOT)``) sees every shard
published so far; for an ``s3://`` root, re-derive its merged index.json from every writer's base
and log (streams/writer_log.py), so that ``StreamingDataset(remote=ROOT)`` sees every commit. Live
writers fold on their own by a bounded policy; run this before copying a live root when the copy
must be complete."""

from __future__ import annotations

import argparse

from streams import storage
from streams.manifest import RootView, fold_root

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="headwater fold", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", metavar="ROOT", help="stream root: a local directory or an s3:// URL")
    a = p.parse_args(argv)
    for root in a.roots:
        folded = fold_root(root, force=True)
        if storage.is_remote(root):
            shards = len(storage.object_root(storage.normalize_root(root)).root_index()[0]["shards"])
            print(f"{root}: {'merged' if folded else 'merged index was current'}; index.json lists {shards} shards")
            continue
        view = RootView(root)
        view.refresh()
        print(f"{root}: {'folded' if folded else 'nothing to fold'}; index.json lists {len(view.infos)} shards")
    return 0
