"""One of 2 processes started by tests/test_distributed.py: joins a gloo group from MASTER_ADDR,
MASTER_PORT, RANK and WORLD_SIZE, then runs one scenario:

    gloo_worker.py require_same VALUE   Ranks.require_same(VALUE); exit 3 after printing its error
    gloo_worker.py watch clean          a FailureWatch; process 1 finishes 3 s after process 0
    gloo_worker.py watch raise1         process 1 reports a ValueError; process 0 waits (as if stuck)
    gloo_worker.py watch killed0        process 0 is killed (SIGKILL); process 1 waits (as if stuck)
"""

import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encore_pl.distributed import FailureWatch  # noqa: E402
from encore_pl.ranks import Ranks  # noqa: E402


def watch(scenario: str, rank: int) -> None:
    w = FailureWatch(timedelta(seconds=60))
    start = time.monotonic()
    if scenario == "clean":
        time.sleep(3 * rank)
        w.finish()
        print(f"process {rank} finished after {time.monotonic() - start:.1f} s", flush=True)
    elif scenario == "raise1" and rank == 1 or scenario == "killed0" and rank == 0:
        time.sleep(1)
        if scenario == "killed0":
            os.kill(os.getpid(), signal.SIGKILL)
        w.report(ValueError("disk full\nsecond line"))
        sys.exit(2)
    else:
        time.sleep(60)  # stands for a collective the failed process never joins
        print(f"process {rank} was not ended", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    if sys.argv[1] == "require_same":
        try:
            Ranks().require_same(sys.argv[2], "base model weights")
        except ValueError as e:
            print(f"error: {e}", flush=True)
            # leave at once, as a failed run does (distributed.py): an interpreter exit would run gloo's
            # destructors while the other process may already be gone, and those can abort (SIGABRT)
            os._exit(3)
        dist.barrier()  # neither leaves while the other may still use process 0's store
        dist.destroy_process_group()
    else:
        watch(sys.argv[2], dist.get_rank())
