"""C0's corpus: documents, BOS, padding, packing as before, the token minimum, and what C0 comes from."""

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

import encore_pl.stats as stats
from conftest import ASSETS, SHARED_DATA, tiny_tokenizer
from encore_pl.forward import run_to_stop
from encore_pl.keys import capture
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer
from encore_pl.stats import (
    KeyStatistics, cache_path, compute_key_statistics, corpus_sequences, document_sequences, model_fingerprint,
    packed_stream, split_documents,
)

WIKI = " \n = Alpha = \n \n Alpha is a letter . \n \n = = History = = \n \n It is old . \n \n = Beta = \n \n Beta follows . \n"
PARAGRAPHS = [
    "The capital city of France is Paris, and Paris is a large city on the Seine.",
    "Danielle Darrieux speaks French.",
    "The mother tongue of a person is the language they learned first at home, as a child, "
    "and it is often the language of their country, of their parents and of their school.",
    "London.",
    "The Eiffel Tower is in Paris. It was built for a world fair and is made of iron.",
    "Dublin is the capital city of Ireland.",
    "Apples are red or green; bananas are yellow; the sky is blue and the grass is green in spring.",
]


def test_split_documents_by_titles_or_blank_lines():
    docs = split_documents(WIKI)
    assert len(docs) == 2  # the section heading "= = History = =" does not start a document
    assert docs[0].startswith("= Alpha =") and "= = History = =" in docs[0] and "It is old" in docs[0]
    assert docs[1].startswith("= Beta =") and docs[1].endswith("Beta follows .")
    assert split_documents("intro line\n = Alpha = \n text") == ["intro line", "= Alpha = \n text"]
    plain = "First line,\nsecond line.\n\n  \n\nSecond.\n \t\nThird.\n"
    assert split_documents(plain) == ["First line,\nsecond line.", "Second.", "Third."]
    assert split_documents(" \n\n  ") == []


