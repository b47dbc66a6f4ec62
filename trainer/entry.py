"""Per-rank entry point started by torchrun: ``python -m trainer.entry --module trainer --config NAME ...``.

Under torchrun each rank dies with torchrun's agent (trainer/run_guard.py), and global rank 0
holds RUN/.lock for the whole run: a second trainer on the same run directory exits with
code 3 and a message naming the holder.
"""

from __future__ import annotations

import os
import sys

from trainer import cpu_compat
from trainer.run_guard import EXIT_RUN_DIR_BUSY, RunDirBusy, RunLock, die_with_parent


def main(argv: list[str] | None = None) -> int:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent: never outlive it
        die_with_parent()
    cpu_compat.install()  # before torchtitan picks its device type
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger

    init_logger()
    config = ConfigManager().parse_args(list(sys.argv[1:] if argv is None else argv))
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            lock = RunLock(config.dump_folder).acquire(wait_s=config.headwater.lock_wait_s)
        except RunDirBusy as e:
            print(f"headwater train: {e}", file=sys.stderr, flush=True)
            return EXIT_RUN_DIR_BUSY
    sl.init_structured_logger(source="training", output_dir=config.dump_folder, enable=False)
    try:
        trainer = config.build()
        try:
            trainer.train()
        finally:
            trainer.close()
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
