"""Per-rank entry point started by torchrun: ``python -m trainer.entry --module trainer --config NAME ...``."""

from __future__ import annotations

import sys

from trainer import cpu_compat


def main(argv: list[str] | None = None) -> int:
    cpu_compat.install()  # before torchtitan picks its device type
    import torch.distributed as dist
    from torchtitan.config import ConfigManager
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger

    init_logger()
    config = ConfigManager().parse_args(list(sys.argv[1:] if argv is None else argv))
    sl.init_structured_logger(source="training", output_dir=config.dump_folder, enable=False)
    trainer = config.build()
    try:
        trainer.train()
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