def write_paragraphs(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n \n".join(PARAGRAPHS) + "\n")
    return path


@torch.no_grad()
def one_document_at_a_time(lm, tok, layers, docs, seq_len):
    """Reference C0: every document alone (no padding anywhere), float64 sums."""
    d_ff = lm.weight_out_in(layers[0]).shape[1]
    sums, count = {l: torch.zeros(d_ff, d_ff, dtype=torch.float64) for l in layers}, 0
    with capture(lm, layers, []) as (keys, _):
        for doc in docs:
            ids = torch.tensor([tok(doc).input_ids[:seq_len]])
            run_to_stop(lm, input_ids=ids)
            for l in layers:
                k = keys[l].reshape(-1, d_ff).double()
                sums[l] += k.T @ k
            count += ids.numel()
    return {l: s / count for l, s in sums.items()}, count


def test_document_sums_equal_one_document_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    cfg = KeyStatistics(files=[str(write_paragraphs(tmp_path))], num_tokens=None, seq_len=24, batch_size=3,
                        min_tokens_factor=0)
    calls = []
    real_run = stats.run_to_stop
    monkeypatch.setattr(stats, "run_to_stop", lambda lm, **inputs: calls.append(inputs) or real_run(lm, **inputs))
    info = {}
    c0 = compute_key_statistics(lm, tok, [1, 2], cfg, info=info)
    ref, count = one_document_at_a_time(lm, tok, [1, 2], PARAGRAPHS, cfg.seq_len)
    assert any("attention_mask" in c for c in calls)  # some batches were padded: padding must not count
    assert info == {"tokens": count, "documents": len(PARAGRAPHS), "source": cfg.files[0]}
    assert count < len(PARAGRAPHS) * cfg.seq_len  # short documents: padding would have added keys
    for l in (1, 2):
        err = (c0[l].double() - ref[l]).norm() / ref[l].norm()
        assert err < 1e-5, (l, err)


def tokenizer_with_bos(adds_it: bool):
    """The tiny tokenizer with a BOS token, added to every text by the tokenizer or not."""
    t = Tokenizer.from_file(str(ASSETS / "tiny-tokenizer" / "tokenizer.json"))
    t.add_special_tokens(["<s>"])
    bos = t.token_to_id("<s>")
    if adds_it:
        t.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_every_document_starts_with_the_bos_the_tokenizer_adds():
    cfg = KeyStatistics(files=["unused"], num_tokens=None, seq_len=16)
    tok = tokenizer_with_bos(adds_it=True)
    seqs = document_sequences(tok, iter(PARAGRAPHS), cfg)
    assert len(seqs) == len(PARAGRAPHS)
    assert all(s[0] == tok.bos_token_id and s.count(tok.bos_token_id) == 1 for s in seqs)
    assert max(len(s) for s in seqs) == cfg.seq_len  # long documents cut, BOS kept
    # a BOS the tokenizer does not add (GPT-2, SmolLM2-Instruct) is not added: as tok(text) in the prompts
    tok = tokenizer_with_bos(adds_it=False)
    assert all(tok.bos_token_id not in s for s in document_sequences(tok, iter(PARAGRAPHS), cfg))
    # packing: no special tokens, documents joined by EOS (as before)
    stream, n = packed_stream(tokenizer_with_bos(adds_it=True), iter(PARAGRAPHS), replace(cfg, packing=True))
    assert n == len(PARAGRAPHS) and tok.bos_token_id not in stream and stream.count(tok.eos_token_id) == n


def test_num_texts_and_num_tokens_limit_documents():
    tok = tiny_tokenizer()
    cfg = KeyStatistics(files=["unused"], num_tokens=None, num_texts=3, seq_len=1000)
    assert document_sequences(tok, iter(PARAGRAPHS), cfg) == [tok(p).input_ids for p in PARAGRAPHS[:3]]
    first = len(tok(PARAGRAPHS[0]).input_ids)
    seqs = document_sequences(tok, iter(PARAGRAPHS), replace(cfg, num_texts=None, num_tokens=first + 5))
    assert [len(s) for s in seqs] == [first, 5]


def test_wikitext_files_give_every_article():
    wiki = SHARED_DATA / "wikitext-2-pytorch-examples"
    vocab = SHARED_DATA / "gpt2-tokenizer"
    if not (wiki / "valid.txt").exists() or not (vocab / "vocab.json").exists():
        pytest.skip(f"shared WikiText-2 or GPT-2 tokenizer missing under {SHARED_DATA}")
    tok = GPT2TokenizerFast(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    files = [str(wiki / "valid.txt"), str(wiki / "test.txt")]
    seqs, documents = corpus_sequences(tok, None, KeyStatistics(files=files, num_texts=2000, num_tokens=None, seq_len=100_000))
    assert documents == len(seqs) == 122  # 60 + 62 articles (" = Title = " lines)
    assert sum(map(len, seqs)) >= 100_000
    assert all(tok.decode(s[:2]).startswith("=") for s in seqs)  # each starts at its title


def test_too_small_a_corpus_is_refused_computed_or_cached(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)  # d_ff 64: 640 tokens needed
    cfg = KeyStatistics(num_tokens=256, seq_len=64)
    with pytest.raises(ValueError) as e:
        compute_key_statistics(lm, tok, [1], cfg)
    message = str(e.value)
    for part in ("C0 comes from 256 tokens of model samples (seed 0)", "640 needed", "10 x d_ff 64",
                 "model.key_stats.min_tokens_factor"):
        assert part in message, message
    info = {}
    compute_key_statistics(lm, tok, [1], replace(cfg, min_tokens_factor=0), info=info)  # the override
    assert info["tokens"] == 256
    with pytest.raises(ValueError, match="the cached C0 .* comes from 256 tokens"):
        compute_key_statistics(lm, tok, [1], cfg)
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(PARAGRAPHS))
    with pytest.raises(ValueError, match=re.escape(f"tokens of {small}, fewer than the 640 needed")):
        compute_key_statistics(lm, tok, [1], KeyStatistics(files=[str(small)], num_tokens=None, seq_len=64))


def old_corpus_token_ids(tok, cfg):
    """The stream of the packing scheme as the project built it before documents (copied)."""
    limit = cfg.num_tokens
    texts = (line for f in cfg.files for line in Path(f).read_text(encoding="utf-8").split("\n\n"))
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


def old_cache_name(fingerprint, layer, cfg, corpus_id):
    parts = [fingerprint, layer, corpus_id, cfg.num_tokens, cfg.seq_len, cfg.dtype]
    if cfg.num_texts is not None:
        parts.append(cfg.num_texts)
    if cfg.compute_dtype is not None:
        parts.append(f"compute={cfg.compute_dtype}")
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]
    return f"c0-{fingerprint}-layer{layer}-{digest}.safetensors"


