"""Downstream evaluation: F1, few-shot prompts, candidate scoring, record conversion, perplexity,
and the published ("paper") protocol: its F1, answer parser, prompts, batched greedy generation."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from encore_pl import downstream as ds
from encore_pl.callbacks import DownstreamEvaluation
from encore_pl.ranks import Ranks
from encore_pl.evaluation import greedy_continuations

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
    assert set(result) == {"f1", "accuracy", "n", "protocol"} and result["n"] == 4 and result["protocol"] == "logprob"
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


# --- the published ("paper") protocol -------------------------------------------------------------


def test_weighted_f1_by_hand_with_invalid_answers():
    # classes -1, 0, 1; weights = gold support (0: 3, 1: 3, -1: 0)
    gold = [0, 0, 1, 1, 1, 0]
    pred = [0, -1, 1, 0, -1, 0]
    # class 0: TP 2 (items 0, 5), FP 1 (item 3), FN 1 (item 1) -> 4/6; class 1: TP 1, FN 2 -> 2/4;
    # class -1: never gold, weight 0 (its predictions are the FNs above)
    assert ds.weighted_f1(gold, pred) == pytest.approx((3 * 4 / 6 + 3 * 2 / 4) / 6)
    # unequal support: class 0 (1 gold): TP 1, FP 1 -> 2/3; class 1 (3 gold): TP 1, FN 2 -> 1/2
    assert ds.weighted_f1([1, 1, 1, 0], [1, -1, 0, 0]) == pytest.approx((1 * 2 / 3 + 3 * 1 / 2) / 4)
    # scikit-learn's documented example: f1_score([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], average="weighted")
    assert ds.weighted_f1([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1]) == pytest.approx(0.26666666666666666)
    assert ds.weighted_f1([1, 0], [-1, -1]) == 0.0  # nothing parsed: F1 0
    assert ds.weighted_f1([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        ds.weighted_f1([0, 1], [0])


@pytest.mark.parametrize("name, text, prompt, want", [
    # sst_eval.py:45-53: after the last "Sentiment :", lowercased, "positive" checked first
    ("sst2", "Review : fun\nSentiment : positive\nReview :dull\nSentiment : negative\n", "", 0),
    ("sst2", "Review :x\nSentiment : Positive review", "", 1),
    ("sst2", "Review :x\nSentiment : negative or positive", "", 1),
    ("sst2", "Review : a\nSentiment : positive\nReview :x\nSentiment : neutral", "", -1),  # a shot's label does not count
    ("sst2", "Review :x\nSentiment :", "", -1),
    # mrpc_eval.py:54-62: after the last "Answer:", "yes" then "no" as substrings
    ("mrpc", "...\nAnswer: No\nSentence 1: a\nSentence 2: b\nAnswer: Yes\n", "", 1),
    ("mrpc", "Sentence 1: a\nSentence 2: b\nAnswer: Not really", "", 0),  # "no" in "not"
    ("mrpc", "Sentence 1: a\nSentence 2: b\nAnswer: nope, yes", "", 1),
    ("mrpc", "Sentence 1: a\nSentence 2: b\nAnswer: maybe", "", -1),
    # cola_eval.py:56-64 (the prompt ends with "Answer: ")
    ("cola", "Sentence: a\nAnswer: YES", "", 1),
    ("cola", "Sentence: a\nAnswer: I know", "", 0),
    ("cola", "Sentence: a\nAnswer: 42", "", -1),
    # rte_eval.py:54-62: after the last lowercase "answer:", "false" (0) checked before "true" (1)
    ("rte", "p\nquestion: h True or False?\nanswer: True", "", 1),
    ("rte", "p\nquestion: h True or False?\nanswer: true or false", "", 0),
    ("rte", "p\nquestion: h\nanswer: unsure", "", -1),
    # nli_eval.py:48-55: after the last "True or False? Answer:", "true" (1) before "false" (0)
    ("nli", "a entails the b True or False? Answer: False", "", 0),
    ("nli", "a entails the b True or False? Answer: untrue", "", 1),  # "true" in "untrue"
    ("nli", "a entails the b True or False? Answer: TRUE/FALSE", "", 1),
    ("nli", "a entails the b True or False? Answer: yes", "", -1),
    # mmlu_eval.py:73-82, 131: the decoded prompt removed, then "a\n", "b\n", "c\n", "d\n" in this order
    ("mmlu", "Question: q\n(A) idea\n(B) x\n(C) y\n(D) z\nAnswer: C\n", "Question: q\n(A) idea\n(B) x\n(C) y\n(D) z\nAnswer:", 2),
    ("mmlu", "Question: q\n(A) idea\n(B) x\n(C) y\n(D) z\nAnswer: C\n", "", 0),  # prompt kept: "idea\n" reads as "a\n"
    ("mmlu", "Answer: b\nA\n", "Answer:", 0),
    ("mmlu", "Answer: D", "Answer:", -1),  # no newline after the letter
    ("mmlu", "Answer: data\n", "Answer:", 0),
])
def test_paper_answer_parses_as_published(name, text, prompt, want):
    assert ds.paper_answer(name, text, prompt) == want


def test_paper_rte_marker_case_sensitivity_falls_back_to_whole_text():
    # with no lowercase "answer:" the split keeps the whole text: "false" in "True or False?" wins
    assert ds.paper_answer("rte", "p\nquestion: h True or False?\nAnswer: True") == 0


PAPER_SHOT_AND_ITEM = {
    "sst2": ({"sentence": "a gorgeous film ", "label": 1}, {"sentence": "dull and slow ", "label": 0},
             "Review : a gorgeous film \nSentiment : positive\n" "Review :dull and slow \nSentiment :", 0),
    "mrpc": ({"sentence1": "He left.", "sentence2": "He went away.", "label": 1},
             {"sentence1": "A cat.", "sentence2": "A dog.", "label": 0},
             "Are the sentences paraphrases of each other.\nSentence 1: He left.\nSentence 2: He went away.\nAnswer: Yes\n"
             "Are the sentences paraphrases of each other.\nSentence 1: A cat.\nSentence 2: A dog.\nAnswer:", 0),
    "cola": ({"sentence": "Him went.", "label": 0}, {"sentence": "She sings.", "label": 1},
             "Is this sentence linguistically acceptable?\nSentence: Him went.\nAnswer: No\n"
             "Is this sentence linguistically acceptable?\nSentence: She sings.\nAnswer: ", 1),
    # the published RTE quirk: label 0 (entailment) is written "False"
    "rte": ({"sentence1": "Paris is in France.", "sentence2": "Paris is in Europe.", "label": 0},
            {"sentence1": "It rains.", "sentence2": "It is dry.", "label": 1},
            "Paris is in France.\nquestion: Paris is in Europe. True or False?\nanswer: False\n"
            "It rains.\nquestion: It is dry. True or False?\nanswer:", 1),
    "nli": ({"sentence1": "A man sleeps.", "sentence2": "A person rests.", "label": "entailment"},
            {"sentence1": "It rains.", "sentence2": "It is dry.", "label": "not_entailment"},
            "A man sleeps. entails the A person rests. True or False? Answer: True\n"
            "It rains. entails the It is dry. True or False? Answer:", 0),
    "mmlu": ({"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer": 1},
             {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo", "Bern"], "answer": 3},
             "Question: 2 + 2 =\n(A) 3\n(B) 4\n(C) 5\n(D) 6\nAnswer: B\n"
             "Question: Capital of France?\n(A) Rome\n(B) Paris\n(C) Oslo\n(D) Bern\nAnswer:", 3),
}


@pytest.mark.parametrize("name", list(PAPER_SHOT_AND_ITEM))
def test_paper_prompt_is_the_published_string(name):
    shot, item, want, gold = PAPER_SHOT_AND_ITEM[name]
    records = [shot] * 10 + [item]  # shots from records[:10], items from records[10:]
    [got] = ds.paper_prompts(records, name, k_shot=1, n_items=1)
    assert got.prompt == want and got.gold == gold


def test_paper_items_start_at_record_10_and_shots_are_concatenated():
    records = [{"sentence": f"s{i}", "label": i % 2} for i in range(14)]
    items = ds.paper_prompts(records, "sst2", k_shot=2, n_items=3)
    shots = "Review : s0\nSentiment : negative\nReview : s1\nSentiment : positive\n"
    assert [it.prompt for it in items] == [shots + f"Review :s{i}\nSentiment :" for i in (10, 11, 12)]
    assert [it.gold for it in items] == [0, 1, 0]
    assert [it.prompt for it in ds.paper_prompts(records, "sst2", 0, 4)][-1] == "Review :s13\nSentiment :"
    with pytest.raises(ValueError, match="0 to 10 shots, got 11"):
        ds.paper_prompts(records, "sst2", k_shot=11, n_items=1)
    with pytest.raises(ValueError, match=r"records\[10:\], at most 4 items here, got n_items=5"):
        ds.paper_prompts(records, "sst2", k_shot=2, n_items=5)
    with pytest.raises(ValueError, match="at most 4 items here, got n_items=100"):  # None: the published 100
        ds.paper_prompts(records, "sst2")


def test_paper_drops_shots_that_do_not_fit_the_context_as_published(tok):
    records = [{"sentence": f"sentence number {i} " * (i + 1), "label": i % 2} for i in range(11)]
    paper = ds.PAPER_TASKS["sst2"]
    shots = [paper.shot(r) for r in records[:3]]
    question = paper.question(records[10])
    need = len(tok(question).input_ids) + 3  # + generated tokens
    lengths = [len(tok(s).input_ids) for s in shots]  # each counted on its own, as published
    # exactly room for two shots: remaining reaches 0, which is kept (the loop breaks below 0)
    [item] = ds.paper_prompts(records, "sst2", 3, 1, tok, need + lengths[0] + lengths[1], 3)
    assert item.prompt == shots[0] + shots[1] + question
    [item] = ds.paper_prompts(records, "sst2", 3, 1, tok, need + lengths[0] + lengths[1] - 1, 3)
    assert item.prompt == shots[0] + question
    [item] = ds.paper_prompts(records, "sst2", 3, 1, tok, None, 3)  # unknown context: no limit
    assert item.prompt == "".join(shots) + question
    # the published table first, then the config
    assert ds.paper_context_length(SimpleNamespace(config=SimpleNamespace(_name_or_path="openai/GPT2-XL"))) == 1024
    cfg = SimpleNamespace(_name_or_path="local/smollm2", max_position_embeddings=8192)
    assert ds.paper_context_length(SimpleNamespace(config=cfg)) == 8192


def test_paper_prompts_on_shared_files():
    folder = glue_dir()
    rte = ds.load_task("rte", folder)
    items = ds.paper_prompts(rte, "rte")  # the published 4 shots, 100 items
    assert len(items) == 100 and [it.gold for it in items] == [r["label"] for r in rte[10:110]]
    # record 1 is entailment (GLUE label 0): the published shot says "False"
    assert rte[1]["label"] == 0 and "Theravada" in rte[1]["sentence2"]
    assert f"{rte[1]['sentence2']} True or False?\nanswer: False\n" in items[0].prompt
    assert items[0].prompt.endswith(f"{rte[10]['sentence1']}\nquestion: {rte[10]['sentence2']} True or False?\nanswer:")
    nli = ds.load_task("nli", folder)
    assert [it.gold for it in ds.paper_prompts(nli, "nli", 4, 50)] == [int(r["label"] == "entailment") for r in nli[10:60]]


@pytest.fixture(scope="module")
def chatty(tok):
    """A tiny random Llama whose greedy continuations depend on the prompt (large initial weights),
    often spell "Yes"/"No" (boosted output rows) and sometimes end early (EOS = token 0, boosted)."""
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.5, max_position_embeddings=2048, eos_token_id=0,
        bos_token_id=None, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    favoured = [tok(t, add_special_tokens=False).input_ids[-1] for t in ("Y", "es", "N", "o", "n")]
    with torch.no_grad():
        model.get_output_embeddings().weight[favoured] *= 6
        model.get_output_embeddings().weight[0] *= 3
    return model


def generate_alone(model, tok, prompt: str, new_tokens: int) -> list[int]:
    """The published call: one unpadded prompt, no attention mask, max_length = prompt + new tokens."""
    ids = torch.tensor([tok(prompt).input_ids], device="cpu")
    out = model.generate(ids, max_length=ids.shape[1] + new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_batched_greedy_generation_equals_one_prompt_at_a_time(chatty, tok):
    prompts = [
        "The capital of France is", "Review : a fine film\nSentiment :", "Q: 2 + 2?\nAnswer:", "Danielle Darrieux speaks",
        "Is this sentence linguistically acceptable?\nSentence: Him went.\nAnswer: ", "A",
        "It rains.\nquestion: It is dry. True or False?\nanswer:", "The Eiffel Tower is located in the city of",
        "Are the sentences paraphrases of each other.\nSentence 1: a cat sat.\nSentence 2: the dog ran.\nAnswer:",
    ]
    want = [generate_alone(chatty, tok, p, 4) for p in prompts]
    assert len({tuple(w) for w in want}) >= 6  # the continuations depend on the prompt
    assert any(len(w) < 4 and w[-1] == 0 for w in want) and any(len(w) == 4 for w in want)  # some end with EOS
    for batch_size in (1, 3, 4):  # batches of unequal lengths, left-padded
        assert greedy_continuations(chatty, tok, prompts, 4, batch_size) == want


def test_paper_score_task_equals_hand_run_generation(chatty, tok):
    records = ds.load_task("mrpc", glue_dir())
    result = ds.score_task(chatty, tok, "mrpc", records, k_shot=3, n_items=16, batch_size=6, protocol="paper")
    items = ds.paper_prompts(records, "mrpc", 3, 16)  # 2048 tokens of context: no shot is dropped
    hand = []
    for it in items:
        ids = tok(it.prompt).input_ids
        text = tok.decode(ids + generate_alone(chatty, tok, it.prompt, 3), skip_special_tokens=True)
        hand.append(ds.paper_answer("mrpc", text, tok.decode(ids, skip_special_tokens=True)))
    assert {0, 1, -1} <= set(hand)  # valid answers of both labels and invalid ones
    gold = [it.gold for it in items]
    assert result == {
        "f1": pytest.approx(100 * ds.weighted_f1(gold, hand)),
        "accuracy": pytest.approx(100 * sum(g == p for g, p in zip(gold, hand)) / 16),
        "n": 16, "protocol": "paper", "invalid": hand.count(-1),
    }
    assert ds.paper_predictions(chatty, tok, "mrpc", [it.prompt for it in items], 3, 5) == hand
    with pytest.raises(ValueError, match="unknown downstream protocol 'generate'"):
        ds.score_task(chatty, tok, "mrpc", records, protocol="generate")


def test_evaluate_downstream_paper_protocol(chatty, tok, tmp_path):
    rows = [{"sentence": f"sentence {i} is here", "label": i % 2, "idx": i} for i in range(13)]
    (tmp_path / "cola.json").write_text(json.dumps(rows))
    out = ds.evaluate_downstream(chatty, tok, ["cola"], tmp_path, k_shot=2, n_items=3, protocol="paper")
    assert out["cola"]["n"] == 3 and out["cola"]["protocol"] == "paper" and 0 <= out["cola"]["invalid"] <= 3
    assert ds.evaluate_downstream(chatty, tok, ["cola"], tmp_path, 2, 3)["cola"]["protocol"] == "logprob"


class TwoProcesses:
    """Stands in for a 2-process gloo group: `encore_pl.distributed.Ranks` objects of rank 0 and 1
    (their own `share` and `gather`), with `dist.all_gather` handing out every process's last
    contribution (a process that has not contributed yet gives -7s)."""

    def __init__(self, monkeypatch):
        self.board: dict[int, torch.Tensor] = {}
        self.current = 0
        monkeypatch.setattr(torch.distributed, "all_gather", self.all_gather)

    def all_gather(self, outputs, tensor):
        self.board[self.current] = tensor.clone()
        for rank, out in enumerate(outputs):
            out.copy_(self.board.get(rank, torch.full_like(tensor, -7)))

    def ranks(self, rank: int) -> Ranks:
        self.current = rank
        ranks = Ranks()
        ranks.rank, ranks.world, ranks.device = rank, 2, torch.device("cpu")
        return ranks


@pytest.mark.parametrize("protocol", ["paper", "logprob"])
def test_two_processes_score_like_one(chatty, tok, monkeypatch, protocol):
    records = ds.load_task("mrpc", glue_dir())
    one = ds.score_task(chatty, tok, "mrpc", records, 3, 15, batch_size=4, protocol=protocol)
    answered = []  # how many items each process answers: only its share
    paper_predictions, choose_answers = ds.paper_predictions, ds.choose_answers

    def paper_share(model, tok, name, prompts, *args):
        answered.append(len(prompts))
        return paper_predictions(model, tok, name, prompts, *args)

    def logprob_share(model, tok, examples, *args):
        answered.append(len(examples))
        return choose_answers(model, tok, examples, *args)

    monkeypatch.setattr(ds, "paper_predictions", paper_share)
    monkeypatch.setattr(ds, "choose_answers", logprob_share)
    group = TwoProcesses(monkeypatch)
    ds.score_task(chatty, tok, "mrpc", records, 3, 15, 4, group.ranks(1), protocol)  # process 1 contributes first
    two = [ds.score_task(chatty, tok, "mrpc", records, 3, 15, 4, group.ranks(rank), protocol) for rank in (0, 1)]
    assert two[0] == two[1] == one
    assert answered == [7, 8, 7]  # 15 items: process 0 answers 8, process 1 answers 7
    if protocol == "paper":
        assert 0 < one["invalid"] < 15 and one["f1"] > 0  # not a trivial all-invalid result


def test_downstream_callback_protocol(chatty, tok, tmp_path):
    with pytest.raises(ValueError, match="protocol must be one of 'logprob', 'paper', got 'generate'"):
        DownstreamEvaluation(protocol="generate")
    callback = DownstreamEvaluation(tasks=["cola"], k_shot=2, n_items=3, protocol="paper")
    callback.records = {"cola": [{"sentence": f"sentence {i} is here", "label": i % 2, "idx": i} for i in range(13)]}
    module = SimpleNamespace(model=chatty, tokenizer=tok, edited=[], ranks=Ranks(), downstream_history=[])
    trainer = SimpleNamespace(logger=None, is_global_zero=True)
    callback.evaluate(trainer, module)
    [point] = module.downstream_history
    want = ds.score_task(chatty, tok, "cola", callback.records["cola"], 2, 3, protocol="paper")["f1"]
    assert point == {"num_edits": 0, "cola": want, "protocol": "paper"}
    # a resumed run keeps its protocol (points without one were logprob)
    module.downstream_history = [{"num_edits": 0, "cola": 50.0}]
    with pytest.raises(ValueError, match="protocol 'paper', but the run's downstream_history was scored with 'logprob'"):
        callback.on_train_start(trainer, module)
