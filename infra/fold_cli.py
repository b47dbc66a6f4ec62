"""``headwater fold ROOT...``: fold the publish journal of local stream roots into index.json, so
that a copy of the root (or a stock ``streaming.StreamingDataset(local=ROOT)``) sees every shard
published so far. Live writers fold on their own by a bounded policy (streams/manifest.py); run
this before copying a live root when the copy must be complete."""

from __future__ import annotations

import argparse

from streams import storage
from streams.manifest import RootView, fold_root

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="headwater fold", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", metavar="ROOT", help="local stream root directory")
    a = p.parse_args(argv)
    for root in a.roots:
        if storage.is_remote(root):
            print(f"{root}: object-store roots have no journal (every commit merges its index)")
            continue
        folded = fold_root(root, force=True)
        view = RootView(root)
        view.refresh()
        print(f"{root}: {'folded' if folded else 'nothing to fold'}; index.json lists {len(view.infos)} shards")
    return 0
