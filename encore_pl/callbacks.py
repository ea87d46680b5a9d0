"""The callbacks of an editing run: the weight update after each edit batch, and downstream
ability measured every N batches."""

import time
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from tqdm.auto import tqdm



class LeastSquaresUpdate(L.Callback):
    """After each training step (the batch's target vectors), applies the norm-constrained
    least-squares update (steps 2-3 of METHOD.md) through the module's `Editor`, and logs it.
    The module adds it (`configure_callbacks`); `EditCheckpoint`, a Lightning Checkpoint, runs
    after every other callback, so the checkpoint of a batch holds its update."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        editor = pl_module.editor
        record = editor.update(batch, outputs, batch_idx, {"z": outputs["z_seconds"]})
        seconds = editor.state.history[-1]["seconds"] = time.perf_counter() - outputs["start"]
        steps = outputs["steps"].float()
        log = {"edit/seconds": seconds, "edit/z_steps_mean": steps.mean().item(), "edit/z_steps_max": steps.max().item()}
        for layer, norm in record["weight_norm"].items():
            log[f"weight_norm/layer_{layer}"] = norm
            log[f"increment_norm/layer_{layer}"] = record["increment_norm"][layer]
        pl_module.log_dict(log, on_step=True, on_epoch=False, batch_size=max(len(record["requests"]), 1))
        experiment = getattr(pl_module.logger, "experiment", None)
        if hasattr(experiment, "add_histogram") and trainer.is_global_zero:
            n = record["num_edits"]
            experiment.add_histogram("edit/target_prob_at_stop", outputs["target_prob"], n)
            experiment.add_histogram("edit/natural_prob_of_true_object", torch.tensor(pl_module.natural_probs, device="cpu"), n)
            experiment.add_histogram("edit/z_steps", steps, n)


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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.measure_last_batch(trainer, pl_module)

    def measure_last_batch(self, trainer, pl_module) -> None:
        """After every N batches, once the update is done: before the next batch starts (or at
        the end), so the update is measured whatever the order of callbacks, and a resumed run
        measures what its last checkpoint did not hold."""
        last = pl_module.history[-1] if pl_module.history else None
        if (last and self.every_n_batches and (last["batch"] + 1) % self.every_n_batches == 0
                and pl_module.downstream_history[-1]["num_edits"] != last["num_edits"]):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure_last_batch(trainer, pl_module)
        if pl_module.downstream_history[-1]["num_edits"] != len(pl_module.edited):
            self.evaluate(trainer, pl_module)
