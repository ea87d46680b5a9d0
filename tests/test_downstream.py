"""Downstream evaluation: F1, few-shot prompts, candidate scoring, record conversion, perplexity."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from encore_pl import downstream as ds

TOKENIZER = Path(__file__).parent / "assets" / "tiny-tokenizer"
GLUE_DIR = Path(os.environ.get("ENCORE_PL_SHARED_DATA", Path(__file__).parents[2] / "shared" / "data"))
GLUE_DIR = GLUE_DIR / "encore-eval" / "glue_eval"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"shared evaluation data not found at {GLUE_DIR}")
    return GLUE_DIR


# --- F1 and accuracy ------------------------------------------------------------------------


def test_binary_f1_by_hand():
    # positive = 1: TP 2 (items 0, 4), FP 1 (item 3), FN 1 (item 1) -> 2*2 / (2*2 + 1 + 1)
    assert ds.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], positive=1) == pytest.approx(4 / 6)
    # positive = 0 on the same lists: TP 1, FP 1, FN 1 -> 2 / 4
    assert ds.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1], positive=0) == pytest.approx(0.5)
    # the positive class is never predicted: F1 = 0, not an error
    assert ds.binary_f1([1, 0, 1], [0, 0, 0], positive=1) == 0.0
    assert ds.accuracy([1, 0, 1], [0, 0, 0]) == pytest.approx(1 / 3)


def test_macro_f1_by_hand():
    gold = [0, 1, 2, 3, 0, 1]
    pred = [0, 1, 1, 1, 0, 2]
    # class 0: TP 2 -> 1; class 1: TP 1, FP 2, FN 1 -> 2/5; class 2: TP 0 -> 0;
    # class 3: never predicted -> 0
    assert ds.macro_f1(gold, pred, labels=range(4)) == pytest.approx((1 + 0.4 + 0 + 0) / 4)
    # classes that occur in neither list are left out of the mean
    assert ds.macro_f1([0, 1], [0, 1], labels=range(4)) == pytest.approx(1.0)
    assert ds.macro_f1([0, 0], [1, 1], labels=range(4)) == 0.0


# --- few-shot prompts ------------------------------------------------------------------------


def test_few_shot_prompts_uses_first_k_as_shots_and_next_n_as_items():
    records = [{"sentence": f"text number {i}", "label": i % 2, "idx": i} for i in range(8)]
    items = ds.few_shot_prompts(records, "sst2", k_shot=2, n_items=3)
    shots = (
        "Review: text number 0\nSentiment: negative\n\n"
        "Review: text number 1\nSentiment: positive\n\n"
    )
    assert [ex.prompt for ex in items] == [shots + f"Review: text number {i}\nSentiment:" for i in (2, 3, 4)]
    assert [ex.answer for ex in items] == [0, 1, 0]
    assert all(ex.candidates == (" negative", " positive") for ex in items)
    # no shots: the bare item prompt
    assert ds.few_shot_prompts(records, "sst2", 0, 1)[0].prompt == "Review: text number 0\nSentiment:"
    with pytest.raises(ValueError, match="need 9 records, there are 8"):
        ds.few_shot_prompts(records, "sst2", k_shot=4, n_items=5)


# --- candidate scoring ------------------------------------------------------------------------


def direct_logprob(model, tok, prompt: str, candidate: str) -> float:
    """Summed log-probability of the candidate's tokens, one unpadded sequence, full logits."""
    prompt_ids = tok(prompt).input_ids
    full = tok(prompt + candidate).input_ids
    assert full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids)
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    return sum(logp[j - 1, full[j]].item() for j in range(len(prompt_ids), len(full)))


def test_candidate_scoring_matches_direct_unbatched_computation(model, tok):
    examples = [
        ds.Example("The capital of France is", (" Paris", " London", " the city of Rome"), 0),
        ds.Example("Review: a fine film.\nSentiment:", (" negative", " positive"), 1),
        ds.Example("Q: 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:", (" A", " B", " C", " D"), 1),
        ds.Example("Danielle Darrieux speaks", (" French", " English language"), 0),
    ]
    # batch size 3: one batch mixes sequences of different lengths (right padding)
    scores = ds.candidate_logprobs(model, tok, examples, batch_size=3)
    chosen = ds.choose_answers(model, tok, examples, batch_size=3)
    for ex, got, pick in zip(examples, scores, chosen):
        want = [direct_logprob(model, tok, ex.prompt, c) for c in ex.candidates]
        assert got == pytest.approx(want, abs=1e-4)
        assert pick == max(range(len(want)), key=want.__getitem__)
    # a model whose forward has no `logits_to_keep` gets full logits: same scores
    full = ds.candidate_logprobs(FullLogits(model), tok, examples, batch_size=2)
    assert sum(full, []) == pytest.approx(sum(scores, []), abs=1e-4)


