"""C0: the uncentred second moment E[k k^T] of the down-matrix inputs over a text corpus.

All layers of the window come from one pass over the corpus, which stops after the last layer
needed. As the published computation: each document of the corpus is one sequence, tokenised as
the model's prompts are (`tok(text)`, special tokens included: BOS where the tokenizer adds it),
cut to `seq_len` tokens; sequences are right-padded in batches and only non-padding tokens count.
With `packing: true` (and for text sampled from the model) text is tokenised without special
tokens, joined with EOS and packed into sequences of `seq_len` tokens instead. Results are cached
on disk, one safetensors file per layer, keyed by the model's weights, the layer, the corpus, the
token count, `seq_len`, the mode and dtype.
"""

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .files import replaced
from .forward import run_to_stop
from .keys import capture
from .ranks import Ranks
from .layouts import LocatedModel
from .models import cache_dir, eos_ids, reduced_copy

SAMPLED_TOKENS = 32768  # model-sampled corpus size when num_tokens is None


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
            code's "mom2_n_samples"); None = no limit. How files are cut into documents: see
            `split_documents` (with `packing`, on "\n\n" as before).
        seq_len: tokens per document (the model's context, as published); with `packing`, tokens
            per packed sequence.
        packing: False (default): one document per sequence, padded and masked, as published.
            True: the earlier scheme, documents joined with EOS and packed into `seq_len` chunks
            (no special tokens, no padding); kept so caches and tuned results stay as they were.
            Text sampled from the model is always packed.
        min_tokens_factor: refuse a C0 from fewer than this many tokens per key dimension (d_ff),
            computed or cached; 0 turns the check off.
        batch_size: sequences per forward pass.
        seed: seed of the model-sampled corpus.
        dtype: dtype of the stored C0.
        compute_dtype: run the pass under autocast in this dtype, e.g. "bfloat16": 1.44x as fast
            on a 2-core AVX512-BF16 CPU (SmolLM2, 5 layers, 586k WikiText tokens: 229 s against
            331 s), at a relative (Frobenius) error of C0 of 4e-3 to 6e-3. A corpus sampled from
            the model is sampled in a copy of the model in this dtype. None: the model's own
            dtype. Sums are always float64.
    """

    files: list[str] = field(default_factory=list)
    hf_dataset: Optional[str] = None
    text_field: str = "text"
    num_tokens: Optional[int] = 32768
    num_texts: Optional[int] = None
    seq_len: int = 512
    packing: bool = False
    min_tokens_factor: float = 10.0
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
        return f"model-samples-v2-seed{self.seed}"  # v2: sequences sampled together (nucleus_sample)

    def documents(self) -> bool:
        """One document per padded sequence (False: packed, as with text sampled from the model)."""
        return not self.packing and bool(self.files or self.hf_dataset)

    def source(self) -> str:
        """What the corpus is, for people: the files, the dataset, or the model's samples."""
        if self.files:
            return ", ".join(str(f) for f in self.files)
        if self.hf_dataset:
            return self.hf_dataset
        return f"model samples (seed {self.seed})"


def model_fingerprint(model) -> str:
    """A short hash of the input embeddings: tells models apart without hashing every weight."""
    emb = model.get_input_embeddings().weight.detach().cpu().float().contiguous()  # to the host first: no GPU copy
    h = hashlib.sha256(emb.numpy().tobytes())
    h.update(json.dumps([model.config.model_type, model.config.num_hidden_layers]).encode())
    return h.hexdigest()[:16]


def split_documents(text: str) -> list[str]:
    """The documents of a local text file, each stripped of surrounding whitespace.

    A WikiText-style file, one with top-level title lines such as " = Homarus gammarus = "
    (section headings such as " = = History = = " are not titles), is cut before each title: one
    document per article, its title included. Any other file is cut at blank lines (empty or
    whitespace only): one document per paragraph. Text before the first title is a document too.
    """
    title = re.compile(r"\s*=\s+[^=\s](?:.*[^=\s])?\s+=\s*")
    lines = text.split("\n")
    titled = any(title.fullmatch(line) for line in lines)
    docs, current = [], []
    for line in lines:
        if titled and title.fullmatch(line):
            docs.append("\n".join(current))
            current = [line]
        elif not titled and not line.strip():
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [d.strip() for d in docs if d.strip()]


def corpus_texts(cfg: KeyStatistics) -> Iterator[str]:
    """The corpus's texts in order: the files' documents, or the `datasets` corpus's rows.

    With `packing`, files are cut on "\n\n" (the earlier scheme, kept so its results stay the same).
    """
    if cfg.files:
        for f in cfg.files:
            text = Path(f).read_text(encoding="utf-8")
            yield from (text.split("\n\n") if cfg.packing else split_documents(text))
        return
    import datasets

    path, *rest = cfg.hf_dataset.split(":")
    config = rest[0] if rest else None
    split = rest[1] if len(rest) > 1 else "train"
    yield from (r[cfg.text_field] for r in datasets.load_dataset(path, config, split=split, streaming=True))


def packed_stream(tok, texts: Iterator[str], cfg: KeyStatistics) -> tuple[list[int], int]:
    """The `packing` scheme: texts tokenised without special tokens, each followed by EOS, in one
    stream (with `num_texts`, each text cut to `seq_len` tokens first). Returns the stream and the
    number of texts in it."""
    limit = cfg.num_tokens
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
    return (stream[:limit] if limit is not None else stream), n_texts


def document_sequences(tok, texts: Iterator[str], cfg: KeyStatistics) -> list[list[int]]:
    """One sequence per document, as the published computation: `tok(text)` with the tokenizer's
    special tokens, cut to `seq_len` tokens; at most `num_texts` documents and `num_tokens` tokens
    (the last document cut to fit).

    BOS comes from the tokenizer (Llama's adds it). A tokenizer that has a BOS but does not add
    it gets none: GPT-2's (<|endoftext|>) and SmolLM2-Instruct's (<|im_start|>, its chat-turn
    marker). The published code does not add one either, and the edit and evaluation prompts
    (`tok(text)`) do not start with it, so C0 weighs the positions that editing meets.
    """
    seqs, total = [], 0
    for text in texts:
        if not text.strip():
            continue
        ids = tok(text, truncation=True, max_length=cfg.seq_len).input_ids
        if cfg.num_tokens is not None:
            ids = ids[: cfg.num_tokens - total]
        seqs.append(ids)
        total += len(ids)
        if (cfg.num_tokens is not None and total >= cfg.num_tokens) or (cfg.num_texts is not None and len(seqs) >= cfg.num_texts):
            break
    return seqs


def corpus_sequences(tok, model, cfg: KeyStatistics) -> tuple[list[list[int]], int]:
    """The token sequences of the pass, and how many documents they come from: documents, packed
    texts, or sequences sampled from the model (each `seq_len` tokens, packed as they come)."""
    if cfg.documents():
        seqs = document_sequences(tok, corpus_texts(cfg), cfg)
        return seqs, len(seqs)
    if cfg.files or cfg.hf_dataset:
        stream, documents = packed_stream(tok, corpus_texts(cfg), cfg)
    else:
        dtype = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else model.dtype
        sampler = model if dtype == model.dtype else reduced_copy(model, dtype)  # real weights, not autocast
        stream = sample_from_model(sampler, tok, cfg.num_tokens or SAMPLED_TOKENS, cfg.seq_len, cfg.seed, cfg.batch_size)
        del sampler
        documents = math.ceil(len(stream) / cfg.seq_len)
    return [stream[i : i + cfg.seq_len] for i in range(0, len(stream), cfg.seq_len)], documents


def check_enough(tokens: int, d_ff: int, cfg: KeyStatistics, what: str, source: str) -> None:
    """Refuse a C0 from fewer than `min_tokens_factor` x d_ff tokens: its rank is at most the token
    count, so a small corpus gives a nearly empty preservation term (and null space)."""
    needed = math.ceil(cfg.min_tokens_factor * d_ff)
    if tokens < needed:
        raise ValueError(
            f"{what} comes from {tokens:,} tokens of {source}, fewer than the {needed:,} needed "
            f"({cfg.min_tokens_factor:g} x d_ff {d_ff}): use more text (model.key_stats.files, num_texts, "
            "num_tokens, seq_len) or lower model.key_stats.min_tokens_factor (0 turns this check off)"
        )


SAMPLE_TOP_P = 0.95  # nucleus of the model-sampled corpus
SAMPLE_CHUNK = 256  # sequences whose uniform numbers are drawn together (fixed: the corpus must not depend on batch_size)


def _draw(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: per row, the column where the cumulative weight first exceeds u x total."""
    cum = weights.cumsum(-1)
    return torch.searchsorted(cum, u * cum[:, -1:], right=True).clamp(max=weights.shape[-1] - 1)


def nucleus_sample(logits: torch.Tensor, top_p: float, u: torch.Tensor, shortlist: int = 1024,
                   iterations: int = 24) -> torch.Tensor:
    """One token per row [n] from the nucleus: the most probable tokens whose probability reaches
    `top_p` (temperature 1), drawn by inverse CDF with the row's uniform number `u` [n, 1], without
    sorting the vocabulary. The nucleus is looked for among the `shortlist` most probable tokens (a
    partial sort); a row whose nucleus is larger (a flat distribution) takes {p >= t} for the
    largest t that still holds `top_p`, found by bisection to 2^-iterations of the shortlist's
    last probability (so it may also keep tokens that much less probable than the last one)."""
    probs = logits.float().softmax(-1)
    top, index = probs.topk(min(shortlist, probs.shape[-1]), dim=-1)  # descending
    nucleus = torch.where(top.cumsum(-1) - top < top_p, top, torch.zeros_like(top))  # up to and with the token reaching top_p
    chosen = index.gather(1, _draw(nucleus, u)).squeeze(1)
    wide = torch.nonzero(top.sum(-1) < top_p).squeeze(1)
    if len(wide):
        p = probs[wide]
        lo, hi = torch.zeros_like(top[wide, -1:]), top[wide, -1:]  # t lies below the shortlist's last probability
        for _ in range(iterations):
            mid = (lo + hi) / 2
            enough = torch.where(p >= mid, p, torch.zeros_like(p)).sum(-1, keepdim=True) >= top_p
            lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
        chosen[wide] = _draw(torch.where(p >= lo, p, torch.zeros_like(p)), u[wide]).squeeze(1)
    return chosen


@torch.no_grad()
def sample_from_model(model, tok, num_tokens: int, seq_len: int, seed: int, batch_size: int = 64) -> list[int]:
    """Offline corpus: `num_tokens` tokens sampled from the model with a fixed seed, as sequences
    of `seq_len` tokens that start with BOS (or EOS) and never end early (no end token is
    sampled). `batch_size` sequences are generated together, token by token with a key/value
    cache. The uniform numbers of the nucleus draws are drawn per SAMPLE_CHUNK sequences up front,
    so the corpus does not depend on `batch_size` (up to the rounding of batched matmuls)."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    device = model.device
    ends = sorted(eos_ids(model, tok))
    n_seqs = -(-num_tokens // seq_len)
    stream: list[int] = []
    bar = tqdm(total=n_seqs * seq_len, desc="sampling C0 corpus from the model", unit="tok")
    for chunk, first in enumerate(range(0, n_seqs, SAMPLE_CHUNK)):
        n = min(SAMPLE_CHUNK, n_seqs - first)
        generator = torch.Generator(device=device).manual_seed(seed * 1000003 + chunk)
        uniforms = torch.rand(n, seq_len, generator=generator, device=device)
        for b in range(0, n, batch_size):
            u = uniforms[b : b + batch_size]
            seqs = torch.full((len(u), seq_len), start, dtype=torch.long, device=device)
            past = None
            for t in range(1, seq_len):
                out = model(input_ids=seqs[:, t - 1 : t], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
                logits[:, ends] = float("-inf")  # sequences of full length
                seqs[:, t] = nucleus_sample(logits, SAMPLE_TOP_P, u[:, t : t + 1])
                bar.update(len(u))
            stream += seqs.flatten().tolist()
            bar.update(len(u))
    bar.close()
    return stream[:num_tokens]


def cache_path(fingerprint: str, layer: int, cfg: KeyStatistics, corpus_id: str) -> Path:
    parts = [fingerprint, layer, corpus_id, cfg.num_tokens, cfg.seq_len, cfg.dtype]
    if cfg.num_texts is not None:
        parts.append(cfg.num_texts)
    if cfg.compute_dtype is not None:
        parts.append(f"compute={cfg.compute_dtype}")
    if cfg.documents():  # only here: packed caches keep the keys they were written under
        parts.append("documents")
    key = json.dumps(parts)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir() / "stats" / f"c0-{fingerprint}-layer{layer}-{digest}.safetensors"


def load_cached(path: Path, d_ff: int, fingerprint: str, layer: int, corpus_id: str) -> Optional[tuple[torch.Tensor, dict]]:
    """The cached C0 and what it comes from ({"tokens", "documents", "source"}; the last two None
    in caches written before they were recorded), or None; a clear error if the file is corrupt or
    was made for something else."""
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
    documents = meta.get("documents")
    documents = None if documents is None else int(documents)
    return c0, {"tokens": int(meta["tokens"]), "documents": documents, "source": meta.get("source")}


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
    lm: LocatedModel, tok, layers: list[int], cfg: KeyStatistics, ranks: Optional[Ranks] = None,
    info: Optional[dict] = None,
) -> dict[int, torch.Tensor]:
    """C0 for every layer of `layers`, from the cache or from one pass over the corpus.

    With several processes (`ranks`), each runs every world-th sequence, the sums are added up
    across processes, and process 0 alone writes the cache. `info`, if given, is filled with what
    C0 comes from: {"tokens": non-padding tokens, "documents": documents (texts when packed,
    sampled sequences for the model's own text), "source": the corpus}; as C0, process 0's cache
    decides. A C0 from fewer than `cfg.min_tokens_factor` x d_ff tokens is refused.
    """
    ranks = ranks or Ranks()
    fingerprint = model_fingerprint(lm.model)
    corpus_id = cfg.corpus_id()
    d_ff = lm.weight_out_in(layers[0]).shape[1]
    result, missing, used = {}, [], None
    for layer in layers:
        cached = load_cached(cache_path(fingerprint, layer, cfg, corpus_id), d_ff, fingerprint, layer, corpus_id)
        if cached is None:
            missing.append(layer)
        else:
            result[layer], used = cached
    if ranks.world > 1:  # process 0's cache decides (it may be the only writer): every process gets its C0
        missing, used = ranks.broadcast_object([missing, used])
        for layer in layers:
            if layer in missing:
                result.pop(layer, None)
            else:
                empty = torch.empty(d_ff, d_ff, dtype=getattr(torch, cfg.dtype), device="cpu")
                mine = result[layer] if ranks.rank == 0 else empty
                result[layer] = ranks.broadcast(mine)
    if used is not None:  # every layer of a window comes from one pass over the same corpus
        used["source"] = used["source"] or cfg.source()
        check_enough(used["tokens"], d_ff, cfg, f"the cached C0 (in {cache_dir() / 'stats'})", used["source"])
    if not missing:
        if info is not None:
            info.update(used)
        return result

    if not (cfg.files or cfg.hf_dataset):  # the sample's size is known: refuse before sampling
        check_enough(cfg.num_tokens or SAMPLED_TOKENS, d_ff, cfg, "C0", cfg.source())
    seqs, documents = corpus_sequences(tok, lm.model, cfg)
    check_enough(sum(len(s) for s in seqs), d_ff, cfg, "C0", cfg.source())
    if cfg.documents():  # similar lengths batched together: little padding (the sums do not depend on the order)
        seqs = sorted(seqs, key=len, reverse=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0  # masked, after the real tokens: never read
    sums = {l: torch.zeros(d_ff, d_ff, dtype=torch.float64, device="cpu") for l in missing}
    count = 0
    t0 = time.time()
    device = lm.model.device
    compute_dtype = getattr(torch, cfg.compute_dtype) if cfg.compute_dtype else None
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None)
    mine = ranks.share(seqs)  # this process's sequences
    bar = tqdm(total=sum(len(c) for c in mine), desc=f"C0 for layers {missing}", unit="tok")
    with capture(lm, missing, []) as (keys, _):  # the forward stops at the last key needed
        for i in range(0, len(mine), cfg.batch_size):
            batch = mine[i : i + cfg.batch_size]
            same = all(len(c) == len(batch[0]) for c in batch)
            # documents: right-padded and masked; packed: only the corpus's last, shorter sequence runs on its own
            groups = [batch] if same or cfg.documents() else [[c] for c in batch]
            for group in groups:
                width = max(len(c) for c in group)
                ids = torch.tensor([c + [pad] * (width - len(c)) for c in group], dtype=torch.long, device=device)
                lengths = torch.tensor([len(c) for c in group], device=device)
                real = torch.arange(width, device=device)[None, :] < lengths[:, None]
                padded = not bool(real.all())
                with autocast:
                    run_to_stop(lm, input_ids=ids, **({"attention_mask": real.long()} if padded else {}))
                for l in missing:
                    k = keys[l].reshape(-1, d_ff)
                    add_gram(sums[l], (k[real.reshape(-1)] if padded else k).float())  # keys of padding never count
                n = int(real.sum())
                count += n
                bar.update(n)
            bar.set_postfix(tok_per_s=f"{count / (time.time() - t0):.0f}")
    bar.close()
    count = int(ranks.sum(torch.tensor(float(count), dtype=torch.float64, device="cpu")).item())
    if info is not None:
        info.update({"tokens": count, "documents": documents, "source": cfg.source()})
    for l in missing:
        c0 = (ranks.sum(sums[l]) / count).to(getattr(torch, cfg.dtype))
        result[l] = c0
        if ranks.rank != 0:
            continue
        meta = {"model": fingerprint, "layer": str(l), "tokens": str(count), "documents": str(documents),
                "source": cfg.source(), "corpus": corpus_id, "config": json.dumps(asdict(cfg))}
        with replaced(cache_path(fingerprint, l, cfg, corpus_id)) as tmp:  # a cache file is complete or absent
            save_file({"c0": c0.contiguous()}, str(tmp), metadata=meta)
    return result
