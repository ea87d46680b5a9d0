"""The command line: `python scripts/train.py fit|validate --config CONFIG.yaml`."""

import warnings

from lightning.pytorch.cli import LightningCLI

from .data import EditDataModule
from .distributed import editing_strategy
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
                # every process sees every batch and takes its own requests (encore_pl.distributed)
                "trainer.use_distributed_sampler": False,
            }
        )

    def instantiate_trainer(self, **kwargs):
        """As LightningCLI's, with "ddp" meaning the project's EditingDDPStrategy."""
        config = self._get(self.config_init, "trainer", default={})
        kwargs["strategy"] = editing_strategy(config.get("strategy", "auto"), config.get("devices"), config.get("num_nodes"))
        return super().instantiate_trainer(**kwargs)


def quiet_lightning_warnings() -> None:
    """Silence Lightning warnings that describe this design, not a problem: the frozen model is in
    eval mode, there is no optimizer (each step optimises its own target vectors), and `fit` has
    no validation loop."""
    for message in (".*configure_optimizers.*returned `None`", ".*module\\(s\\) in eval mode.*",
                    ".*Total length of .* across ranks is zero.*", ".*isinstance\\(treespec, LeafSpec\\).*"):
        warnings.filterwarnings("ignore", message=message)


def main(args=None) -> None:
    quiet_lightning_warnings()
    EditingCLI(
        KnowledgeEditor,
        EditDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
