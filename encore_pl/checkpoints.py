"""Checkpoints of the lifelong state: when they are written, how, and how a run resumes from one.

A checkpoint holds what editing changed or accumulated, not the frozen rest of the model (which is
loaded from `model_name_or_path` as always): the edited layers' weights, the running sums of
previous keys, and the module's records (context prefixes, requests edited so far, history,
metric sums; see `KnowledgeEditor.on_save_checkpoint`). The position in the request stream is
the number of requests edited; `RequestStream` starts there. Every random choice of a run is
drawn from a generator seeded by (seed, what it is for), so no random state evolves between
batches and none needs saving beyond the seed.

    python scripts/train.py fit --config CONFIG.yaml                      # writes last.ckpt
    python scripts/train.py fit --config CONFIG.yaml --ckpt_path last     # resumes the latest run
"""

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from .files import replaced


class EditCheckpoint(Checkpoint):
    """Saves `last.ckpt` (and the edit patch `edits.safetensors`) every N edit batches.

    Not a ModelCheckpoint: that one counts optimizer steps, and editing takes none. A Lightning
    `Checkpoint` all the same: Lightning runs checkpoint callbacks after all others, so the
    checkpoint of a batch holds its update.
    """

    def __init__(self, every_n_batches: int = 1, dirpath: Optional[str] = None):
        """
        Args:
            every_n_batches: save after every N edit batches (0 = never).
            dirpath: where to save (default: `<log dir>/checkpoints`).
        """
        self.every_n_batches = every_n_batches
        self.dirpath = dirpath

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.every_n_batches and (batch_idx + 1) % self.every_n_batches == 0:
            # Lightning's weights_only, not torch.load's: False also saves the callbacks' state and the
            # (empty) optimizer lists, without which Lightning refuses to resume. Read with weights_only=True.
            trainer.save_checkpoint(Path(self.dirpath) / "last.ckpt", weights_only=False)
            pl_module.write_patch()


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (a temporary file synced and renamed into place: a kill at any
    moment leaves the previous checkpoint intact) and read with `weights_only=True` (no code is
    ever unpickled)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        with replaced(Path(path)) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        try:
            # mmap: every process of a run reads the file, none holds all of it in RAM at once
            checkpoint = torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path} cannot be read (corrupt, or not an encore-pl checkpoint): {first}") from None
        if not isinstance(checkpoint, dict) or "encore_pl" not in checkpoint:
            raise ValueError(f"checkpoint {path} was not written by encore-pl (no lifelong state in it)")
        return checkpoint


def find_last_checkpoint(log_root: Path) -> Path:
    """The newest `<log_root>/<name>/<version>/checkpoints/last.ckpt` (e.g. `lightning_logs/version_3/...`)."""
    found = sorted(log_root.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {str(log_root)!r}")
    return found[-1]
