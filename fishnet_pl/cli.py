"""``fishnet-pl fit|validate|test|predict --config ...``: LightningCLI over FishNetModule.

Configs compose: ``--config configs/backbone/fishnet150.yaml --config configs/task/classification.yaml
--config configs/data/imagenet.yaml --config configs/trainer/gpu8.yaml``; later files override
earlier ones and ``--print_config`` shows the merged run.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from fishnet_pl.module import FishNetModule


class FishNetCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The dataset knows its classes; the model never repeats them.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> FishNetCLI:
    return FishNetCLI(FishNetModule, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                      save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
