"""Several processes editing one model: how a batch is shared, and the strategy that runs them.

Every process loads the same model and sees every edit batch. Within a batch, request i belongs
to process i % world: each process computes the target vectors and keys of its own requests,
and all of them are gathered back into the batch's order. Process 0 solves each layer's update
and broadcasts it, so every process adds the bit-identical increment (solving on every process
would also agree, but only as far as every process's linear algebra rounds alike). No request is
padded in or counted twice, whatever the batch size.
"""

import json
from typing import Optional, TypeVar

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

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
        size = self.broadcast(torch.tensor([len(data)], dtype=torch.long))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(int(size), dtype=torch.uint8)
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


class EditingDDPStrategy(DDPStrategy):
    """DDP for editing: the processes, launchers (Lightning, torchrun, SLURM) and collectives of
    Lightning's DDP, without the DistributedDataParallel wrapper. The wrapper exists to average
    parameter gradients; here no parameter is trained (each process optimises target vectors of
    its own requests, and weight updates are broadcast by `LeastSquaresUpdate`), and the wrapper
    refuses a module with no trainable parameter."""

    def configure_ddp(self) -> None:
        pass  # keep the LightningModule unwrapped


def editing_strategy(strategy: object, devices: object, num_nodes: Optional[int]) -> object:
    """Replace Lightning's "ddp" (asked for, or what "auto" picks for several processes) by ours."""
    several = num_nodes not in (None, 1)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        several |= int(devices) > 1
    elif isinstance(devices, (list, tuple)):
        several |= len(devices) > 1
    if strategy == "ddp" or (strategy == "auto" and several):
        return EditingDDPStrategy()
    return strategy
