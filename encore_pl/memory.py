"""How much memory an editing run needs, per process and phase by phase, and which settings make it
fit a GPU: from the run's config and the model's dimensions alone (no weight is loaded, nothing runs).

What this module owns:
- `ModelDims`, `model_dims`: the dimensions that decide memory, from the model's Hugging Face config
  when one can be read offline (a local directory, the local hub cache, the embedded default once
  built), otherwise from `BUILTIN_MODELS`, the published configs of the models the project's configs
  name;
- `RunSettings`, `read_settings`: a run's YAML config(s) and `--key value` overrides, read with the
  defaults the run itself uses (the dataclasses `SolverConfig`, `TargetOptimization`,
  `KeyStatistics`, `EvaluationConfig`, and the signatures of `KnowledgeEditor`/`EditDataModule`);
- `estimate`: per process (process 0, which alone solves and holds the float64 state, and each of
  the others), on the model's device and on the host, the peak as the largest over the run's phases
  of what is resident then plus what that phase allocates;
- `plan_fit`: the cheap settings (results unchanged) that bring the estimate under a GPU's memory.

What the figures are: resident items (weights, copies of the edited matrices, float64 key sums,
inverses, projectors, C0) are exact tensor sizes. Phase transients (C0 pass, z optimisation, solves,
evaluation) are sizes of the tensors the code allocates, from reading it, with two kinds of
measured constants below: the token counts of the CounterFact prompts, and the bytes autograd saves
per token and block (measured with saved-tensor hooks). They are estimates, good to about +-25 %.
Units: GiB = 2**30 bytes throughout (what `scripts/benchmark.py`, nvidia-smi and
`torch.cuda.max_memory_allocated` report; a "24 GB" card holds 24 GiB).

Accuracy check (CPU, where the "device" is the host and the figure is the whole process's RSS,
fixed overhead and model load included; phases that would be on separate devices add up):
    .venv/bin/python scripts/benchmark.py --config configs/smollm2-135m/encore.yaml \
        --data.num_edits 100 --data.batch_size 25 --no-reference
(C0 of this config was already cached, so the run made no C0 pass) measured a peak of 2.92 GiB
(ru_maxrss 3,059,484 KiB, in the z optimisation of the second batch); `scripts/plan.py --config
configs/smollm2-135m/encore.yaml --data.num_edits 100 --data.batch_size 25` estimates 2.55 GiB
(-13 %). Sampled during the run: 1.25 GiB while scoring before editing (estimate 1.30), 2.58 GiB in the
first batch's z optimisation (687 suffix tokens; estimate 2.55 at the mean 712). The second batch
has 897 suffix tokens (36 a request instead of 28.5) and the allocator keeps what it freed: batches
differ by about +-25 % from the mean, which the fit check's margin covers.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

GiB = 2**30
MEASURED_SMOLLM2_PEAK_GIB = 2.92  # the accuracy check in the docstring (benchmark.py's ru_maxrss / 2**20 KiB)

# Measured workload of the z optimisation and evaluation: the first 300 records of
# ../shared/data/counterfact-easyedit-splits/counterfact-edit.json tokenised by the SmolLM2 tokenizer
# through the engine's own `build_rows` (5 context prefixes of 10-11 tokens, as
# `generate_context_prefixes` makes them) and `score_requests`' pairs. Other BPE vocabularies (Llama,
# GPT-2) split English text into similar counts.
ROWS_PER_REQUEST = 7  # bare prompt, 5 context prefixes, "{subject} is a"
SUFFIX_TOKENS_PER_REQUEST = 28.5  # over its 7 rows (4.07 a row); batches of 100: 2,670 to 3,132
PREFIX_WIDTH = 24  # prefix key/value cache width, padded (shared context + longest own prefix): 20-24
SUFFIX_WIDTH = 8  # longest suffix in a batch (padded outputs): 7-8
READS_PER_REQUEST = 7.9  # positions whose logits are read: target tokens of 6 rows + the essence
EVAL_WIDTH = 35  # longest scored sequence (mean 9.6); batches are sorted by length
EVAL_READS_PER_PROMPT = 1.2  # target tokens per scored sequence (1.17)
KEYS_PROMPTS_PER_REQUEST = 6  # keys: bare prompt + 5 context prefixes, in chunks of 64
KEYS_CHUNK = 64
GENERATION_BATCH = 16  # generate_texts
HOST_BYTES_PER_CORPUS_TOKEN = 44  # C0 corpus as Python lists of ints: 8 B pointer + 28 B int + list copies
FILE_BYTES_PER_TOKEN = 4.0  # English text, for a corpus given as files with no token limit

# Measured: RSS of `python -c "import torch, transformers, lightning"` = 0.355 GiB; of a process that
# also imported encore_pl.cli, encore_pl.module, datasets and tensorboard (what scripts/train.py and
# scripts/benchmark.py import) = 0.443 GiB (torch 2.13 CPU build, transformers 5.23, lightning 2.6.6).
# A CUDA process adds the CUDA libraries' own host memory on top, not included.
PROCESS_OVERHEAD = int(0.443 * GiB)

DTYPE_BYTES = {"float64": 8, "double": 8, "float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def dtype_bytes(dtype: str) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


# Model dimensions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """What decides memory. `gated`: Llama-style MLP (gate, up, down; RMSNorm); else GELU MLP with
    LayerNorm (GPT-2, GPT-J, GPT-NeoX). `params`: all parameters, tied embeddings once.
    `storage_dtype`: dtype of the weight files (what loading maps before converting)."""

    name: str
    hidden: int
    d_ff: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool
    gated: bool
    params: int
    storage_dtype: str
    source: str  # where the numbers come from

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim


def parameter_count(family: str, hidden: int, d_ff: int, layers: int, heads: int, kv_heads: int,
                    head_dim: int, vocab: int, context: int, tied: bool) -> int:
    """Parameters of a Llama-style ("llama"), GPT-2 or GPT-J model from its config."""
    d, a, kv = hidden, heads * head_dim, kv_heads * head_dim
    if family == "llama":  # q, k, v, o without bias; gate, up, down; two RMSNorms
        block = d * a + 2 * d * kv + a * d + 3 * d * d_ff + 2 * d
        return vocab * d * (1 if tied else 2) + layers * block + d
    if family == "gpt2":  # fused qkv with bias, proj, fc, proj (biases), two LayerNorms; position table; tied
        block = d * 3 * d + 3 * d + d * d + d + d * d_ff + d_ff + d_ff * d + d + 4 * d
        return vocab * d + context * d + layers * block + 2 * d + (0 if tied else vocab * d)
    if family == "gptj":  # q, k, v, out without bias; fc_in, fc_out with bias; one LayerNorm; head with bias
        block = 4 * d * d + d * d_ff + d_ff + d_ff * d + d + 2 * d
        return vocab * d + layers * block + 2 * d + (0 if tied else vocab * d + vocab)
    raise ValueError(f"unknown family {family!r}")


def _builtin(name, family, hidden, d_ff, layers, heads, kv_heads, head_dim, vocab, context, tied, storage, source):
    params = parameter_count(family, hidden, d_ff, layers, heads, kv_heads, head_dim, vocab, context, tied)
    return ModelDims(name, hidden, d_ff, layers, heads, kv_heads, head_dim, vocab, context, tied, family == "llama",
                     params, storage, source)


# The published config.json of each model on the Hugging Face Hub (hidden_size / n_embd,
# intermediate_size / n_inner (null = 4 x n_embd), num_hidden_layers / n_layer, num_attention_heads /
# n_head, num_key_value_heads, vocab_size, max_position_embeddings / n_positions,
# tie_word_embeddings, torch_dtype); parameter counts follow from them (`parameter_count`:
# 8,030,261,248 / 6,738,415,616 / 1,557,611,200 / 134,515,008 as published or counted on the model).
_LLAMA3_8B = _builtin("meta-llama/Meta-Llama-3-8B", "llama", 4096, 14336, 32, 32, 8, 128, 128256, 8192, False,
                      "bfloat16", "built-in table: config.json of meta-llama/Meta-Llama-3-8B")
_LLAMA2_7B = _builtin("meta-llama/Llama-2-7b-hf", "llama", 4096, 11008, 32, 32, 32, 128, 32000, 4096, False,
                      "float16", "built-in table: config.json of meta-llama/Llama-2-7b-hf")
_GPT2_XL = _builtin("openai-community/gpt2-xl", "gpt2", 1600, 6400, 48, 25, 25, 64, 50257, 1024, True,
                    "float32", "built-in table: config.json of openai-community/gpt2-xl")
_GPTJ_6B = _builtin("EleutherAI/gpt-j-6b", "gptj", 4096, 16384, 28, 16, 16, 256, 50400, 2048, False,
                    "float32", "built-in table: config.json of EleutherAI/gpt-j-6b")
_SMOLLM2 = _builtin("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 576, 1536, 30, 9, 3, 64, 49152, 8192, True,
                    "float32", "built-in table: config.json of HuggingFaceTB/SmolLM2-135M-Instruct "
                    "(the embedded default is cached as float32 safetensors)")
BUILTIN_MODELS: dict[str, ModelDims] = {
    "meta-llama/meta-llama-3-8b": _LLAMA3_8B,
    "meta-llama/llama-3-8b": _LLAMA3_8B,
    "meta-llama/meta-llama-3-8b-instruct": _LLAMA3_8B,
    "meta-llama/llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/llama-2-7b": _LLAMA2_7B,
    "openai-community/gpt2-xl": _GPT2_XL,
    "gpt2-xl": _GPT2_XL,
    "eleutherai/gpt-j-6b": _GPTJ_6B,
    "smollm2-135m": _SMOLLM2,
    "huggingfacetb/smollm2-135m": _SMOLLM2,
    "huggingfacetb/smollm2-135m-instruct": _SMOLLM2,
}


def dims_from_config(cfg, name: str, source: str) -> ModelDims:
    """ModelDims from a transformers config (no weights: parameters counted on the meta device)."""
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    get = lambda *keys, default=None: next((getattr(text, k) for k in keys if getattr(text, k, None) is not None), default)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    d_ff = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    layers = get("num_hidden_layers", "n_layer")
    kv_heads = get("num_key_value_heads", default=heads)
    head_dim = get("head_dim", default=hidden // heads)
    vocab = get("vocab_size")
    context = get("max_position_embeddings", "n_positions", "n_ctx", default=2048)
    tied = bool(getattr(cfg, "tie_word_embeddings", getattr(text, "tie_word_embeddings", True)))
    model_type = getattr(text, "model_type", "")
    family = {"gpt2": "gpt2", "gptj": "gptj", "gpt_neox": "gptj"}.get(model_type, "llama")
    storage = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32").replace("torch.", "")
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    except Exception:  # an architecture this transformers cannot build: count from the config
        params = parameter_count(family, hidden, d_ff, layers, heads, kv_heads, head_dim, vocab, context, tied)
    return ModelDims(name, hidden, d_ff, layers, heads, kv_heads, head_dim, vocab, context, tied, family == "llama",
                     params, storage if storage in DTYPE_BYTES else "float32", source)


def model_dims(name_or_path: str, trust_remote_code: bool = False) -> ModelDims:
    """The model's dimensions, offline: its config from a local directory, the embedded default's
    directory (if built), or the local hub cache; otherwise `BUILTIN_MODELS`."""
    from transformers import AutoConfig

    from .models import DEFAULT_MODEL, cache_dir, resolve_model_path

    path = None
    if name_or_path == DEFAULT_MODEL:
        if (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists():  # built: no download
            path = resolve_model_path(name_or_path)
    elif Path(name_or_path).expanduser().is_dir():
        path = str(Path(name_or_path).expanduser())
    if path is not None:
        return dims_from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), name_or_path,
                                f"config.json in {path}")
    if not Path(name_or_path).expanduser().exists():
        try:  # the local hub cache only: never the network
            cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=trust_remote_code)
            return dims_from_config(cfg, name_or_path, "config.json in the local Hugging Face cache")
        except Exception:
            pass
    known = BUILTIN_MODELS.get(name_or_path.lower())
    if known is not None:
        return known
    raise ValueError(f"cannot tell the dimensions of model {name_or_path!r} offline: it is no local directory, "
                     f"not in the local Hugging Face cache, and not among the built-in ones "
                     f"({', '.join(sorted({d.name for d in BUILTIN_MODELS.values()}))}); "
                     "pass --model.model_name_or_path DIR with its config.json")


# Run settings ------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """What an editing run holds in memory depends on: the model, its dtype and window, the solver,
    the target optimisation, C0's pass, evaluation, the edit batch and the processes."""

    model: str
    dims: ModelDims
    dtype: str
    layers: list[int]
    z_layer: int
    solver: Any  # SolverConfig
    target: Any  # TargetOptimization
    key_stats: Any  # KeyStatistics
    evaluation: Any  # EvaluationConfig
    batch_size: int
    num_edits: Optional[int]
    processes: int = 1
    accelerator: str = "gpu"  # "gpu" (CUDA) or "cpu" (the device is the host)
    c0_cached: bool = False  # C0 is in the cache: no C0 pass
    corpus_tokens: Optional[int] = None  # tokens of the C0 corpus (held as lists on the host during the pass)
    notes: list[str] = field(default_factory=list)

    @property
    def edit_batch(self) -> int:
        return min(self.batch_size, self.num_edits) if self.num_edits else self.batch_size

    @property
    def per_process(self) -> int:
        """Requests of an edit batch that the busiest process optimises (process 0's share)."""
        return math.ceil(self.edit_batch / self.processes)

    @property
    def chunk(self) -> int:
        size = getattr(self.target, "chunk_size", None)
        return min(size, self.per_process) if size else self.per_process

    @property
    def state_on_host(self) -> bool:
        return self.accelerator == "cpu" or getattr(self.solver, "state_device", None) == "cpu"

    @property
    def woodbury(self) -> bool:
        """Solves through a cached inverse (else the plain factorisation every batch, no inverse kept)."""
        s = self.solver
        return s.solve == "woodbury" and s.refactor_every > 0 and self.edit_batch <= 0.25 * self.dims.d_ff

    @property
    def projectors(self) -> bool:
        """Process 0 builds AlphaEdit's null-space projectors."""
        from .solvers import SOLVERS

        return SOLVERS[self.solver.method].needs_projector

    def changed(self, dotted: str, value) -> "RunSettings":
        """A copy with one setting changed, named as on the command line (e.g. model.target.chunk_size)."""
        parts = dotted.split(".")
        if parts[0] == "model" and len(parts) == 3 and parts[1] in ("solver", "target", "key_stats", "evaluation"):
            sub = getattr(self, parts[1])
            return dataclasses.replace(self, **{parts[1]: dataclasses.replace(sub, **{parts[2]: value})}, notes=[])
        if dotted == "model.dtype":
            return dataclasses.replace(self, dtype=value, notes=[])
        if dotted == "trainer.devices":
            return dataclasses.replace(self, processes=int(value), notes=[])
        raise ValueError(f"no lever {dotted}")


def merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v
    return into


def read_config(paths: list[str], overrides: dict[str, Any]) -> dict:
    """The YAML configs merged in order, then `{"a.b.c": value}` overrides."""
    import yaml

    raw: dict = {}
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        merge(raw, yaml.safe_load(text) or {})
    for dotted, value in overrides.items():
        node = raw
        *path, last = dotted.split(".")
        for k in path:
            node = node.setdefault(k, {}) if isinstance(node.get(k), dict) or k not in node else node[k]
            if not isinstance(node, dict):
                raise ValueError(f"--{dotted}: {k} is not a section")
        node[last] = value
    return raw


def _dataclass_from(cls, values: Optional[dict], where: str):
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def count_processes(devices, num_nodes) -> tuple[int, Optional[str]]:
    """Processes for trainer.devices / num_nodes as given in a config (no machine to ask): an int,
    a digit string, a list or "0,1"; "auto" and -1 depend on the machine: counted as 1, with a note."""
    nodes = int(num_nodes or 1)
    if isinstance(devices, bool):
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes, None
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes, None
    if isinstance(devices, str):
        s = devices.strip()
        if s.isdigit() and int(s) > 0:
            return int(s) * nodes, None
        if "," in s:
            return len([x for x in s.split(",") if x.strip()]) * nodes, None
    return nodes, f"trainer.devices {devices!r} depends on the machine: counted as 1 per node (use --devices N)"