def test_packing_runs_the_same_stream_under_the_same_cache_key(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 3) + "\n\n\n")
    base = KeyStatistics(files=[str(path)], packing=True, num_tokens=None, seq_len=32, batch_size=3, min_tokens_factor=0)
    real_run = stats.run_to_stop
    for cfg in (base, replace(base, num_tokens=150), replace(base, num_texts=5, seq_len=8)):
        seqs, _ = corpus_sequences(tok, model, cfg)
        old = old_corpus_token_ids(tok, cfg)
        assert [t for s in seqs for t in s] == old and all(len(s) == cfg.seq_len for s in seqs[:-1])
        calls = []
        record = lambda lm, calls=calls, **inputs: calls.append(inputs) or real_run(lm, **inputs)  # noqa: E731
        monkeypatch.setattr(stats, "run_to_stop", record)
        info = {}
        compute_key_statistics(lm, tok, [1], cfg, info=info)
        assert [t for c in calls for row in c["input_ids"].tolist() for t in row] == old  # run as it was
        assert all("attention_mask" not in c for c in calls)
        assert info["tokens"] == len(old)
        fp = model_fingerprint(model)
        assert cache_path(fp, 1, cfg, cfg.corpus_id()).name == old_cache_name(fp, 1, cfg, cfg.corpus_id())
        documents = replace(cfg, packing=False)
        assert cache_path(fp, 1, documents, cfg.corpus_id()).name != old_cache_name(fp, 1, cfg, cfg.corpus_id())
    sampled = KeyStatistics(num_tokens=1024, seq_len=64)  # the model's own text: packed, key unchanged either way
    assert not sampled.documents()
    assert cache_path("f", 1, sampled, sampled.corpus_id()).name == old_cache_name("f", 1, sampled, sampled.corpus_id())


def test_info_from_the_cache_equals_a_fresh_computation(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    cfg = KeyStatistics(files=[str(write_paragraphs(tmp_path))], num_tokens=None, seq_len=32, min_tokens_factor=0)
    fresh, cached = {}, {}
    first = compute_key_statistics(lm, tok, [1, 2], cfg, info=fresh)
    assert fresh["documents"] == len(PARAGRAPHS) and fresh["tokens"] > len(PARAGRAPHS)

    def no_pass(*args):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(stats, "corpus_sequences", no_pass)
    again = compute_key_statistics(lm, tok, [1, 2], cfg, info=cached)
    assert cached == fresh
    assert all(torch.equal(first[l], again[l]) for l in (1, 2))
    # model samples: one document per sampled sequence
    monkeypatch.undo()
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache"))
    info = {}
    compute_key_statistics(lm, tok, [1], KeyStatistics(num_tokens=700, seq_len=64), info=info)
    assert info == {"tokens": 700, "documents": 11, "source": "model samples (seed 0)"}


class ProcessOne:
    """Process 1 of 2: everything broadcast comes from process 0's `objects` and `tensors`, in order."""

    rank, world = 1, 2

    def __init__(self, objects, tensors):
        self.objects, self.tensors = list(objects), list(tensors)

    def broadcast_object(self, obj):
        return self.objects.pop(0)

    def broadcast(self, tensor):
        return tensor.copy_(self.tensors.pop(0))


def test_process_0s_cache_and_info_reach_the_other_processes(tiny_llama_dir, tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    lm = LocatedModel(model)
    cfg = KeyStatistics(num_tokens=1024, seq_len=64)
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "one"))  # this process has no cache of its own
    monkeypatch.setattr(stats, "corpus_sequences", lambda *a: pytest.fail("process 1 ran its own pass"))
    zero_c0 = torch.eye(64)
    zero_info = {"tokens": 5000, "documents": 40, "source": "process 0's corpus"}  # unlike what this process would find
    info = {}
    one = compute_key_statistics(lm, tok, [1], cfg, ProcessOne([[[], dict(zero_info)]], [zero_c0]), info=info)
    assert info == zero_info and torch.equal(one[1], zero_c0)
    # process 0's cache is checked on every process: a too small one stops them all alike
    with pytest.raises(ValueError, match="the cached C0 .* comes from 100 tokens of process 0's corpus"):
        compute_key_statistics(lm, tok, [1], cfg, ProcessOne([[[], {**zero_info, "tokens": 100}]], [zero_c0]))


