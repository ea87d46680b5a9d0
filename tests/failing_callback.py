"""A callback that fails on one process only, for tests of how a run with several processes ends
(`--trainer.callbacks+=...` with this directory on PYTHONPATH)."""

import os
import time

from lightning.pytorch.callbacks import Callback


class FailOnProcess(Callback):
    """Raises a ValueError on process `rank` as edit batch `batch` (0-based) starts; the other
    processes go on into that batch's collectives.

    With `hold_connections` > 0 the failing process first forks a child that keeps its sockets open
    for that many seconds: the others' gloo connections then never see it end, as NCCL peers often do
    not, so they would wait in their collective until its timeout (30 min)."""

    def __init__(self, rank: int = 0, batch: int = 1, hold_connections: float = 0.0) -> None:
        self.rank, self.batch, self.hold_connections = rank, batch, hold_connections

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or batch_idx != self.batch:
            return
        if self.hold_connections > 0 and os.fork() == 0:  # the child: no Python beyond this, no output
            for fd in (0, 1, 2):
                os.close(fd)
            time.sleep(self.hold_connections)
            os._exit(0)
        raise ValueError(f"test failure on process {self.rank} at edit batch {batch_idx}")


class OtherBaseOnProcess(Callback):
    """Makes process `rank` look as if it had loaded other base weights (another sha256 of them)."""

    def __init__(self, rank: int = 1) -> None:
        self.rank = rank

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.global_rank == self.rank:
            pl_module.editor.base_sha256 = "0" * 64
