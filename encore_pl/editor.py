"""The edit engine as a library: an `Editor` edits a loaded model in place, batch after batch.

One edit batch flows one way (METHOD.md):
    Editor.target_vectors(batch)      step 1: z with MPES (this process's share, gathered)
    Editor.update(batch, targets)     steps 2-3: keys, residuals, the least-squares increments
The Lightning run calls the first in `KnowledgeEditor.training_step` and the second in the
`LeastSquaresUpdate` callback; `Editor.edit` calls both, batch after batch, for use from Python.

The lifelong state (what editing changed or accumulated) is one `LifelongState`: the edited
layers' cumulative increments and running key sums, the context prefixes, the requests edited
and skipped, and the per-batch records. `Editor.save` writes it with the edit patch; `Editor.load`
continues the same lifelong stream on another copy of the base model. Nothing here imports
Lightning.
"""

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .data import EditRequest
from .edited import EditedLayers
from .evaluation import EvaluationConfig, score_requests
from .files import replaced
from .layouts import LocatedModel
from .metrics import CounterFactScores
from .patches import save_patch, weights_sha256
from .prompts import generate_context_prefixes
from .ranks import Ranks
from .reference import reference_target_vectors
from .solvers import SOLVERS, SolverConfig, WoodburySolver, nullspace_projector
from .update import spread_update
from .stats import KeyStatistics, compute_key_statistics
from .target_vectors import TargetOptimization, compute_target_vectors, step_model

STATE_FORMAT = 1  # of Editor.save's directory
MODEL_KEYS = ("model_name_or_path", "dtype", "trust_remote_code")  # how a run loads its model: not the editor's


@dataclass
class EditorConfig:
    """Everything that decides an edit: the `model:` section of a run config without the keys
    that say how to load the model.

    Args:
        layers: the window of consecutive layers whose MLP down matrices are edited.
        z_layer: the layer whose output holds the target vectors (None: last of `layers`).
        solver: the least-squares update (method, lambda_p, lambda_n, previous keys).
        target: the target-vector optimisation and MPES.
        key_stats: the corpus and size of the key statistics C0.
        evaluation: how edits are scored (and, in a run, when).
        on_nonfinite: "error" stops at a non-finite target vector or update, weights as before
            the batch; "skip" leaves those requests unedited and goes on.
        seed: fixes the context prefixes.
    """

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    z_layer: Optional[int] = None
    solver: SolverConfig = field(default_factory=SolverConfig)
    target: TargetOptimization = field(default_factory=TargetOptimization)
    key_stats: KeyStatistics = field(default_factory=KeyStatistics)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    on_nonfinite: Literal["error", "skip"] = "error"
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "EditorConfig":
        """From plain values (nested dicts for the sections); unknown keys are an error naming them."""
        return _build(cls, {k: v for k, v in values.items() if k not in MODEL_KEYS}, source)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "EditorConfig":
        """From a run config (its `model:` section) or a file holding just that section."""
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        return cls.from_dict(values.get("model", values), str(path))

    def to_dict(self) -> dict:
        return asdict(self)


