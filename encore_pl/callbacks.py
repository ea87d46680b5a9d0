"""The weight update: after each edit batch, solve for and add the increment of every edited layer.

Step 3 of METHOD.md. For the layers l_1 < ... < l_m of the window, in order, on the current
(already partly updated) model: keys K at layer l, residual R = Z - H (targets minus the current
output of the z layer), resid = R / (m - j), increment D from the configured solver (ENCORE's
norm-constrained least squares, MEMIT or AlphaEdit), then K K^T joins the running sum of
previous keys.
"""

import time
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Optional

import lightning as L
import torch
from tqdm.auto import tqdm

from .data import EditRequest
from .distributed import Ranks
from .keys import WindowKeys
from .edited import EditedLayers
from .solvers import WoodburySolver

Solve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, resid, keys) -> D


def spread_update(
    edited: EditedLayers,
    tok,
    requests: list[EditRequest],
    prefixes: list[str],
    z_layer: int,
    z: torch.Tensor,
    solve: Solve,
    seconds: Optional[dict[str, float]] = None,
    ranks: Optional[Ranks] = None,
) -> dict[int, "Increment"]:
    """Apply the update layer by layer (the window of `edited`); return {layer: Increment}. A
    non-finite update of any layer undoes those already applied and raises FloatingPointError.

    `seconds` (if given) accumulates the time spent on "keys" and on "solve". With several
    processes (`ranks`), each computes the keys of its share of the requests, all are gathered,
    process 0 solves and broadcasts the increment.
    """
    applied = {}
    seconds = {} if seconds is None else seconds
    ranks = ranks or Ranks()
    lm, layers = edited.lm, edited.layers
    share = ranks.share(requests)
    window = WindowKeys(lm, tok, share, prefixes, z_layer) if share else None
    d_out, d_ff = lm.weight_out_in(layers[0]).shape
    device = lm.model.device
    for j, layer in enumerate(layers):
        start = time.perf_counter()
        if window is not None:
            keys, current = window.at(layer)
        else:  # fewer requests than processes
            keys, current = torch.zeros(0, d_ff, device=device), torch.zeros(0, z.shape[1], device=device)
        keys, current = ranks.gather(keys, len(requests)), ranks.gather(current, len(requests))
        k = keys.T.double()  # [d_ff, n]
        resid = (z.to(current.device) - current).T.double() / (len(layers) - j)  # [d_model, n]
        middle = time.perf_counter()
        # Process 0 solves (float64) and broadcasts the increment as float32, the precision of the
        # cumulative increment it joins: every process then adds the same bits.
        if ranks.rank == 0:
            d = solve(layer, resid, k).to(device, torch.float32)
        else:
            d = torch.empty(d_out, d_ff, dtype=torch.float32, device=device)
        d = ranks.broadcast(d.contiguous())
        seconds["keys"] = seconds.get("keys", 0.0) + middle - start
        seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - middle
        if not torch.isfinite(d).all():
            for done in applied.values():  # undo: the weights are left exactly as they were
                done.restore()
            raise FloatingPointError(f"the update of layer {layer} is not finite")
        applied[layer] = Increment(d, k, edited.increment(layer).clone(), edited, layer)
        edited.add(layer, d)
    return applied


class Increment(NamedTuple):
    """One layer's applied update: increment D [out, in], keys K [d_ff, n], the cumulative
    increment before it."""

    d: torch.Tensor
    k: torch.Tensor
    before: torch.Tensor
    edited: EditedLayers
    layer: int

    def restore(self) -> None:
        """The layer's cumulative increment and weight as they were (bitwise: the weight is a
        function of the increment)."""
        self.edited.increment(self.layer).copy_(self.before)
        self.edited.set_weight(self.layer)


