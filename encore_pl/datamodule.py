"""The request stream of a Lightning run: requests in sequential batches, one training step each."""

from typing import Callable, Iterator, Literal, Optional

import lightning as L
from torch.utils.data import DataLoader

from .data import QUICKSTART_PATH, EditRequest, Format, InvalidRecord, RepeatedSubject, read_requests


class RequestStream:
    """The requests in sequential batches, resumable: Lightning saves its state with each checkpoint.

    The state is the number of requests done so far (`done()`: edited or skipped, read when the
    checkpoint is saved, i.e. after the update of the batch); a resumed stream starts right after.
    """

    def __init__(self, requests: list[EditRequest], batch_size: int, done: Callable[[], int]):
        self.requests, self.batch_size, self.done = requests, batch_size, done
        self.start = 0

    def __len__(self) -> int:  # all batches: Lightning's restored batch index counts the edited ones
        return -(-len(self.requests) // self.batch_size)

    def __iter__(self) -> Iterator[list[EditRequest]]:
        for i in range(self.start, len(self.requests), self.batch_size):
            yield self.requests[i : i + self.batch_size]

    def state_dict(self) -> dict:
        return {"done": self.done(), "num_requests": len(self.requests), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state["num_requests"] != len(self.requests) or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"cannot resume: the checkpoint's run edits {state['num_requests']} requests in batches of "
                f"{state['batch_size']}, this one {len(self.requests)} in batches of {self.batch_size}"
            )
        self.start = state["done"]


class EditDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: Optional[str] = None,
        format: Format = "auto",
        num_edits: Optional[int] = None,
        batch_size: int = 25,
        on_invalid: Literal["error", "skip"] = "error",
        order: Literal["file", "seeded"] = "file",
        unique_subjects: bool = False,
        seed: int = 0,
    ):
        """Edit requests, in sequential batches.

        Args:
            path: JSON or JSON-lines file of edit requests; None = the shipped quickstart set.
            format: "rome", "easyedit", "zsre", or "auto" (detected per record).
            num_edits: how many requests to edit in all (the first valid ones); None = all.
            batch_size: requests per sequential edit batch (one training step each).
            on_invalid: "error" stops at the first bad record; "skip" skips and counts them.
            order: "file" edits the records in file order; "seeded" in an order shuffled with `seed`.
            unique_subjects: leave out (and count) a request whose subject is already in the
                stream, as the paper's sampled sets (e.g. 413 of the 10,000 records of
                counterfact-edit.json repeat an earlier record's subject).
            seed: fixes the "seeded" order.
        """
        super().__init__()
        self.path = path
        self.format = format
        self.num_edits = num_edits
        self.batch_size = batch_size
        self.on_invalid = on_invalid
        self.order, self.unique_subjects, self.seed = order, unique_subjects, seed
        self.requests: list[EditRequest] = []
        self.skipped: list[InvalidRecord] = []  # invalid records (on_invalid: skip)
        self.repeated: list[RepeatedSubject] = []  # left out by unique_subjects

    def setup(self, stage: str) -> None:
        if self.requests:
            return
        path = self.path or QUICKSTART_PATH
        self.requests, left_out = read_requests(path, self.format, self.num_edits, self.on_invalid, self.order,
                                                self.seed, self.unique_subjects)
        self.repeated = [e for e in left_out if isinstance(e, RepeatedSubject)]
        self.skipped = [e for e in left_out if not isinstance(e, RepeatedSubject)]
        if self.repeated:
            print(f"[encore-pl] left out {len(self.repeated)} requests whose subject was already in the stream")
        if self.skipped:
            print(f"[encore-pl] skipped {len(self.skipped)} invalid records of {path}:")
            for err in self.skipped[:10]:
                print(f"  {err}")

    def train_dataloader(self) -> RequestStream:
        return RequestStream(self.requests, self.batch_size, done=lambda: self.trainer.lightning_module.requests_done())

    def val_dataloader(self):
        # `fit` scores before and after editing itself; the validation loop is for `validate`.
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return DataLoader(self.requests, batch_size=self.batch_size, shuffle=False, collate_fn=list)
