"""Command line: LightningCLI for `fit`/`validate`/`test`, plus the method's own stages.

    selfexplore fit --config configs/quickstart/sft.yaml
    selfexplore test --config configs/quickstart/sft.yaml --ckpt_path ...
    selfexplore fit --print_config

Model and data classes are chosen in the YAML (`class_path`), so the same entry point runs
SFT (`selfexplore.training.sft.SFTModule` + `selfexplore.data.sft.SFTDataModule`) and step-level DPO.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class SelfExploreCLI(LightningCLI):
    """LightningCLI with our defaults: CSV logging, subclass mode for module and data."""


def lightning_main(args: list[str] | None = None) -> SelfExploreCLI:
    return SelfExploreCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs"}}},
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    lightning_main(argv)


if __name__ == "__main__":
    main()
