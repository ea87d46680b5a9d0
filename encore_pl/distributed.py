"""Several processes editing one model: the strategy that runs them, and one failure ending all.

Every process loads the same model and sees every edit batch. Within a batch, request i belongs
to process i % world: each process computes the target vectors and keys of its own requests,
and all of them are gathered back into the batch's order. Process 0 solves each layer's update
and broadcasts it, so every process adds the bit-identical increment (solving on every process
would also agree, but only as far as every process's linear algebra rounds alike). No request is
padded in or counted twice, whatever the batch size. The collectives the edit code calls are
`ranks.Ranks`'s; this module is the Lightning side.
"""

import os
import threading
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector




class FailureWatch:
    """Ends every process of the run promptly when one of them fails.

    Without it, an exception on one process (say process 0 failing to write a file) leaves the others
    waiting in their next collective until its timeout (30 min), and Lightning's own launcher does not
    stop its children when process 0 fails. This owns a few keys in the process group's c10d store,
    the key-value server every process already reaches (hosted by process 0 under Lightning's launcher
    and SLURM, which initialise through env://, by torchrun's agent under torchrun):

    * `report` (from the strategy's `on_exception`) writes "process R failed: <error>"; the first
      failure wins, later ones (often consequences of the first) only count themselves as ended.
    * a daemon thread per process polls the store every `INTERVAL` s; when the failure appears, or
      the store has gone (the process hosting it ended), it prints `encore-pl: error: ...` and ends its
      process with `os._exit(1)`: the main thread may be stuck in a collective that no exception
      reaches. It uses its own connection (`store.clone()`), so a main thread blocked in a store wait
      does not hold it up.
    * `finish` (from the strategy's `teardown` after a run without exception) counts this process as
      done and returns once every process is.
    * process 0, which may host the store, leaves last (`_linger`): after a failure once every process
      has seen it, after a clean end once every process has seen that everyone is done; otherwise
      a process still looking would find the store gone and take a clean end for a failure.
    """

    INTERVAL = 0.5  # seconds between two looks at the store
    runs = 0  # every process starts the same sequence of runs, so they agree on the keys

    def __init__(self, timeout: timedelta) -> None:
        store = dist.distributed_c10d._get_default_store()
        try:
            self.store = store.clone()
        except (AttributeError, NotImplementedError, RuntimeError):
            self.store = store
        self.rank, self.world, self.timeout = dist.get_rank(), dist.get_world_size(), timeout.total_seconds()
        FailureWatch.runs += 1
        self.key = f"encore_pl/failure_watch/{FailureWatch.runs}/"
        self.finishing, self.stopped = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, name="encore-pl-failure-watch", daemon=True)
        self.thread.start()

    def _count(self, name: str, add: int = 0) -> int:
        return int(self.store.add(self.key + name, add))

    def _linger(self, name: str) -> None:
        """On process 0: wait (a few seconds at most) until every process has counted itself in `name`."""
        deadline = time.monotonic() + 10 * self.INTERVAL
        while self.rank == 0 and self._count(name) < self.world and time.monotonic() < deadline:
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.stopped.wait(self.INTERVAL):
            failure = None
            try:
                if self.store.check([self.key + "failure"]):
                    failure = self.store.get(self.key + "failure").decode()
                if failure is None and self.finishing.is_set() and self._count("done") >= self.world:
                    self._count("released", 1)
                    self._linger("released")
                    return
                if failure is not None and not self.stopped.is_set():
                    self._count("ended", 1)
                    self._linger("ended")
            except Exception as e:  # the store has gone: the process hosting it ended
                if failure is None and self.finishing.is_set():  # this process finished cleanly: nothing to wait for
                    return
                why = (str(e).strip().splitlines() or [""])[0]
                failure = failure or ("lost contact with the process group's store "
                                      f"(process 0 or torchrun's agent ended): {why}")
            if failure is not None and not self.stopped.is_set():  # (stopped: this process failed itself)
                os.write(2, f"encore-pl: error: {failure}\n".encode())
                os._exit(1)

    def report(self, error: BaseException) -> None:
        """This process failed: tell the others (it then ends through its own exception)."""
        if self.stopped.is_set():
            return
        self.stopped.set()  # its own watcher must not end it before its exception is shown
        summary = (str(error).strip().splitlines() or [""])[0][:500]
        try:
            if self._count("failures", 1) == 1:
                self.store.set(self.key + "failure", f"process {self.rank} failed: {type(error).__name__}: {summary}")
            self._count("ended", 1)
            self._linger("ended")
        except Exception:
            pass  # the store has gone too: the others notice that by themselves

    def finish(self) -> None:
        """A clean end: wait until every process has ended cleanly too (a failure elsewhere ends this one)."""
        if self.stopped.is_set():
            return
        self._count("done", 1)
        self.finishing.set()
        self.thread.join(self.timeout)
        if self.thread.is_alive():
            error = TimeoutError(f"only {self._count('done')} of {self.world} processes finished within "
                                 f"{self.timeout:.0f} s of process {self.rank}")
            self.report(error)
            raise error