class FullLogits(torch.nn.Module):
    """Wraps a causal LM behind a forward without `logits_to_keep`."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, use_cache=False, **cache_args):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **cache_args)


def test_shared_few_shot_context_is_computed_once_and_scores_match_direct(model, tok):
    context = "Review: a dull film.\nSentiment: negative\n\nReview: a joy.\nSentiment: positive\n\n"
    examples = [
        ds.Example(context + "Review: " + text + "\nSentiment:", (" negative", " positive", " mixed feelings"), 0)
        for text in ["fine.", "a long and rather slow story.", "great"]
    ]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        scores = ds.candidate_logprobs(model, tok, examples, batch_size=2)
    finally:
        hook.remove()
    assert calls[0][0] == 1 and all(shape[1] < calls[0][1] for shape in calls[1:])  # prefix once, then suffixes
    for ex, got in zip(examples, scores):
        assert got == pytest.approx([direct_logprob(model, tok, ex.prompt, c) for c in ex.candidates], abs=1e-4)


# --- tasks on the shared data ------------------------------------------------------------------


def test_record_conversion_on_shared_files():
    folder = glue_dir()
    for name in ds.TASKS:
        records = ds.load_task(name, folder)[:5]
        examples = [ds.convert_record(name, r) for r in records]
        for r, ex in zip(records, examples):
            if name == "sst2":
                assert ex.prompt == f"Review: {r['sentence'].strip()}\nSentiment:"
                assert (ex.candidates, ex.answer) == ((" negative", " positive"), r["label"])
            elif name == "cola":
                assert ex.prompt.startswith(f"Sentence: {r['sentence'].strip()}\n")
                assert ex.prompt.endswith("Is this sentence grammatically acceptable? Answer:")
                assert (ex.candidates, ex.answer) == ((" No", " Yes"), r["label"])
            elif name == "mrpc":
                assert ex.prompt == (
                    f"Sentence 1: {r['sentence1'].strip()}\nSentence 2: {r['sentence2'].strip()}\n"
                    "Do both sentences mean the same thing? Answer:"
                )
                assert (ex.candidates, ex.answer) == ((" No", " Yes"), r["label"])
            elif name in ("rte", "nli"):
                assert ex.prompt == (
                    f"Premise: {r['sentence1'].strip()}\nHypothesis: {r['sentence2'].strip()}\n"
                    "Does the premise entail the hypothesis? Answer:"
                )
                entails = r["label"] == 0 if name == "rte" else r["label"] == "entailment"
                assert ex.candidates == (" Yes", " No")
                assert ex.candidates[ex.answer] == (" Yes" if entails else " No")
            else:
                letters = "\n".join(f"{x}. {c.strip()}" for x, c in zip("ABCD", r["choices"]))
                assert ex.prompt == f"{r['question'].strip()}\n{letters}\nAnswer:"
                assert (ex.candidates, ex.answer) == ((" A", " B", " C", " D"), r["answer"])
    # RTE uses GLUE labels: record 1 ("P. Prayong ... is a member of Theravada") is entailment, 0
    rte = ds.load_task("rte", folder)
    assert "Theravada" in rte[1]["sentence2"] and rte[1]["label"] == 0
    assert ds.convert_record("rte", rte[1]).answer == 0


@pytest.mark.parametrize("name", ["sst2", "mmlu"])
def test_score_task_on_tiny_model(model, tok, name):
    records = ds.load_task(name, glue_dir())
    result = ds.score_task(model, tok, name, records, k_shot=2, n_items=4, batch_size=4)
    assert set(result) == {"f1", "accuracy", "n"} and result["n"] == 4
    assert 0.0 <= result["f1"] <= 100.0 and 0.0 <= result["accuracy"] <= 100.0
    # accuracy agrees with the chosen answers
    items = ds.few_shot_prompts(records, name, 2, 4)
    chosen = ds.choose_answers(model, tok, items, batch_size=4)
    assert result["accuracy"] == pytest.approx(100 * sum(c == ex.answer for c, ex in zip(chosen, items)) / 4)


def test_evaluate_downstream_reads_each_task(model, tok, tmp_path):
    rows = [{"sentence": f"sentence {i}", "label": i % 2, "idx": i} for i in range(4)]
    (tmp_path / "cola.json").write_text(json.dumps(rows))
    out = ds.evaluate_downstream(model, tok, ["cola"], tmp_path, k_shot=1, n_items=3)
    assert list(out) == ["cola"] and out["cola"]["n"] == 3
    with pytest.raises(FileNotFoundError, match="sst2.json"):
        ds.evaluate_downstream(model, tok, ["sst2"], tmp_path)


# --- errors -------------------------------------------------------------------------------------


def test_malformed_record_names_file_and_index(tmp_path):
    good = {"sentence": "fine", "label": 1, "idx": 0}
    path = tmp_path / "sst2.json"
    path.write_text(json.dumps([good, good, {"sentence": "bad label", "label": 2, "idx": 2}]))
    with pytest.raises(ValueError, match=r"sst2\.json: record 2: field 'label' must be an integer in 0\.\.1"):
        ds.load_task("sst2", tmp_path)
    path.write_text(json.dumps([good, {"label": 1}]))
    with pytest.raises(ValueError, match=r"sst2\.json: record 1: missing field 'sentence'"):
        ds.load_task("sst2", tmp_path)
    (tmp_path / "nli.json").write_text(json.dumps([{"sentence1": "a", "sentence2": "b", "label": "maybe"}]))
    with pytest.raises(ValueError, match=r"nli\.json: record 0: field 'label' must be one of"):
        ds.load_task("nli", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "mmlu.json")):
        ds.load_task("mmlu", tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        ds.load_task("squad", tmp_path)


# --- perplexity ---------------------------------------------------------------------------------


def test_perplexity_matches_direct_computation(model, tok, tmp_path):
    sentences = [
        "The capital city of the United Kingdom is London.",
        "Danielle Darrieux is a native speaker of French.",
        "The Eiffel Tower is located in Paris, and it is made of iron.",
    ]
    text = " ".join(sentences[i % 3] for i in range(120))  # longer than the first read
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    max_tokens, seq_len = 300, 64

    ppl = ds.perplexity(model, tok, path, max_tokens=max_tokens, seq_len=seq_len, batch_size=2)

    ids = tok(text, add_special_tokens=False).input_ids[:max_tokens]
    assert len(ids) == max_tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), seq_len):
            chunk = torch.tensor([ids[i : i + seq_len]])
            logits = model(chunk).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)
