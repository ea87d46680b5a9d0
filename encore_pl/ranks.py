"""This process's place among a run's processes, and the collectives the edit code uses.

One process (no torch.distributed group): every method is a no-op. With a group (a DDP run made
by distributed.py), requests are shared round-robin and results gathered in batch order.
"""

import json
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class Ranks:
    """This process's place among the run's processes (one process: every method is a no-op)."""

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1
        # where collectives run: NCCL only takes tensors on this process's GPU
        nccl = on and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def share(self, items: list[T]) -> list[T]:
        """This process's items: every world-th, starting at its rank."""
        return list(items[self.rank :: self.world])

    def gather(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's `share` results [n_rank, ...] back into the order of the n items."""
        if self.world == 1:
            return part
        size = -(-n // self.world)
        padded = torch.zeros((size, *part.shape[1:]), dtype=part.dtype, device=self.device)
        padded[: len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.stack([parts[i % self.world][i // self.world] for i in range(n)]).to(part.device) if n else part

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Process 0's tensor, on every process (in place)."""
        if self.world > 1:
            on_device = tensor.to(self.device)
            dist.broadcast(on_device, src=0)
            tensor.copy_(on_device)
        return tensor

    def broadcast_object(self, obj: T) -> T:
        """Process 0's JSON-serialisable object, on every process (sent as JSON text, not pickled)."""
        if self.world == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == 0 else b""
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.long, device="cpu"))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8, device="cpu")
        return json.loads(bytes(self.broadcast(buffer).tolist()).decode())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes (in place)."""
        if self.world > 1:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device)
            tensor.copy_(on_device)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def require_same(self, value: str, what: str) -> None:
        """Raise on every process (so that none waits for the others in vain) if any process's `value`
        (e.g. a sha256 of the base weights) differs from process 0's."""
        if self.world == 1:
            return
        data = torch.tensor(list(value.encode()), dtype=torch.uint8, device="cpu")  # moved by gather
        sizes = self.gather(torch.tensor([len(data)], device="cpu"), self.world).tolist()  # item i = process i's
        padded = torch.zeros(max(1, *sizes), dtype=torch.uint8, device="cpu")
        padded[: len(data)] = data
        rows = self.gather(padded[None], self.world)
        values = [bytes(row[:size].tolist()).decode() for row, size in zip(rows, sizes)]
        differ = [rank for rank, v in enumerate(values) if v != values[0]]
        if differ:
            names = "process" + "es" * (len(differ) > 1) + " " + ", ".join(map(str, differ))
            raise ValueError(f"{names} loaded different {what} than process 0 ({values[differ[0]]!r} on process "
                             f"{differ[0]}, {values[0]!r} on process 0); every process, on every node, must load "
                             f"the same {what}")
