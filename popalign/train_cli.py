"""``python train.py fit --config configs/sdxl_popalign.yaml``: the LightningCLI of popalign.

The CLI's schema is the typed ``__init__`` of :class:`popalign.module.PopAlignModule` (``model:``) and of
:class:`popalign.data.datamodule.PopulationDataModule` (``data:``); ``--print_config`` shows every knob.
Configs are parsed in omegaconf mode, so values may interpolate (``${data.init_args.pairs_per_group}``).
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from popalign.data.datamodule import PopulationDataModule
from popalign.distributed import register_strategy
from popalign.errors import UserError
from popalign.module import PopAlignModule

# the frozen reference is in eval mode on purpose; shards have a length only to size epochs
warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", r"Your `IterableDataset` has `__len__` defined")


class PopAlignCLI(LightningCLI):
    """LightningCLI with popalign's defaults: TensorBoard logs and a `last.ckpt` for resuming."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "popalign"},
                },
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"save_last": True, "every_n_train_steps": 100},
                    },
                    {
                        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                        "init_args": {"logging_interval": "step"},
                    },
                ],
            }
        )


def cli_main(args: list[str] | None = None, run: bool = True) -> PopAlignCLI:
    """Build the CLI (and run the subcommand); a :class:`UserError` exits 2 with its one-line message."""
    try:
        return _build(args, run)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _build(args: list[str] | None, run: bool) -> PopAlignCLI:
    register_strategy()  # --trainer.strategy fsdp_blocks
    return PopAlignCLI(
        PopAlignModule,
        PopulationDataModule,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
