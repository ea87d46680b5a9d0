"""C0: the uncentred second moment E[k k^T] of the down-matrix inputs over a text corpus.

All layers of the window come from one pass over the corpus, which stops after the last layer
needed. Text is tokenised, joined with EOS and packed into sequences of `seq_len` tokens, so no
token is padding. Results are cached on disk, one safetensors file per layer, keyed by the model's
weights, the layer, the corpus, the token count, `seq_len` and dtype.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .files import replaced
from .keys import capture, run_to_stop
from .distributed import Ranks
from .layouts import LocatedModel
from .models import cache_dir


@dataclass
class KeyStatistics:
    """Where C0 comes from.

    Args:
        files: local text files (e.g. WikiText-2's valid.txt and test.txt). Used if given.
        hf_dataset: a `datasets` corpus "path[:config[:split]]" for online users (e.g.
            "wikitext:wikitext-103-raw-v1:train"); used if no files are given.
        text_field: the text column of `hf_dataset`.
        num_tokens: use at most this many tokens (None = the whole corpus). With neither files
            nor hf_dataset, this many tokens are sampled from the model itself (offline default).
        num_texts: use at most this many documents, each cut to `seq_len` tokens (the published
            code's "mom2_n_samples"); None = no limit. Documents are blank-line separated in files.
        seq_len: tokens per packed sequence.
        batch_size: sequences per forward pass.
        seed: seed of the model-sampled corpus.
        dtype: dtype of the stored C0.
        compute_dtype: run the pass under autocast in this dtype, e.g. "bfloat16": 1.44x as fast
            on a 2-core AVX512-BF16 CPU (SmolLM2, 5 layers, 586k WikiText tokens: 229 s against
            331 s), at a relative (Frobenius) error of C0 of 4e-3 to 6e-3. None: the model's own
            dtype. Sums are always float64.
    """

    files: list[str] = field(default_factory=list)
    hf_dataset: Optional[str] = None
    text_field: str = "text"
    num_tokens: Optional[int] = 32768
    num_texts: Optional[int] = None
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"
    compute_dtype: Optional[str] = None

    def corpus_id(self) -> str:
        if self.files:
            digests = []
            for f in self.files:
                path = Path(f)
                if not path.exists():
                    raise FileNotFoundError(f"key-statistics corpus file {f!r} does not exist")
                digests.append(hashlib.sha256(path.read_bytes()).hexdigest()[:16])
            return "files-" + "-".join(digests)
        if self.hf_dataset:
            return "hf-" + self.hf_dataset.replace("/", "_").replace(":", "_")
        return f"model-samples-seed{self.seed}"


def model_fingerprint(model) -> str:
    """A short hash of the input embeddings: tells models apart without hashing every weight."""
    emb = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    h = hashlib.sha256(emb.numpy().tobytes())
    h.update(json.dumps([model.config.model_type, model.config.num_hidden_layers]).encode())
    return h.hexdigest()[:16]


def corpus_token_ids(tok, model, cfg: KeyStatistics) -> list[int]:
    """The corpus as one stream of token ids (documents joined by EOS)."""
    limit = cfg.num_tokens
    if cfg.files or cfg.hf_dataset:
        if cfg.files:
            texts = (line for f in cfg.files for line in Path(f).read_text(encoding="utf-8").split("\n\n"))
        else:
            import datasets

            path, *rest = cfg.hf_dataset.split(":")
            config = rest[0] if rest else None
            split = rest[1] if len(rest) > 1 else "train"
            texts = (r[cfg.text_field] for r in datasets.load_dataset(path, config, split=split, streaming=True))
        stream, n_texts = [], 0
        for text in texts:
            if not text.strip():
                continue
            ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
            if cfg.num_texts is not None:
                ids = ids[: cfg.seq_len]
            stream.extend(ids)
            n_texts += 1
            if (limit is not None and len(stream) >= limit) or (cfg.num_texts is not None and n_texts >= cfg.num_texts):
                break
        return stream[:limit] if limit is not None else stream
    return sample_from_model(model, tok, limit or 32768, cfg.seq_len, cfg.batch_size, cfg.seed)


@torch.no_grad()
def sample_from_model(model, tok, num_tokens: int, seq_len: int, batch_size: int, seed: int) -> list[int]:
    """Offline corpus: `num_tokens` tokens sampled from the model (top-p 0.95) with a fixed seed."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    stream: list[int] = []
    bar = tqdm(total=num_tokens, desc="sampling C0 corpus from the model", unit="tok")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while len(stream) < num_tokens:
            ids = torch.full((batch_size, 1), start, dtype=torch.long, device=model.device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95, top_k=0,
                temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=tok.pad_token_id,
            )
            for row in out.tolist():
                stream.extend(row)
            bar.update(out.numel())
    bar.close()
    return stream[:num_tokens]


def cache_path(fingerprint: str, layer: int, cfg: KeyStatistics, corpus_id: str) -> Path:
    parts = [fingerprint, layer, corpus_id, cfg.num_tokens, cfg.seq_len, cfg.dtype]
    if cfg.num_texts is not None:
        parts.append(cfg.num_texts)
    if cfg.compute_dtype is not None:
        parts.append(f"compute={cfg.compute_dtype}")
    key = json.dumps(parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "stats" / f"c0-{fingerprint}-layer{layer}-{digest}.safetensors"


def load_cached(path: Path, d_ff: int, fingerprint: str, layer: int, corpus_id: str) -> Optional[torch.Tensor]:
    """The cached C0, or None; a clear error if the file is corrupt or was made for something else."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            c0, meta = f.get_tensor("c0"), f.metadata() or {}
    except Exception as e:
        raise ValueError(f"key-statistics cache {path} is corrupt ({e}); delete it to recompute") from None
    made_for = {"model": meta.get("model", fingerprint), "layer": meta.get("layer"), "corpus": meta.get("corpus")}
    wanted = {"model": fingerprint, "layer": str(layer), "corpus": corpus_id}
    if made_for != wanted:
        which = ", ".join(f"{k} {made_for[k]!r} instead of {wanted[k]!r}" for k in wanted if made_for[k] != wanted[k])
        raise ValueError(f"key-statistics cache {path} belongs to another model, layer or corpus ({which}); delete it to recompute")
    if c0.shape != (d_ff, d_ff):
        raise ValueError(f"key-statistics cache {path} has shape {tuple(c0.shape)}, expected {(d_ff, d_ff)}")
    return c0


def add_gram(acc: torch.Tensor, k: torch.Tensor) -> None:
    """acc += k^T k (float64 [d, d]) from k [tokens, d], computing only 3 of its 4 blocks.

    k^T k is symmetric, so
    the lower-left block is the transpose of the upper-right one: 25 % fewer multiplications.
    """
    h = k.shape[1] // 2
    a, b = k[:, :h], k[:, h:]
    acc[:h, :h] += (a.T @ a).double().cpu()
    upper = (a.T @ b).double().cpu()
    acc[:h, h:] += upper
    acc[h:, :h] += upper.T
    acc[h:, h:] += (b.T @ b).double().cpu()


@torch.no_grad()
def compute_key_statistics(
    lm: LocatedModel, tok, layers: list[int], cfg: KeyStatistics, ranks: Optional[Ranks] = None
) -> dict[int, torch.Tensor]:
    """C0 for every layer of `layers`, from the cache or from one pass over the corpus.

    With several processes (`ranks`), each runs every world-th sequence, the sums are added up
    across processes, and process 0 alone writes the cache.
    """
    ranks = ranks or Ranks()
    fingerprint = model_fingerprint(lm.model)
    corpus_id = cfg.corpus_id()
    d_ff = lm.weight_out_in(layers[0]).shape[1]
    result, missing = {}, []
    for layer in layers:
        cached = load_cached(cache_path(fingerprint, layer, cfg, corpus_id), d_ff, fingerprint, layer, corpus_id)
        if cached is None:
            missing.append(layer)
        else:
            result[layer] = cached
    if ranks.world > 1:  # process 0's cache decides (it may be the only writer): every process gets its C0
        missing = ranks.broadcast_object(missing)
        for layer in layers:
            if layer in missing:
                result.pop(layer, None)
            else:
                mine = result[layer] if ranks.rank == 0 else torch.empty(d_ff, d_ff, dtype=getattr(torch, cfg.dtype))
                result[layer] = ranks.broadcast(mine)
    if not missing:
        return result

    stream = corpus_token_ids(tok, lm.model, cfg)
    chunks = [stream[i : i + cfg.seq_len] for i in range(0, len(stream), cfg.seq_len)]
    sums = {l: torch.zeros(d_ff, d_ff, dtype=torch.float64) for l in missing}
    count = 0
    t0 = time.time()
    device = lm.model.device
    compute_dtype = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else None
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None)
    mine = ranks.share(chunks)  # this process's sequences
    bar = tqdm(total=sum(len(c) for c in mine), desc=f"C0 for layers {missing}", unit="tok")
    with capture(lm, missing, []) as (keys, _):  # the forward stops at the last key needed
        for i in range(0, len(mine), cfg.batch_size):
            batch = mine[i : i + cfg.batch_size]
            width = max(len(c) for c in batch)
            groups = [batch] if all(len(c) == width for c in batch) else [[c] for c in batch]
            for group in groups:  # only the corpus's last, shorter sequence runs on its own
                ids = torch.tensor(group, dtype=torch.long, device=device)
                with autocast:
                    run_to_stop(lm, input_ids=ids)
                for l in missing:
                    add_gram(sums[l], keys[l].reshape(-1, d_ff).float())
                count += ids.numel()
                bar.update(ids.numel())
            bar.set_postfix(tok_per_s=f"{count / (time.time() - t0):.0f}")
    bar.close()
    count = int(ranks.sum(torch.tensor(float(count), dtype=torch.float64)).item())
    for l in missing:
        c0 = (ranks.sum(sums[l]) / count).to(getattr(torch, cfg.dtype))
        result[l] = c0
        if ranks.rank != 0:
            continue
        meta = {"model": fingerprint, "layer": str(l), "tokens": str(count), "corpus": corpus_id, "config": json.dumps(asdict(cfg))}
        with replaced(cache_path(fingerprint, l, cfg, corpus_id)) as tmp:  # a cache file is complete or absent
            save_file({"c0": c0.contiguous()}, str(tmp), metadata=meta)
    return result