class EditingDDPStrategy(DDPStrategy):
    """DDP for editing: the processes, launchers (Lightning, torchrun, SLURM) and collectives of
    Lightning's DDP, without the DistributedDataParallel wrapper. The wrapper exists to average
    parameter gradients; here no parameter is trained (each process optimises target vectors of
    its own requests, and weight updates are broadcast by `LeastSquaresUpdate`), and the wrapper
    refuses a module with no trainable parameter. With several processes, a `FailureWatch` ends them
    all when one fails."""

    failure_watch: Optional[FailureWatch] = None

    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self.failure_watch is None and dist.get_world_size() > 1:
            self.failure_watch = FailureWatch(self._timeout)

    def configure_ddp(self) -> None:
        pass  # keep the LightningModule unwrapped

    def on_exception(self, exception: BaseException) -> None:
        # Lightning calls this on the failing process (trainer/call.py, _call_and_handle_interrupt ->
        # _interrupt), before `teardown`, for any exception out of fit/validate, KeyboardInterrupt included
        super().on_exception(exception)
        if self.failure_watch is not None:
            self.failure_watch.report(exception)

    def teardown(self) -> None:
        watch, self.failure_watch = self.failure_watch, None
        if watch is not None:
            watch.finish()  # returns at once after `report`
        super().teardown()


def _refused(what: str) -> ValueError:
    return ValueError(f"--trainer.strategy {what} is not supported: every process must hold the whole model, "
                      "unwrapped; use --trainer.strategy ddp (the project's EditingDDPStrategy) for several "
                      "processes, GPUs or nodes")


def process_count(devices: object, num_nodes: Optional[int], accelerator: object = "auto") -> int:
    """How many processes Lightning will start for these trainer settings, resolved as Lightning does
    (trainer/connectors/accelerator_connector.py): accelerator "auto" is TPU, MPS, CUDA or CPU, the first
    available; "gpu" MPS or CUDA; devices "auto" the accelerator's `auto_device_count`, anything else
    (-1, "-1", "0,1", [0, 2], 4, "4") through the accelerator's `parse_devices`/`get_parallel_devices`."""
    if accelerator in (None, "auto"):
        accelerator = _AcceleratorConnector._choose_auto_accelerator()
    elif accelerator == "gpu":
        if not (MPSAccelerator.is_available() or CUDAAccelerator.is_available()):
            raise ValueError("--trainer.accelerator gpu: this machine has no GPU (neither CUDA nor MPS)")
        accelerator = _AcceleratorConnector._choose_gpu_accelerator_backend()
    if isinstance(accelerator, Accelerator):
        kind = type(accelerator)
    elif isinstance(accelerator, str) and accelerator in AcceleratorRegistry:
        kind = AcceleratorRegistry[accelerator]["accelerator"]
    else:
        raise ValueError(f"--trainer.accelerator {accelerator!r} is not one of auto, gpu, "
                         f"{', '.join(sorted(AcceleratorRegistry.available_accelerators()))}")
    try:
        if devices in (None, "auto"):
            per_node = kind.auto_device_count()
        else:
            per_node = len(kind.get_parallel_devices(kind.parse_devices(devices)))
    except Exception as e:  # Lightning's own message, e.g. more GPUs asked for than the machine has
        raise ValueError(f"--trainer.devices {devices!r} with {kind.__name__}: {' '.join(str(e).split())}") from None
    return per_node * (num_nodes or 1)


def editing_strategy(strategy: object, devices: object, num_nodes: Optional[int], accelerator: object = "auto") -> object:
    """The strategy to give Lightning: the project's EditingDDPStrategy wherever Lightning would use its
    DDP (asked for by any `ddp*` name, or what "auto" picks for several processes, several devices or
    nodes); refused, with a message, where the run could not work.

    `ddp_spawn`, `ddp_fork` and `ddp_notebook` also become EditingDDPStrategy, which starts processes
    the way `ddp` does (Lightning's launcher runs the script again per device; torchrun and SLURM start
    them themselves): each process loads the model itself rather than receiving it pickled (spawn) or
    sharing this process's memory (fork). `find_unused_parameters` only concerns the DDP wrapper,
    which is not used. The other parallel strategies (FSDP, DeepSpeed, XLA) shard or wrap the model,
    and Lightning's DDPStrategy given as an object wraps it: all are refused, as is a single-device
    strategy for several processes."""
    strategy, kind = "auto" if strategy is None else strategy, None
    if isinstance(strategy, str):
        strategy = strategy.lower()
        if strategy != "auto" and strategy not in StrategyRegistry:
            raise ValueError(f"--trainer.strategy {strategy!r} is not a strategy Lightning knows; "
                             "use ddp for several processes")
        if strategy != "auto":
            kind = StrategyRegistry[strategy]["strategy"]
        if kind is not None and kind is not DDPStrategy and issubclass(kind, ParallelStrategy):
            raise _refused(strategy)  # FSDP, DeepSpeed, XLA (the last two subclass DDPStrategy) shard or wrap the model
    elif not isinstance(strategy, Strategy):
        raise ValueError(f"--trainer.strategy {strategy!r} is neither a strategy name nor a Strategy")
    elif isinstance(strategy, ParallelStrategy) and not isinstance(strategy, EditingDDPStrategy):
        raise _refused(type(strategy).__name__)  # Lightning's DDPStrategy (the wrapper), FSDP, DeepSpeed...
    several = process_count(devices, num_nodes, accelerator) > 1  # also checks the devices asked for
    if isinstance(strategy, EditingDDPStrategy):
        return strategy
    if kind is DDPStrategy or (several and strategy == "auto"):
        return EditingDDPStrategy()
    if several:  # a single-device strategy ("single_device", "single_xla", an instance) for several processes
        raise _refused(f"{strategy if isinstance(strategy, str) else type(strategy).__name__} with several processes")
    return strategy
