"""Metrics reduce across processes: 2 CPU processes (gloo) give what 1 process gives."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from encore_pl.metrics import CounterFactScores, GenerationEntropy

from conftest import free_port

g = torch.Generator().manual_seed(0)
DATA = {
    "efficacy": (torch.rand(7, generator=g) > 0.3).float(),
    "paraphrase": torch.rand(7, generator=g),
    "neighborhood": torch.rand(7, generator=g),
    "efficacy_magnitude": torch.rand(7, generator=g) - 0.5,
    "paraphrase_magnitude": torch.rand(7, generator=g) - 0.5,
    "neighborhood_magnitude": torch.rand(7, generator=g) - 0.5,
}
ENTROPY = torch.rand(7, generator=g) * 6
SHARDS = [slice(0, 4), slice(4, 7)]  # uneven on purpose


def compute(shards):
    scores, entropy = CounterFactScores(), GenerationEntropy()
    for s in shards:
        scores.update({k: v[s] for k, v in DATA.items()})
        entropy.update(ENTROPY[s])
    return {**scores.compute(), "generation_entropy": entropy.compute().item()}


def worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = compute([SHARDS[rank]])
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    one = compute(SHARDS)
    assert two.keys() == one.keys()
    for k in one:
        assert abs(two[k] - one[k]) < 1e-9, k
    # and not trivially: one shard alone differs
    assert abs(compute([SHARDS[0]])["efficacy_score"] - one["efficacy_score"]) > 1e-6 or \
        abs(compute([SHARDS[0]])["paraphrase_score"] - one["paraphrase_score"]) > 1e-6