def estimate_corpus_tokens(ks) -> Optional[int]:
    """Tokens of the C0 corpus, as far as the config tells (None: unknown, e.g. a hub dataset with no limit)."""
    caps = [c for c in (ks.num_tokens, ks.num_texts * ks.seq_len if ks.num_texts else None) if c]
    if ks.files:
        size = sum(Path(f).stat().st_size for f in ks.files if Path(f).exists())
        if size:
            caps.append(int(size / FILE_BYTES_PER_TOKEN))
    elif not ks.hf_dataset:
        caps.append(32768)  # sampled from the model: num_tokens or 32,768
    return min(caps) if caps else None


def read_settings(paths: list[str], overrides: Optional[dict[str, Any]] = None, devices: Optional[int] = None,
                  accelerator: Optional[str] = None, c0_cached: bool = False,
                  dims: Optional[ModelDims] = None) -> RunSettings:
    """A run's settings from its config files and overrides, with the run's own defaults."""
    from .datamodule import EditDataModule
    from .module import EvaluationConfig, KnowledgeEditor
    from .solvers import SolverConfig
    from .stats import KeyStatistics
    from .target_vectors import TargetOptimization

    raw = read_config(paths, overrides or {})
    model = dict(raw.get("model") or {})
    defaults = {k: p.default for k, p in inspect.signature(KnowledgeEditor.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    data_defaults = {k: p.default for k, p in inspect.signature(EditDataModule.__init__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    data = {**data_defaults, **(raw.get("data") or {})}
    trainer = raw.get("trainer") or {}
    name = model.get("model_name_or_path", defaults["model_name_or_path"])
    layers = sorted(model.get("layers", defaults["layers"]))
    z_layer = model.get("z_layer", defaults["z_layer"])
    notes = []
    if devices is not None:
        processes = devices * int(trainer.get("num_nodes") or 1)
    else:
        processes, note = count_processes(trainer.get("devices", "auto"), trainer.get("num_nodes"))
        if note:
            notes.append(note)
    if accelerator is None:
        given = str(trainer.get("accelerator", "auto")).lower()
        if given in ("cpu",):
            accelerator = "cpu"
        elif given in ("gpu", "cuda"):
            accelerator = "gpu"
        else:
            import torch

            accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    ks = _dataclass_from(KeyStatistics, model.get("key_stats"), "model.key_stats")
    settings = RunSettings(
        model=name,
        dims=dims or model_dims(name, bool(model.get("trust_remote_code", False))),
        dtype=str(model.get("dtype", defaults["dtype"])),
        layers=layers,
        z_layer=layers[-1] if z_layer is None else int(z_layer),
        solver=_dataclass_from(SolverConfig, model.get("solver"), "model.solver"),
        target=_dataclass_from(TargetOptimization, model.get("target"), "model.target"),
        key_stats=ks,
        evaluation=_dataclass_from(EvaluationConfig, model.get("evaluation"), "model.evaluation"),
        batch_size=int(data["batch_size"]),
        num_edits=data.get("num_edits"),
        processes=max(1, processes),
        accelerator=accelerator,
        c0_cached=c0_cached,
        corpus_tokens=estimate_corpus_tokens(ks),
        notes=notes,
    )
    dtype_bytes(settings.dtype)
    bad = [l for l in settings.layers + [settings.z_layer] if not 0 <= l < settings.dims.layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: {settings.dims.name} has {settings.dims.layers} layers")
    return settings


# The estimate ------------------------------------------------------------------------------------

Item = tuple[str, float]  # (what, bytes)


@dataclass
class Phase:
    name: str
    resident: list[Item]  # held while the phase runs (weights, state, ...)
    transient: list[Item]  # what the phase allocates on top, at its high point

    def total(self, margin: float = 0.0) -> float:
        return sum(b for _, b in self.resident) + (1 + margin) * sum(b for _, b in self.transient)

    @property
    def transient_bytes(self) -> float:
        return sum(b for _, b in self.transient)


@dataclass
class ProcessEstimate:
    """One process's memory in one place (the model's device, or the host)."""

    who: str  # "process 0" or "each other process"
    where: str  # "device" or "host"
    phases: list[Phase]

    def peak_phase(self, margin: float = 0.0) -> Phase:
        return max(self.phases, key=lambda p: p.total(margin))

    def peak(self, margin: float = 0.0) -> float:
        return self.peak_phase(margin).total(margin)

    def phase(self, name_start: str) -> Optional[Phase]:
        return next((p for p in self.phases if p.name.startswith(name_start)), None)


@dataclass
class Estimate:
    settings: RunSettings
    device: list[ProcessEstimate]  # on the GPU (empty on CPU: everything is on the host)
    host: list[ProcessEstimate]


def saved_bytes_per_token(d: ModelDims, b: int) -> float:
    """Bytes autograd keeps per token and decoder block for the backward pass with frozen weights
    (no weight gradient, so no linear layer keeps its input): MLP intermediates, the query and the
    attention output, the norms' float32 statistics. Measured with saved-tensor hooks on a random
    2-layer Llama of SmolLM2's sizes: 31,310 B (float32) and 22,782 B (bfloat16) per token and block,
    against 32,256 and 23,040 here; a GPT-2 block (d 384, d_ff 1536): 36,284 B in float32, 35,328 here."""
    attn = 2 * d.attn_width * b
    if d.gated:  # gate and up outputs and silu(gate); RMSNorm's float32 input and normed output twice
        return 3 * d.d_ff * b + attn + 2 * d.hidden * (8 + (b if b != 4 else 0))
    return 4 * d.d_ff * b + attn + 2 * d.hidden * 10  # GELU (tanh form) intermediates; LayerNorm


def forward_bytes_per_token(d: ModelDims, b: int) -> float:
    """Bytes alive per token inside one block of a forward pass without gradients: the residual
    stream (hidden and residual), the normed input (with its float32 copy), and the larger of the
    attention stage (q, k, v with heads repeated, output) and the MLP stage (3 d_ff-wide tensors)."""
    return 2 * d.hidden * b + d.hidden * (4 + b) + max(4 * d.attn_width * b, 3 * d.d_ff * b)


def _state_items(s: RunSettings, solved: bool) -> list[Item]:
    """Process 0's float64 state of the solves (d_ff x d_ff per edited layer)."""
    d, nl = s.dims, len(s.layers)
    sq = d.d_ff**2 * 8
    items = [(f"key sums K_prev K_prev^T (float64, {nl} layers)", nl * sq)]
    if solved and s.woodbury:
        items.append((f"cached inverses M^-1 (float64, {nl} layers)", nl * sq))
    if s.projectors:
        items.append((f"AlphaEdit projectors (float64, {nl} layers)", nl * sq))
    return items


def _c0_pass(s: RunSettings) -> tuple[list[Item], list[Item]]:
    """(device, host) transients of one batch of the C0 pass."""
    d, nl, ks = s.dims, len(s.layers), s.key_stats
    cb = dtype_bytes(ks.compute_dtype) if ks.compute_dtype else dtype_bytes(s.dtype)
    t = ks.batch_size * ks.seq_len
    documents = not ks.packing and bool(ks.files or ks.hf_dataset)
    dev = [
        (f"keys of the {nl} window layers ({ks.batch_size} x {ks.seq_len} tokens)", nl * t * d.d_ff * cb),
        ("float32 copy of one layer's keys" + (" and its unpadded selection" if documents else ""),
         t * d.d_ff * (4 if cb != 4 else 0) + (t * d.d_ff * cb if documents else 0)),
        ("forward of one block (residual stream, attention or MLP intermediates)", t * forward_bytes_per_token(d, cb)),
        ("Gram blocks (float32, and float64 before the copy to the host)", (d.d_ff // 2) ** 2 * 12),
    ]
    if documents:
        dev.append(("attention mask of padded documents", ks.batch_size * ks.seq_len**2))
    tokens = s.corpus_tokens
    host = [(f"float64 sums of the {nl} layers", nl * d.d_ff**2 * 8)]
    if tokens:
        host.append((f"corpus token ids as Python lists (~{tokens:,} tokens)", tokens * HOST_BYTES_PER_CORPUS_TOKEN))
    return dev, host


def _sampling(s: RunSettings) -> list[Item]:
    """Transient of sampling C0's corpus from the model (no files, no dataset), `batch_size`
    sequences at a time, in a copy of the model in key_stats.compute_dtype if that differs."""
    d, ks = s.dims, s.key_stats
    dtype = ks.compute_dtype or s.dtype
    b = dtype_bytes(dtype)
    kv = ks.batch_size * ks.seq_len * d.layers * 2 * d.kv_heads * d.head_dim * b
    items = [("key/value cache of the sampled sequences", kv), ("logits of the last position", ks.batch_size * d.vocab * 4 * 4)]
    if dtype != s.dtype:
        items.append((f"copy of the model in {dtype} to sample with", d.params * b))
    return items


def steps_copy_bytes(s: RunSettings) -> float:
    """target.compute_dtype's copy of the blocks after z, the head and the embeddings (0 if none)."""
    dtype = s.target.compute_dtype
    if not s.target.batched or not dtype or dtype == s.dtype:
        return 0.0
    d = s.dims
    embedding = d.vocab * d.hidden * (1 if d.tied else 2)
    blocks = max(d.params - embedding, 0) * (d.layers - s.z_layer - 1) / d.layers
    return (blocks + embedding) * dtype_bytes(dtype)


def _z_items(s: RunSettings, c: int) -> tuple[list[Item], list[Item]]:
    """(prefix pass, steps) transients of the z optimisation of a chunk of c requests."""
    d, b = s.dims, dtype_bytes(s.dtype)
    rows, tokens, reads = ROWS_PER_REQUEST * c, SUFFIX_TOKENS_PER_REQUEST * c, READS_PER_REQUEST * c
    after = d.layers - s.z_layer - 1  # blocks run with gradients, on the suffix tokens only
    kv_token_layer = 2 * d.kv_heads * d.head_dim * b
    if not s.target.batched:  # the published loop: one request, all prompts padded, whole model, full vocabulary
        width = PREFIX_WIDTH + SUFFIX_WIDTH
        toks = ROWS_PER_REQUEST * width
        steps = [
            ("activations saved for backward (one request, whole prompts)", toks * after * saved_bytes_per_token(d, b)),
            ("key/value saved for backward", ROWS_PER_REQUEST * after * 2 * d.attn_width * width * b),
            ("logits at every position", toks * d.vocab * (b + 12)),
            ("forward of the blocks before z", toks * forward_bytes_per_token(d, b)),
        ]
        return [], steps
    kept = (after + 1) * rows * PREFIX_WIDTH * kv_token_layer
    prefix_pass = [
        (f"prefix key/value cache of all {d.layers} layers ({rows} rows x {PREFIX_WIDTH}), and its copy while built",
         2 * d.layers * rows * PREFIX_WIDTH * kv_token_layer),
        ("forward of the prefixes, one block", rows * PREFIX_WIDTH * forward_bytes_per_token(d, b)),
    ]
    context = PREFIX_WIDTH + tokens / rows
    bs = dtype_bytes(s.target.compute_dtype or s.dtype)  # the steps run in target.compute_dtype
    kept = kept * bs / b
    steps = [
        (f"prefix key/value cache of the {after} blocks after z, and the copy of the active rows", 2 * kept),
        (f"activations saved for backward ({tokens:.0f} suffix tokens x {after} blocks)",
         tokens * after * saved_bytes_per_token(d, bs)),
        ("key/value saved for backward by attention (heads repeated)", rows * after * 2 * d.attn_width * context * bs),
        ("output of block z and final hidden states", 2 * rows * SUFFIX_WIDTH * d.hidden * bs),
        (f"logits at {reads:.0f} read positions (and their gradients)",
         reads * d.vocab * (bs + 12 + (bs if bs != 4 else 0))),
        ("essence distributions: KL reference and terms", c * d.vocab * (4 + 32)),
    ]
    return prefix_pass, steps


def _solve_items(s: RunSettings, rank0: bool) -> tuple[list[Item], list[Item]]:
    """(device, host) transients of the keys and solves after the z optimisation."""
    d, b, nl = s.dims, dtype_bytes(s.dtype), len(s.layers)
    mat = d.hidden * d.d_ff
    m = s.per_process
    dev = [
        (f"increments D of the {nl} layers (float64, until the batch is done)", nl * mat * 8),
        (f"cumulative increments before the batch (float32 copies, for undo)", nl * mat * 4),
        ("weight update: base + increment in float32", 2 * mat * 4),
        ("keys forward (64 prompts) and saved block inputs",
         min(KEYS_CHUNK, KEYS_PROMPTS_PER_REQUEST * m) * EVAL_WIDTH * forward_bytes_per_token(d, b)
         + KEYS_PROMPTS_PER_REQUEST * m * EVAL_WIDTH * d.hidden * b),
    ]
    host = []
    if rank0:
        sq = d.d_ff**2 * 8
        work = (f"solver temporaries of one layer: {'rebuild of M^-1 (M, Cholesky factor, inverse)' if s.woodbury else 'plain factorisation'}",
                (3 if s.woodbury else 4) * sq)
        if s.state_on_host and s.accelerator != "cpu":
            host += [work, ("one increment D on the host (float64)", mat * 8)]
        else:
            dev.append(work)
    return dev, host


def _eval_items(s: RunSettings) -> list[Item]:
    d, b, ev = s.dims, dtype_bytes(s.dtype), s.evaluation
    tokens = ev.batch_size * EVAL_WIDTH
    items = [
        (f"forward of {ev.batch_size} prompts x {EVAL_WIDTH} tokens, one block", tokens * forward_bytes_per_token(d, b)),
        ("final hidden states", tokens * d.hidden * b),
        ("logits at the target positions", ev.batch_size * EVAL_READS_PER_PROMPT * d.vocab * (b + 8)),
    ]
    if ev.generation_prompts:
        width = ev.generation_length
        items.append(("generation: key/value cache and logits",
                      GENERATION_BATCH * width * d.layers * 2 * d.kv_heads * d.head_dim * b + GENERATION_BATCH * d.vocab * 12))
    return items


def estimate(s: RunSettings) -> Estimate:
    """Per process, on the device and on the host: every phase's resident and transient items."""
    d, b, nl = s.dims, dtype_bytes(s.dtype), len(s.layers)
    mat = d.hidden * d.d_ff
    on_cpu = s.accelerator == "cpu"
    weights = [(f"weights ({s.dtype}, {d.params / 1e9:.3g} B parameters)", d.params * b),
               (f"edited matrices: base copies + float32 increments", nl * mat * (b + 4))]
    if steps_copy_bytes(s):
        weights.append((f"z steps' copy in {s.target.compute_dtype}: blocks after z, head, embeddings", steps_copy_bytes(s)))
    c0_bytes = nl * d.d_ff**2 * dtype_bytes(s.key_stats.dtype)
    c0 = [(f"C0 ({s.key_stats.dtype}, {nl} layers)", c0_bytes)]
    overhead = [("Python, torch, transformers, lightning (measured)", PROCESS_OVERHEAD)]
    storage_b = dtype_bytes(d.storage_dtype)
    load = [(f"weight files ({d.storage_dtype}, mapped while loading)", d.params * storage_b)]
    if storage_b != b or d.storage_dtype != s.dtype:
        load.append((f"weights converted to {s.dtype}", d.params * b))
    load.append(("edited matrices: base copies, increments, float32 copies hashed", nl * mat * (b + 4 + 4)))
    fingerprint_dev = [("embedding in float32 (C0 cache fingerprint)", d.vocab * d.hidden * 4)] if (not on_cpu or b != 4) else []
    fingerprint_host = [("embedding copied to the host and its bytes hashed (fingerprint)",
                         d.vocab * d.hidden * 4 * (1 if on_cpu else 2))]
    c0_dev, c0_host = _c0_pass(s)
    prefix_pass, steps = _z_items(s, s.chunk)
    eval_items = _eval_items(s)
    eigh = [("AlphaEdit: eigendecomposition of one layer's C0 (float64)", 3 * d.d_ff**2 * 8)]

    devices, hosts = [], []
    who_list = ["process 0"] + (["each other process"] if s.processes > 1 else [])
    for who in who_list:
        rank0 = who == "process 0"
        state_before = _state_items(s, solved=False) if rank0 else []  # placed after C0
        state_after = _state_items(s, solved=True) if rank0 else []
        solve_dev, solve_host = _solve_items(s, rank0)
        z_name = f"z optimisation, {s.chunk} requests"
        c0_name = f"C0 pass, {s.key_stats.batch_size} x {s.key_stats.seq_len} tokens (first run only)"
        if on_cpu:  # one address space: everything adds up in the process's RSS
            base = overhead + weights
            res = base + c0 + state_after
            phases = [Phase("loading the model", overhead, load),
                      Phase("fit start: C0 fingerprint", base, fingerprint_dev + fingerprint_host)]
            if not s.c0_cached:
                if not (s.key_stats.files or s.key_stats.hf_dataset):
                    phases.append(Phase("C0 corpus sampled from the model (first run only)", base, _sampling(s)))
                phases.append(Phase(c0_name, base, c0_dev + c0_host))
            if s.projectors and rank0:
                phases.append(Phase("AlphaEdit projectors (fit start)", base + c0 + state_before, eigh))
            phases += [Phase(f"{z_name}: prefix pass", res, prefix_pass) if prefix_pass else None,
                       Phase(f"{z_name}: steps", res, steps),
                       Phase("keys and solves", res, solve_dev + solve_host),
                       Phase("evaluation", res, eval_items)]
            hosts.append(ProcessEstimate(who, "host", [p for p in phases if p is not None]))
            continue
        dev_state_before = [] if s.state_on_host else state_before
        dev_state_after = [] if s.state_on_host else state_after
        res = weights + dev_state_after
        phases = [Phase("fit start: C0 fingerprint", weights, fingerprint_dev)]
        if not s.c0_cached:
            if not (s.key_stats.files or s.key_stats.hf_dataset):
                phases.append(Phase("C0 corpus sampled from the model (first run only)", weights, _sampling(s)))
            phases.append(Phase(c0_name, weights, c0_dev))
        if s.projectors and rank0 and not s.state_on_host:
            phases.append(Phase("AlphaEdit projectors (fit start)", weights + dev_state_before, eigh))
        if prefix_pass:
            phases.append(Phase(f"{z_name}: prefix pass", res, prefix_pass))
        phases += [Phase(f"{z_name}: steps", res, steps),
                   Phase("keys and solves", res, solve_dev),
                   Phase("evaluation", res, eval_items)]
        devices.append(ProcessEstimate(who, "device", phases))

        host_state = (state_after if s.state_on_host else [])
        host_phases = [Phase("loading the model", overhead, load),
                       Phase("fit start: C0 fingerprint", overhead, fingerprint_host)]
        if not s.c0_cached:
            host_phases.append(Phase(c0_name, overhead, c0_host + [("C0 as it is written", c0_bytes)]))
        if s.projectors and rank0 and s.state_on_host:
            host_phases.append(Phase("AlphaEdit projectors (fit start)", overhead + c0 + host_state[:1], eigh))
        ckpt = [] if s.state_on_host or not rank0 else [("checkpoint write: one key sum copied to the host", d.d_ff**2 * 8)]
        host_phases.append(Phase("editing (solves on the host)" if host_state and rank0 else "editing",
                                 overhead + c0 + host_state, solve_host + ckpt))
        hosts.append(ProcessEstimate(who, "host", host_phases))
    return Estimate(s, devices, hosts)


# Fitting -----------------------------------------------------------------------------------------

CHUNK_SIZES = (50, 25, 10, 5, 2, 1)


@dataclass
class FitPlan:
    """The outcome of `plan_fit`: the levers applied (command-line overrides), the resulting settings
    and estimate, whether it fits, and why not."""

    budget: float  # bytes available to tensors: GPU memory minus the reserve
    margin: float
    changes: list[tuple[str, Any, str]]  # (setting, value, what it did)
    settings: RunSettings
    estimate: Estimate
    fits: bool
    reason: str = ""


def device_peak(e: Estimate, margin: float = 0.0) -> float:
    return max(p.peak(margin) for p in e.device)


def fits(s: RunSettings, budget: float, margin: float) -> bool:
    return device_peak(estimate(s), margin) <= budget


def _phase_fits(s: RunSettings, start: str, budget: float, margin: float) -> bool:
    e = estimate(s)
    return all(p.total(margin) <= budget for pe in e.device for p in pe.phases if p.name.startswith(start))


def plan_fit(s: RunSettings, gpu_bytes: float, reserve_bytes: float = GiB, margin: float = 0.25) -> FitPlan:
    """Cheap settings (the results do not change) that bring every process's estimated device peak,
    with the transients raised by `margin`, under `gpu_bytes - reserve_bytes`, tried in order:
    1. solver.state_device cpu (process 0's float64 state to host memory; solves run there);
    2. target.chunk_size, the largest of CHUNK_SIZES whose z optimisation fits;
    3. key_stats.batch_size, halved down to 1 until the C0 pass fits (first run only);
    4. evaluation.batch_size, halved until scoring fits.
    More processes are no lever: each holds the whole model, and the only thing that shrinks with
    them, a process's share of the z optimisation, chunk_size shrinks on one GPU."""
    budget = gpu_bytes - reserve_bytes
    changes: list[tuple[str, Any, str]] = []
    d = s.dims
    floor = d.params * dtype_bytes(s.dtype) + len(s.layers) * d.hidden * d.d_ff * (dtype_bytes(s.dtype) + 4)
    if floor > budget:  # what every process holds whatever the settings: no lever helps
        e = estimate(s)
        return FitPlan(budget, margin, [], s, e, device_peak(e, margin) <= budget, why_not(e, budget, margin))

    def peak(x):
        return device_peak(estimate(x), margin)

    def apply(x, key, value, why):
        before = peak(x)
        y = x.changed(key, value)
        changes.append((key, value, f"{why}: peak {before / GiB:.1f} -> {peak(y) / GiB:.1f} GiB"))
        return y

    if not fits(s, budget, margin) and not s.state_on_host:
        s = apply(s, "model.solver.state_device", "cpu", "process 0's float64 key sums, inverses and projectors to host memory")
    z_name = "z optimisation"
    if not fits(s, budget, margin) and not _phase_fits(s, z_name, budget, margin):
        sizes = [c for c in CHUNK_SIZES if c < s.chunk]
        good = [c for c in sizes if _phase_fits(s.changed("model.target.chunk_size", c), z_name, budget, margin)]
        if sizes:
            size = good[0] if good else sizes[-1]
            s = apply(s, "model.target.chunk_size", size, f"z optimisation over {size} requests at a time")
    if not fits(s, budget, margin) and not s.c0_cached and not _phase_fits(s, "C0", budget, margin):
        size = s.key_stats.batch_size
        while size > 1 and not _phase_fits(s.changed("model.key_stats.batch_size", size), "C0", budget, margin):
            size = max(1, size // 2)
        if size != s.key_stats.batch_size:
            s = apply(s, "model.key_stats.batch_size", size, f"C0 pass {size} sequence(s) at a time")
    if not fits(s, budget, margin) and not _phase_fits(s, "evaluation", budget, margin):
        size = s.evaluation.batch_size
        while size > 1 and not _phase_fits(s.changed("model.evaluation.batch_size", size), "evaluation", budget, margin):
            size = max(1, size // 2)
        if size != s.evaluation.batch_size:
            s = apply(s, "model.evaluation.batch_size", size, f"scoring {size} prompts at a time")
    e = estimate(s)
    ok = device_peak(e, margin) <= budget
    reason = "" if ok else why_not(e, budget, margin)
    return FitPlan(budget, margin, changes, s, e, ok, reason)


def why_not(e: Estimate, budget: float, margin: float) -> str:
    """What still exceeds the budget after every lever."""
    worst = max(e.device, key=lambda pe: pe.peak(margin))
    phase = worst.peak_phase(margin)
    resident = sum(b for _, b in phase.resident)
    s = e.settings
    weights = s.dims.params * dtype_bytes(s.dtype)
    edited = len(s.layers) * s.dims.hidden * s.dims.d_ff * (dtype_bytes(s.dtype) + 4)
    if weights > budget:
        return (f"the weights alone ({s.dtype}) take {weights / GiB:.1f} GiB, more than the "
                f"{budget / GiB:.1f} GiB available (GPU memory minus the reserve) on every process")
    if weights + edited > budget:
        return (f"the weights ({weights / GiB:.1f} GiB) and the edited matrices' base copies and float32 increments "
                f"({edited / GiB:.1f} GiB) exceed the {budget / GiB:.1f} GiB available on every process")
    if resident > budget:
        return (f"what {worst.who} holds all the time ({resident / GiB:.1f} GiB: "
                + ", ".join(f"{n} {b / GiB:.1f}" for n, b in phase.resident) + f") exceeds {budget / GiB:.1f} GiB")
    return (f"{worst.who}'s {phase.name} needs {phase.total(margin) / GiB:.1f} GiB with the margin "
            f"(resident {resident / GiB:.1f} + transient {phase.transient_bytes / GiB:.1f} x {1 + margin:g}), "
            f"more than {budget / GiB:.1f} GiB, and no cheap lever lowers it further")


def lever_effects(s: RunSettings, margin: float = 0.0) -> list[tuple[str, str]]:
    """How each lever alone moves the device estimate of the config as given."""
    out = []
    base = estimate(s)
    if not base.device:  # on the CPU there is no device budget to move things off
        return out
    p0 = device_peak(base, margin)

    def peak_of(x):
        return device_peak(estimate(x), margin)

    if not s.state_on_host:
        x = s.changed("model.solver.state_device", "cpu")
        moved = sum(b for _, b in _state_items(s, solved=True))
        out.append(("--model.solver.state_device cpu",
                    f"process 0 holds {moved / GiB:.1f} GiB less on the device (and the solver temporaries), "
                    f"as much more host RAM; peak {p0 / GiB:.1f} -> {peak_of(x) / GiB:.1f} GiB"))
    for c in (25, 10, 1):
        if c < s.chunk:
            x = s.changed("model.target.chunk_size", c)
            zs0 = [p for p in base.device[0].phases if p.name.startswith("z")]
            zs1 = [p for p in estimate(x).device[0].phases if p.name.startswith("z")]
            out.append((f"--model.target.chunk_size {c}",
                        f"z optimisation transient {max(p.transient_bytes for p in zs0) / GiB:.2f} -> "
                        f"{max(p.transient_bytes for p in zs1) / GiB:.2f} GiB (about linear in the chunk); "
                        f"peak -> {peak_of(x) / GiB:.1f} GiB"))
            break
    if not s.c0_cached and s.key_stats.batch_size > 1:
        x = s.changed("model.key_stats.batch_size", 1)
        c0a = next(p for p in base.device[0].phases if p.name.startswith("C0 pass")) if base.device else None
        c0b = next(p for p in estimate(x).device[0].phases if p.name.startswith("C0 pass")) if base.device else None
        if c0a and c0b:
            out.append(("--model.key_stats.batch_size 1",
                        f"C0 pass transient {c0a.transient_bytes / GiB:.2f} -> {c0b.transient_bytes / GiB:.2f} GiB "
                        f"(first run only; none once C0 is cached)"))
    n = max(4, 2 * s.processes)
    x = s.changed("trainer.devices", n)
    e = estimate(x)
    others = e.device[1].peak(margin) if len(e.device) > 1 else 0
    out.append((f"--trainer.devices {n} --trainer.strategy ddp",
                f"not a memory lever: every process holds the whole model; only its share of the z optimisation "
                f"shrinks ({s.per_process} -> {x.per_process} requests), which chunk_size does on one GPU; process 0 "
                f"still holds the float64 state: process 0 {e.device[0].peak(margin) / GiB:.1f}, others "
                f"{others / GiB:.1f} GiB"))
    if s.dtype == "float32":
        x = s.changed("model.dtype", "bfloat16")
        out.append(("--model.dtype bfloat16",
                    f"halves the weights, peak -> {peak_of(x) / GiB:.1f} GiB; not cheap: it changes keys, z and C0 "
                    "(not the paper's setting for this model)"))
    return out