def test_a_resumed_run_without_the_c0_cache_computes_c0_from_the_base_weights(tiny_llama_dir, tmp_path, monkeypatch):
    """On resume the model holds the edits of the checkpoint; if the C0 cache is gone, C0 (and its
    cache, keyed by the base model) must still be the unedited model's."""
    from encore_pl.ranks import Ranks
    from encore_pl.module import KnowledgeEditor

    key_stats = KeyStatistics(files=[str(write_paragraphs(tmp_path))], num_tokens=None, seq_len=24, batch_size=3,
                              min_tokens_factor=0)  # a small corpus is enough to tell two C0s apart

    def c0_of(increment_scale: float, cache: str) -> tuple[dict, KnowledgeEditor]:
        monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / cache))
        module = KnowledgeEditor(str(tiny_llama_dir), layers=[1, 2], key_stats=key_stats)
        module.ranks = module.editor.ranks = Ranks()
        module.editor.state.context_prefixes = ["x. "]  # as restored from a checkpoint
        g = torch.Generator().manual_seed(0)
        module.edited_layers.load_increments({l: increment_scale * torch.randn(module.edited_layers.increment(l).shape, generator=g)
                                              for l in module.layers})
        edited = {l: module.lm.weight_out_in(l).clone() for l in module.layers}
        module.on_fit_start()
        for l in module.layers:  # the edits are back in the model afterwards
            assert torch.equal(module.lm.weight_out_in(l), edited[l])
        return module.editor.c0, module

    base, _ = c0_of(0.0, "cache-base")
    resumed, _ = c0_of(1.0, "cache-resumed")
    for l in base:
        torch.testing.assert_close(resumed[l], base[l], rtol=0, atol=0)
    # what C0 of the edited model would be: different (so the check above can fail)
    _, module = c0_of(1.0, "cache-edited-2")
    monkeypatch.setenv("ENCORE_PL_CACHE", str(tmp_path / "cache-edited"))
    edited_c0 = compute_key_statistics(module.lm, module.tokenizer, module.layers, key_stats)
    assert not torch.allclose(edited_c0[2], base[2])


@pytest.mark.parametrize("peaked", [True, False])
def test_nucleus_sample_draws_from_the_nucleus_with_its_probabilities(peaked):
    """Rows whose nucleus fits the shortlist (peaked) and rows that need the bisection (flat):
    every draw is in the nucleus (from a full sort) and the frequencies are its renormalised
    probabilities."""
    from encore_pl.stats import nucleus_sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * (4.0 if peaked else 0.5)
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = order[: int((cum < 0.9).sum()) + 1]  # up to and with the token that reaches 0.9
    assert (len(nucleus) <= 8) == peaked  # the shortlist of 8 holds the nucleus only when peaked
    u = torch.rand(20000, 1, generator=torch.Generator().manual_seed(1))
    draws = nucleus_sample(logits.expand(20000, -1), 0.9, u, shortlist=8)
    counts = torch.bincount(draws, minlength=40).float() / len(draws)
    assert set(draws.unique().tolist()) == set(nucleus.tolist())
    want = torch.zeros(40)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert (counts - want).abs().max() < 0.015
    assert torch.equal(draws, nucleus_sample(logits.expand(20000, -1), 0.9, u, shortlist=8))  # u fixes the draws


def test_the_sampled_corpus_does_not_depend_on_the_batch_size(tiny_llama_dir):
    from encore_pl.stats import sample_from_model

    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    one = sample_from_model(model, tok, 6 * 12, 12, seed=3, batch_size=6)
    assert len(one) == 72 and len(set(one)) > 10
    assert sample_from_model(model, tok, 6 * 12, 12, seed=3, batch_size=4) == one
    assert sample_from_model(model, tok, 6 * 12, 12, seed=4, batch_size=6) != one
    assert tok.eos_token_id not in one[1:12]  # sequences of full length (the first token is the start token)
