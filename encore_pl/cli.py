"""The command line: `python scripts/train.py fit|validate --config CONFIG.yaml`."""

from lightning.pytorch.cli import LightningCLI

from .data import EditDataModule
from .module import KnowledgeEditor


class EditingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.max_epochs": 1,
                "trainer.num_sanity_val_steps": 0,
                "trainer.enable_checkpointing": False,
                "trainer.enable_model_summary": False,
                "trainer.inference_mode": False,
                "trainer.log_every_n_steps": 1,
            }
        )


def main(args=None) -> None:
    EditingCLI(
        KnowledgeEditor,
        EditDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