class LeastSquaresUpdate(L.Callback):
    """Applies the solver's closed-form update to the located down matrices after each step.

    One `WoodburySolver` per edited layer caches that layer's M^-1 across batches, on process 0
    (the only one that solves), on `solver.state_device`. The cache is no state of its own: it is
    rebuilt from the running key sums (what checkpoints carry).
    """

    def __init__(self) -> None:
        self.solvers: dict[int, WoodburySolver] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.solvers = {}  # C0 and the key sums may be new: rebuild on first use

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = pl_module
        cfg, edited = m.solver, m.edited_layers

        def solve(layer: int, resid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            if layer not in self.solvers:
                self.solvers[layer] = WoodburySolver(cfg, m.c0[layer], m.projectors.get(layer))
            return self.solvers[layer].solve(resid, k, edited.key_sums[layer] if cfg.use_prev_keys else None)

        def reject(requests: list[EditRequest], reason: str) -> None:
            ids = [r.case_id for r in requests]
            if m.on_nonfinite == "error":
                raise FloatingPointError(f"edit batch {batch_idx}: {reason} (requests {ids}); the weights are as "
                                         "they were before this batch (on_nonfinite: skip goes on without them)")
            m.skipped += [{"case_id": i, "batch": batch_idx, "reason": reason} for i in ids]

        z = outputs["z"]
        finite = torch.isfinite(z).all(dim=1).tolist()
        if not all(finite):
            reject([r for r, ok in zip(batch, finite) if not ok], "non-finite target vector")
            batch, z = [r for r, ok in zip(batch, finite) if ok], z[torch.tensor(finite, device=z.device)]
        phases = {"z": outputs["z_seconds"]}
        try:
            applied = spread_update(edited, m.tokenizer, batch, m.context_prefixes, m.z_layer, z, solve, phases, m.ranks) if batch else {}
        except FloatingPointError as e:
            reject(batch, str(e))
            batch, applied = [], {}
        for layer, inc in applied.items():
            if layer in self.solvers:  # process 0's
                self.solvers[layer].absorb(inc.k)
            edited.add_keys(layer, inc.k)  # process 0 holds the key sums
        m.edited.extend(batch)

        seconds = time.perf_counter() - outputs["start"]
        steps = outputs["steps"].float()
        norms = {l: m.lm.weight_out_in(l).float().norm().item() for l in applied}
        m.history.append({
            "batch": batch_idx,
            "num_edits": len(m.edited),
            "seconds": seconds,
            "phase_seconds": phases,  # z optimisation, keys (with residuals), solves
            "z_steps_mean": steps.mean().item(),
            "weight_norm": {str(l): v for l, v in norms.items()},
            "weight_norm_ratio": {str(l): v / m.original_norms[l] for l, v in norms.items()},
            "increment_norm": {str(l): inc.d.norm().item() for l, inc in applied.items()},
            # solves (so far, process 0) that took the plain path because the cached system was not SPD
            "solve_fallbacks": sum(s.fallbacks for s in self.solvers.values()),
        })
        log = {"edit/seconds": seconds, "edit/z_steps_mean": steps.mean().item(), "edit/z_steps_max": steps.max().item()}
        for layer, inc in applied.items():
            log[f"weight_norm/layer_{layer}"] = norms[layer]
            log[f"increment_norm/layer_{layer}"] = inc.d.norm().item()
        m.log_dict(log, on_step=True, on_epoch=False, batch_size=max(len(batch), 1))
        m.record_batch(outputs, batch, batch_idx)


class DownstreamEvaluation(L.Callback):
    """Few-shot downstream ability and perplexity, before the first batch and every N batches
    (with several processes, each scores its share of the items and sequences).

    Two protocols (`encore_pl.downstream` describes both):

    * "logprob" (default): each task's answer is the label word with the highest log-probability
      after a k-shot prompt. Right for small models and for trends across edits: no answer is
      lost to unparseable generations, so there is less noise.
    * "paper": the published ENCORE `glue_eval` protocol (which AlphaEdit reuses), reproduced
      exactly (its prompts, greedy generation of 3 tokens parsed for the label word, weighted F1
      with invalid answers counted). Right for comparing with published tables; on small models greedy parsing
      is unreliable (many answers name no label) and the numbers are noisy.

    Scores go to TensorBoard (against the number of edits) and to results.json (`downstream`,
    `perplexity`, `downstream_history`, `downstream_protocol`); each history point names its
    `protocol`, and a resumed run must keep the protocol it started with.
    """

    def __init__(
        self,
        every_n_batches: int = 2,
        tasks: list[str] = ["sst2", "mrpc", "cola", "rte", "nli", "mmlu"],
        data_dir: Optional[str] = None,
        k_shot: Optional[int] = 4,
        n_items: Optional[int] = 100,
        perplexity_file: Optional[str] = None,
        perplexity_tokens: int = 20000,
        batch_size: int = 8,
        hf_datasets: Optional[dict[str, str]] = None,
        protocol: Literal["paper", "logprob"] = "logprob",
    ):
        """
        Args:
            every_n_batches: evaluate after every N edit batches (and before the first, and after the last).
            tasks: among sst2, mrpc, cola, rte, nli, mmlu.
            data_dir: folder of `<task>.json` files (default: ../shared/data/encore-eval/glue_eval,
                or $ENCORE_PL_SHARED_DATA/encore-eval/glue_eval).
            k_shot: shots per prompt, taken from the first records of each task ("paper": at
                most 10; None = the published 4).
            n_items: items scored per task: "logprob" the ones after the shots (None = all of
                them), "paper" the ones after the first 10 records (None = the published 100).
            perplexity_file: held-out text for perplexity (None = no perplexity).
            perplexity_tokens: tokens of that file to use.
            batch_size: sequences per forward pass.
            hf_datasets: for online users, {task: "path[:config]:split"} read through `datasets`
                instead of `data_dir` (the records must have the fields of the shipped sets).
            protocol: "logprob" (label-word log-probabilities; small models, trends) or "paper"
                (the published generate-and-parse protocol; comparison with published tables).
        """
        from .downstream import PROTOCOLS

        if protocol not in PROTOCOLS:
            raise ValueError(f"DownstreamEvaluation: protocol must be one of {', '.join(map(repr, PROTOCOLS))}, "
                             f"got {protocol!r}")
        if protocol == "logprob" and k_shot is None:
            raise ValueError("DownstreamEvaluation: the logprob protocol needs k_shot (None is only for protocol: paper)")
        self.protocol = protocol
        self.every_n_batches = every_n_batches
        self.tasks = list(tasks)
        self.data_dir = data_dir
        self.k_shot, self.n_items, self.batch_size = k_shot, n_items, batch_size
        self.perplexity_file, self.perplexity_tokens = perplexity_file, perplexity_tokens
        self.hf_datasets = dict(hf_datasets or {})
        self.records: dict[str, list[dict]] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        from .downstream import load_task

        # Read and check every task now: bad data fails before any edit is made.
        self.records = {t: load_task(t, self.data_dir, self.hf_datasets.get(t)) for t in self.tasks}
        if self.perplexity_file and not Path(self.perplexity_file).exists():
            raise FileNotFoundError(f"perplexity_file {self.perplexity_file!r} does not exist")

    def evaluate(self, trainer, pl_module) -> None:
        from .downstream import perplexity, score_task

        self.check_history(pl_module)
        point = {"num_edits": len(pl_module.edited)}
        model, tok = pl_module.model, pl_module.tokenizer
        for task in tqdm(self.tasks, desc=f"downstream evaluation at {point['num_edits']} edits", leave=False):
            point[task] = score_task(model, tok, task, self.records[task], self.k_shot, self.n_items, self.batch_size,
                                     pl_module.ranks, protocol=self.protocol)["f1"]
        if self.perplexity_file:
            point["perplexity"] = perplexity(model, tok, self.perplexity_file, self.perplexity_tokens, batch_size=self.batch_size,
                                             ranks=pl_module.ranks)
        point["protocol"] = self.protocol  # not a score: results.json's `downstream_protocol`
        pl_module.downstream_history.append(point)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"downstream/{k}": v for k, v in point.items() if k not in ("num_edits", "protocol")},
                                       step=point["num_edits"])

    def check_history(self, pl_module) -> None:
        """A resumed run's earlier points (no `protocol`: "logprob") must use this protocol."""
        earlier = {p.get("protocol", "logprob") for p in pl_module.downstream_history}
        if earlier - {self.protocol}:
            raise ValueError(f"DownstreamEvaluation: protocol {self.protocol!r}, but the run's downstream_history was "
                             f"scored with {', '.join(map(repr, sorted(earlier)))}; pre/post scores would not compare")

    def on_train_start(self, trainer, pl_module) -> None:
        self.check_history(pl_module)
        if not pl_module.downstream_history:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_batches and (batch_idx + 1) % self.every_n_batches == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.downstream_history[-1]["num_edits"] != len(pl_module.edited):
            self.evaluate(trainer, pl_module)
