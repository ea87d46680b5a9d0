"""The LightningCLI behind `encore-pl fit|validate --config CONFIG.yaml` (and `python scripts/train.py
fit|validate --config CONFIG.yaml`, the same from a checkout)."""

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision

from .checkpoints import EditCheckpoint, SafeCheckpointIO, find_last_checkpoint
from .datamodule import EditDataModule
from .distributed import editing_strategy
from .module import KnowledgeEditor

PACKAGE_DIR = Path(__file__).resolve().parent


class EditingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "trainer.max_epochs": 1,
                "trainer.num_sanity_val_steps": 0,
                "trainer.enable_checkpointing": True,  # EditCheckpoint (`checkpoint.*`) is the checkpoint callback: no ModelCheckpoint is added
                "trainer.enable_model_summary": False,
                "trainer.inference_mode": False,
                "trainer.log_every_n_steps": 1,
                # every process sees every batch and takes its own requests (encore_pl.distributed)
                "trainer.use_distributed_sampler": False,
            }
        )

    def instantiate_trainer(self, **kwargs):
        """As LightningCLI's, with "ddp" (and every setting for which Lightning would pick its DDP) meaning
        the project's EditingDDPStrategy, settings that would break the editing state refused, and
        checkpoints written atomically and read without unpickling code."""
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        refuse_precision(config.get("precision"), plugins)
        kwargs["strategy"] = editing_strategy(config.get("strategy", "auto"), config.get("devices"),
                                              config.get("num_nodes"), config.get("accelerator", "auto"))
        kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path last`: the newest last.ckpt under the root directory. (LightningCLI would
        also replace the model's config by the checkpoint's; instead a run resumes with its own
        config, and a checkpoint of a different run is refused with what differs.)"""
        config = self.config.get(self.config.get("subcommand") or "", None)
        if config is not None and config.get("ckpt_path") == "last":
            config.ckpt_path = str(find_last_checkpoint(Path(config.trainer.default_root_dir or ".")))

    def before_fit(self) -> None:
        """A resumed run logs into the directory of the run it resumes."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        logger = self.trainer.logger
        if ckpt_path is None or not isinstance(logger, TensorBoardLogger) or logger._version is not None:
            return
        run_dir = Path(ckpt_path).resolve().parent.parent  # <root>/version_N/checkpoints/last.ckpt
        if run_dir.name.startswith("version_") and run_dir.parent == Path(logger.root_dir).resolve():
            logger._version = run_dir.name  # TensorBoardLogger has no public setter; set before first use


def refuse_precision(precision: object, plugins: list) -> None:
    """Only full precision ("32-true"): Lightning's other settings convert what must stay as it is.
    bf16-true/16-true cast every floating buffer of the module (plugins/precision/half.py
    `convert_module`), the float32 cumulative increments and metric sums included; 64-true makes the whole
    model float64; the mixed settings autocast the z optimisation. The model's own dtype is set with
    --model.dtype."""
    given = [f"--trainer.precision {precision}"] if str(precision) not in ("None", "32", "32-true") else []
    given += [f"the precision plugin {type(p).__name__}" for p in plugins
              if isinstance(p, Precision) and type(p) is not Precision]
    if given:
        raise ValueError(f"{given[0]} is not supported: only 32-true, which leaves the model and the editing "
                         "state as they are (bf16-true and 16-true would cast the float32 edit state, 64-true the whole "
                         "model, the mixed settings autocast the z optimisation); set the model's dtype with "
                         "--model.dtype (e.g. bfloat16)")


def quiet_lightning_warnings() -> None:
    """Silence Lightning warnings that describe this design, not a problem: the frozen model is in
    eval mode, there is no optimizer (each step optimises its own target vectors), and `fit` has no
    validation loop."""
    for message in (".*configure_optimizers.*returned `None`", ".*module\\(s\\) in eval mode.*",
                    ".*Total length of .* across ranks is zero.*", ".*isinstance\\(treespec, LeafSpec\\).*"):
        warnings.filterwarnings("ignore", message=message)


def raised_here(error: BaseException) -> bool:
    """Whether `error` was raised by this project's own code (its message is written for users)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
    return where is not None and any(where.is_relative_to(d) for d in (PACKAGE_DIR, PACKAGE_DIR.parent / "scripts"))


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input or bad numbers, explained in one message: no traceback (ENCORE_PL_DEBUG=1 shows it)."""
    try:
        yield
    except (ValueError, OSError, ArithmeticError) as e:
        if not raised_here(e) or os.environ.get("ENCORE_PL_DEBUG"):
            raise
        sys.stderr.write(f"encore-pl: error: {e}\n")  # one write: lines of several processes do not interleave
        sys.stderr.flush()
        raise SystemExit(1) from None


def main(args=None, prog: Optional[str] = None) -> None:
    """Run a LightningCLI subcommand (`fit`, `validate`, ...) from `args` (default: sys.argv); `prog`
    names the command in help and errors (default: the script's name)."""
    quiet_lightning_warnings()
    with user_errors():
        EditingCLI(
            KnowledgeEditor,
            EditDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            parser_kwargs={"prog": prog} if prog else None,
        )