def _build(kind, values: dict, where: str):
    """A dataclass from a dict, recursing into dataclass-typed fields."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping for {kind.__name__}, got {values!r}")
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)} for {kind.__name__} "
                         f"(known: {', '.join(known)})")
    args = {}
    for name, value in values.items():
        default = known[name].default_factory() if callable(known[name].default_factory) else known[name].default
        args[name] = _build(type(default), value, f"{where}: {name}") if is_dataclass(default) else value
    return kind(**args)


@dataclass
class LifelongState:
    """What editing changed or accumulated, as one piece (saved by `Editor.save` and by checkpoints).

    The tensors (cumulative increments, running key sums) live in `layers`; the rest are plain
    records: the context prefixes, the requests edited and skipped, one record per batch, and per
    request the z steps and P(new target) when its optimisation stopped.
    """

    layers: EditedLayers
    context_prefixes: list[str] = field(default_factory=list)
    edited: list[EditRequest] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"case_id", "batch", "reason"}
    history: list[dict] = field(default_factory=list)
    z_steps: list[int] = field(default_factory=list)
    target_probs: list[float] = field(default_factory=list)

    RECORDS = ("context_prefixes", "skipped", "history", "z_steps", "target_probs")

    def records(self) -> dict:
        """The plain part (JSON types)."""
        return {"edited": [asdict(r) for r in self.edited], **{k: getattr(self, k) for k in self.RECORDS}}

    def load_records(self, records: dict) -> None:
        self.edited = [EditRequest(**r) for r in records["edited"]]
        for k in self.RECORDS:
            setattr(self, k, records[k])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The cumulative increments and (where held) the running key sums, by layer."""
        out = {f"increment_{l}": self.layers.increment(l) for l in self.layers.layers}
        out.update({f"prev_keys_{l}": s for l, s in self.layers.key_sums.items()})
        return out

    def tensor_names(self) -> set[str]:
        return {f"{name}_{l}" for l in self.layers.layers for name in ("increment", "prev_keys")}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Set the increments (and the weights); return the key sums, placed by `Editor.prepare`."""
        layers = self.layers.layers
        self.layers.load_increments({l: tensors[f"increment_{l}"] for l in layers})
        return {l: tensors[f"prev_keys_{l}"] for l in layers}


class Editor:
    """Edits `model` in place with ENCORE, MEMIT or AlphaEdit, keeping the lifelong state.

        editor = Editor(model, tokenizer, EditorConfig.from_yaml("configs/smollm2-135m/encore.yaml"))
        editor.edit(requests, batch_size=25)
        editor.evaluate(requests)          # {"efficacy_score": ..., ...}
        editor.save("my-edits")            # edits.safetensors + the lifelong state
        later = Editor.load("my-edits", model2, tokenizer2)

    The model is put in eval mode and frozen. Work that needs the whole run's settings (context
    prefixes, C0, the reduced-precision copy for the z steps) happens once, on the first edit
    (`prepare`). `ranks` shares each batch among processes (a Lightning DDP run passes its own).
    """

    def __init__(self, model, tokenizer, config: EditorConfig, ranks: Optional[Ranks] = None,
                 model_name: Optional[str] = None):
        cfg = self.config = config
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or "unknown"
        self.ranks = ranks or Ranks()
        self.layers = sorted(cfg.layers)
        if self.layers != list(range(self.layers[0], self.layers[-1] + 1)):
            raise ValueError(f"layers must be a window of consecutive layers, got {cfg.layers}")
        self.z_layer = self.layers[-1] if cfg.z_layer is None else cfg.z_layer
        self.lm = LocatedModel(model)
        self.lm.check_layers(self.layers + [self.z_layer])
        if cfg.target.chunk_size is not None and cfg.target.chunk_size < 1:
            raise ValueError(f"target.chunk_size must be at least 1 (or null), got {cfg.target.chunk_size}")
        if self.z_layer < self.layers[-1]:
            raise ValueError(f"z_layer {self.z_layer} must not precede the last edited layer {self.layers[-1]}")
        self.state = LifelongState(EditedLayers(self.lm, self.layers))
        self.original_norms = {l: self.lm.weight_out_in(l).float().norm().item() for l in self.layers}
        self.base_sha256 = weights_sha256(self.state.layers.base_weights())
        # Made by `prepare` (not state: each is rebuilt from the config and the state).
        self.prepared = False
        self.loaded_key_sums: Optional[dict[int, torch.Tensor]] = None  # from a checkpoint, until placed
        self.c0: dict[int, torch.Tensor] = {}  # float32, host memory
        self.key_stats_info: dict = {}  # tokens, documents and source of C0
        self.projectors: dict[int, torch.Tensor] = {}  # AlphaEdit, process 0
        self.steps_lm: Optional[LocatedModel] = None  # target.compute_dtype's copy of the later blocks
        self.solvers: dict[int, WoodburySolver] = {}  # process 0: M^-1 cached per layer

    @property
    def device(self) -> torch.device:
        return self.model.device

    # Setup ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Context prefixes (once per lifelong stream), C0 of the base model, the solves' state on
        its device, the z steps' reduced-precision copy. Every process calls it."""
        cfg, ranks, state = self.config, self.ranks, self.state
        ranks.require_same(self.base_sha256, "base model weights")
        if not state.context_prefixes:  # sampled once, by process 0, so every process has the same
            prefixes = generate_context_prefixes(self.model, self.tokenizer, cfg.seed) if ranks.rank == 0 else None
            state.context_prefixes = ranks.broadcast_object(prefixes)
        with state.layers.unedited():  # a continued stream holds edits; C0 is the base model's
            self.c0 = compute_key_statistics(self.lm, self.tokenizer, self.layers, cfg.key_stats, ranks, info=self.key_stats_info)
        # The float64 state of the solves exists only where they run: process 0, on state_device.
        state_device = torch.device(cfg.solver.state_device) if cfg.solver.state_device else self.device
        if state_device.type == "mps":  # MPS has no float64
            state_device = torch.device("cpu")
        solves_here = ranks.rank == 0
        if self.loaded_key_sums is not None or not state.layers.key_sums:
            state.layers.place_key_sums(state_device if solves_here else None, self.loaded_key_sums)
        self.loaded_key_sums = None
        dtype = cfg.target.compute_dtype and getattr(torch, cfg.target.compute_dtype)
        if cfg.target.batched and dtype and dtype != self.model.dtype and self.steps_lm is None:
            self.steps_lm = step_model(self.lm, self.z_layer, dtype)
        if SOLVERS[cfg.solver.method].needs_projector and solves_here:  # the eigendecomposition on that device
            self.projectors = {l: nullspace_projector(c.to(state_device), cfg.solver.nullspace_threshold)
                               for l, c in self.c0.items()}
        self.solvers = {}  # C0 and the key sums may be new: rebuilt on first use
        self.prepared = True

    # One edit batch ---------------------------------------------------------------------------

    def target_vectors(self, batch: list[EditRequest]) -> dict:
        """Step 1: the target vectors z [n, d] of the batch (each process optimises its share;
        gathered into the batch's order), with the z steps and P(new) at stop [n] (CPU)."""
        if not self.prepared:
            self.prepare()
        cfg, device = self.config, self.device
        share = self.ranks.share(batch)
        if share and cfg.target.batched:
            tv = compute_target_vectors(self.lm, self.tokenizer, share, self.state.context_prefixes, self.z_layer,
                                        cfg.target, self.steps_lm)
        elif share:
            tv = reference_target_vectors(self.lm, self.tokenizer, share, self.state.context_prefixes, self.z_layer, cfg.target)
        if share:
            z, steps, prob = tv.z, tv.steps.to(device), tv.target_prob.to(device)
        else:  # fewer requests than processes
            z = torch.zeros(0, self.model.config.hidden_size, device=device)
            steps, prob = torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
        n, gather = len(batch), self.ranks.gather
        return {"z": gather(z, n), "steps": gather(steps, n).cpu(), "target_prob": gather(prob, n).cpu()}

    def update(self, batch: list[EditRequest], targets: dict, batch_idx: int, phases: Optional[dict] = None) -> dict:
        """Steps 2-3: spread the batch's update over the window, add its keys to the running sums,
        record the batch. Returns the batch's record (also appended to `state.history`) with the
        requests actually edited under "requests" (not saved)."""
        cfg, state, edited = self.config, self.state, self.state.layers
        phases = {} if phases is None else phases

        def solve(layer: int, resid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            if layer not in self.solvers:
                self.solvers[layer] = WoodburySolver(cfg.solver, self.c0[layer], self.projectors.get(layer))
            return self.solvers[layer].solve(resid, k, edited.key_sums[layer] if cfg.solver.use_prev_keys else None)

        def reject(requests: list[EditRequest], reason: str) -> None:
            ids = [r.case_id for r in requests]
            if cfg.on_nonfinite == "error":
                raise FloatingPointError(f"edit batch {batch_idx}: {reason} (requests {ids}); the weights are as "
                                         "they were before this batch (on_nonfinite: skip goes on without them)")
            state.skipped += [{"case_id": i, "batch": batch_idx, "reason": reason} for i in ids]

        z, steps, probs = targets["z"], targets["steps"], targets["target_prob"]
        finite = torch.isfinite(z).all(dim=1).tolist()
        if not all(finite):
            reject([r for r, ok in zip(batch, finite) if not ok], "non-finite target vector")
            batch, z = [r for r, ok in zip(batch, finite) if ok], z[torch.tensor(finite, device=z.device)]
        try:
            applied = spread_update(edited, self.tokenizer, batch, state.context_prefixes, self.z_layer, z, solve,
                                    phases, self.ranks) if batch else {}
        except FloatingPointError as e:
            reject(batch, str(e))
            batch, applied = [], {}
        for layer, inc in applied.items():
            if layer in self.solvers:  # process 0's
                self.solvers[layer].absorb(inc.k)
            edited.add_keys(layer, inc.k)  # process 0 holds the key sums
        state.edited.extend(batch)
        state.z_steps += steps.tolist()
        state.target_probs += probs.tolist()
        norms = {l: self.lm.weight_out_in(l).float().norm().item() for l in applied}
        record = {
            "batch": batch_idx,
            "num_edits": len(state.edited),
            "phase_seconds": phases,  # z optimisation, keys (with residuals), solves
            "z_steps_mean": steps.float().mean().item() if len(steps) else 0.0,
            "weight_norm": {str(l): v for l, v in norms.items()},
            "weight_norm_ratio": {str(l): v / self.original_norms[l] for l, v in norms.items()},
            "increment_norm": {str(l): inc.d.norm().item() for l, inc in applied.items()},
            # solves (so far, process 0) that took the plain path because the cached system was not SPD
            "solve_fallbacks": sum(s.fallbacks for s in self.solvers.values()),
        }
        state.history.append(record)
        return {**record, "requests": batch}

    def edit(self, requests: list[EditRequest], batch_size: int = 25, progress: bool = True) -> list[dict]:
        """Edit `requests` in sequential batches (continuing the lifelong stream); the batches' records."""
        import time

        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        records = []
        batches = range(0, len(requests), batch_size)
        for start in tqdm(batches, desc="editing", unit="batch", disable=not progress or self.ranks.rank != 0):
            batch = list(requests[start : start + batch_size])
            began = time.perf_counter()
            targets = self.target_vectors(batch)
            phases = {"z": time.perf_counter() - began}
            record = self.update(batch, targets, len(self.state.history), phases)
            self.state.history[-1]["seconds"] = time.perf_counter() - began
            records.append({k: v for k, v in record.items() if k != "requests"})
        return records

    # Scores -----------------------------------------------------------------------------------

    def evaluate(self, requests: list[EditRequest], desc: Optional[str] = None) -> dict[str, float]:
        """ES / PS / NS / Overall (and the generation scores, if `evaluation.generation_scores`) of
        the model as it is now, in percent (summed over processes)."""
        scores = CounterFactScores().to(self.device)
        scores.update(score_requests(self.lm, self.tokenizer, self.ranks.share(requests), self.config.evaluation.batch_size,
                                     desc, generation=bool(self.config.evaluation.generation_scores)))
        return scores.compute()

    # Saving and loading -----------------------------------------------------------------------

    def patch_metadata(self, extra: Optional[dict] = None) -> dict:
        increments, base = self.state.layers.increments(), self.state.layers.base_weights()
        return {
            "base_model": self.model_name,
            "base_sha256": self.base_sha256,
            "patched_sha256": weights_sha256({name: base[name] + increments[name] for name in increments}),
            "method": self.config.solver.method, "layers": self.layers,
            "request_ids": [r.case_id for r in self.state.edited],
            "skipped_ids": [r["case_id"] for r in self.state.skipped],
            **(extra or {}),
        }

    def write_patch(self, path: Union[str, Path], extra: Optional[dict] = None) -> None:
        """The cumulative change of every edited matrix (see patches.py), with what made it."""
        metadata = {"config": json.loads(json.dumps(self.config.to_dict())), **(extra or {})}
        save_patch(Path(path), self.state.layers.increments(), self.patch_metadata(metadata))

    def save(self, directory: Union[str, Path]) -> Path:
        """`edits.safetensors` (the patch), `state.safetensors` (increments and key sums, float64
        sums kept exact) and `state.json` (config, base hash, records): the whole lifelong state.
        Files are replaced atomically. Process 0 writes (it holds the key sums)."""
        directory = Path(directory)
        if self.ranks.rank != 0:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        self.write_patch(directory / "edits.safetensors")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state.tensors().items()}
        if set(tensors) != self.state.tensor_names():
            raise RuntimeError("the running key sums are not here (save from process 0, after an edit or prepare())")
        with replaced(directory / "state.safetensors") as tmp:
            save_file(tensors, str(tmp))
        info = {"format": STATE_FORMAT, "model": self.model_name, "base_sha256": self.base_sha256,
                "config": self.config.to_dict(), **self.state.records()}
        with replaced(directory / "state.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Union[str, Path], model, tokenizer, ranks: Optional[Ranks] = None) -> "Editor":
        """An editor that continues the lifelong stream saved in `directory` (by `Editor.save`, or a
        run's log directory) on `model`: the same base model, unedited (its edited matrices must
        hash to the saved base). The saved edits are applied to `model`."""
        saved = read_saved_state(directory)
        editor = cls(model, tokenizer, EditorConfig.from_dict(saved["config"], str(directory)), ranks, saved.get("model"))
        editor.take_over(saved)
        return editor

    def take_over(self, saved: dict) -> None:
        """Continue the lifelong stream of `saved` (from `read_saved_state`): its increments (added
        to the model), key sums, prefixes and records. Refused for another base model or window."""
        where = saved["source"]
        mine, theirs = self.config.to_dict(), saved["config"]
        differ = [k for k in ("layers", "z_layer", "solver", "key_stats") if mine.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"refusing to continue {where}: its {', '.join(differ)} differ from this editor's "
                             "(a lifelong stream keeps its window, solver and C0)")
        if self.base_sha256 != saved["base_sha256"]:
            raise ValueError(f"refusing to continue {where}: the model's edited matrices are not the base it was "
                             f"made on ({saved.get('model')}; sha256 {self.base_sha256[:12]}... != {saved['base_sha256'][:12]}...)")
        tensors = saved["tensors"]
        if set(tensors) != self.state.tensor_names():
            raise ValueError(f"{where}: holds {sorted(tensors)}, expected {sorted(self.state.tensor_names())}")
        self.loaded_key_sums = self.state.load_tensors(tensors)
        self.state.load_records(saved)
        self.prepared = False  # the key sums are placed by prepare()


def read_saved_state(directory: Union[str, Path]) -> dict:
    """The lifelong state in `directory`: written by `Editor.save` (state.json + state.safetensors),
    or a run's log directory (its checkpoints/last.ckpt). A dict of the records, "tensors",
    "config" (the editor's sections), "base_sha256", "model" and "source" (the file read)."""
    directory = Path(directory)
    state_file, tensor_file = directory / "state.json", directory / "state.safetensors"
    checkpoint = directory / "checkpoints" / "last.ckpt"
    if state_file.is_file() and tensor_file.is_file():
        info = json.loads(state_file.read_text())
        if info.get("format") != STATE_FORMAT:
            raise ValueError(f"{state_file}: state format {info.get('format')}, this version reads {STATE_FORMAT}")
        return {**info, "tensors": load_file(str(tensor_file)), "source": str(state_file)}
    if checkpoint.is_file():
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
        hparams = ckpt.get("hyper_parameters", {})
        return {**ckpt["encore_pl"], "tensors": ckpt["state_dict"], "model": hparams.get("model_name_or_path"),
                "config": {k: v for k, v in hparams.items() if k in {f.name for f in fields(EditorConfig)}},
                "source": str(checkpoint)}
    raise FileNotFoundError(f"{directory}: no saved lifelong state (neither state.json + state.safetensors written by "
                            "Editor.save, nor checkpoints/last.ckpt of a run)")
