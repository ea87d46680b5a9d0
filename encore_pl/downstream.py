"""Downstream abilities of a (possibly edited) model: few-shot GLUE-style tasks, MMLU and perplexity.

Two scoring protocols, chosen with `protocol=` in `score_task` / `evaluate_downstream` (and in
`callbacks.DownstreamEvaluation`):

"logprob" (the default), without generation: each item has a prompt and a short list of candidate
answers (" positive", " Yes", " B", ...); the model's answer is the candidate whose tokens get the
highest summed log-probability after the prompt (teacher forcing). `k_shot` solved records come
first in every prompt (separated by blank lines), then the item; the items are records[k_shot :
k_shot + n_items]. Reliable on small models, which often generate no label word at all.

    sst2  "Review: ...\\nSentiment:"                       [" negative", " positive"]  F1 of positive (1)
    mrpc  "Sentence 1/2: ...\\nDo both sentences mean ..."  [" No", " Yes"]            F1 of equivalent (1)
    cola  "Sentence: ...\\nIs this sentence grammatically"  [" No", " Yes"]            F1 of acceptable (1)
    rte   "Premise: ...\\nHypothesis: ...\\nDoes the ..."   [" Yes", " No"]            F1 of entailment
    nli   same prompt as rte                                [" Yes", " No"]            F1 of entailment
    mmlu  question, "A. .. D. ..", "Answer:"                [" A", " B", " C", " D"]   macro-F1

"paper": the published ENCORE `glue_eval` evaluation (github.com/scalable-model-editing/encore,
commit b87d96d, files glue_eval/*.py; cited below as file:line), reproduced as it is:

  * prompts: the published templates, field values as stored (not stripped); each few-shot
    demonstration ends with "\\n" and they are concatenated before the item (`PAPER_TASKS`). As
    published, shots that would not fit the model's context (with the item and the generated
    tokens) are dropped from the end (sst_eval.py:30-41 and the same in every task);
  * items: records[10 : 10 + n_items] whatever the number of shots, shots records[:k_shot] with
    k_shot <= 10 (useful_functions.py:22-34); by default (None) 4 shots and 100 items, the
    published experiments' settings (experiments/evaluate_unified_editing.py:594-604, README);
  * answers: greedy generation of 3 new tokens for every task (glue_eval.py:49 passes its
    gen_len=3 to each task, overriding the per-class defaults of 10 in cola_eval.py:66 and
    mmlu_eval.py:84; AlphaEdit's copy of glue_eval.py uses 5: `max_new_tokens=5` reproduces it);
    the prompt and the new tokens are decoded together (special tokens skipped) and parsed as
    published (`paper_answer`): the text after the last answer marker, lowercased, checked with
    `in` in the published order; MMLU looks for "a\\n" .. "d\\n" in the text without the prompt.
    An answer that names no label is -1 (invalid) and counts as wrong;
  * F1: scikit-learn's `f1_score(gold, pred, average="weighted")` (e.g. sst_eval.py:176), the
    published headline `f1`: per-class F1 over every class among gold labels and predictions
    (the invalid -1 included), weighted by gold support (`weighted_f1`, computed here by hand).

  A published quirk kept on purpose (this protocol is meant to reproduce the published numbers):
  RTE's demonstrations write GLUE label 0 (entailment) as "False" and 1 (not_entailment) as "True"
  (rte_eval.py:28), and the parsed "false" / "true" map back to 0 / 1 (rte_eval.py:57-60), so the
  model is taught, and scored on, an inverted True/False convention. NLI is not inverted: gold is
  1 for "entailment" and "True" parses to 1 (nli_eval.py:32, 51-60). Greedy parsing makes the
  "paper" numbers noisy on small models; use it to compare with published tables, "logprob" for
  small models and trends.

RTE stores labels as GLUE does (0 = entailment, 1 = not_entailment), NLI as the strings
"entailment" / "not_entailment"; for the "logprob" F1 of both, "entailment" (the answer " Yes") is
the positive class.

The data are JSON lists of records, one file per task (`<data_dir>/<task>.json`), by default
`../shared/data/encore-eval/glue_eval/` next to the repository (or under `$ENCORE_PL_SHARED_DATA`);
they are the published `glue_eval/dataset/<task>.pkl` lists, record for record.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import DynamicCache

from .ranks import Ranks
from .evaluation import greedy_continuations
from .forward import pad_right
from .prompts import common_prefix, encode_target

SHOT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Example:
    """One task item: the prompt (no answer), the candidate answers, and the correct one's index."""

    prompt: str
    candidates: tuple[str, ...]
    answer: int

    def solved(self) -> str:
        """The prompt followed by its correct answer, as used for a few-shot demonstration."""
        return self.prompt + self.candidates[self.answer]


@dataclass(frozen=True)
class Task:
    """A downstream task: how a record becomes an `Example`, and which F1 to report."""

    name: str
    convert: Callable[[dict], Example]
    positive: int | None  # candidate index of the positive class (binary F1); None: macro-F1
    num_candidates: int


# ---------------------------------------------------------------------------------------------
# Record conversion. Each converter raises ValueError with a plain reason on a malformed record.


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {_short(value)}")
    return value.strip()  # SST-2 sentences end with a stray space


def _int_label(record: dict, key: str, n: int) -> int:
    if key not in record:
        raise ValueError(f"missing field {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise ValueError(f"field {key!r} must be an integer in 0..{n - 1}, got {_short(value)}")
    return value


def _short(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _sst2(r: dict) -> Example:
    prompt = f"Review: {_text(r, 'sentence')}\nSentiment:"
    return Example(prompt, (" negative", " positive"), _int_label(r, "label", 2))


def _mrpc(r: dict) -> Example:
    prompt = (
        f"Sentence 1: {_text(r, 'sentence1')}\nSentence 2: {_text(r, 'sentence2')}\n"
        "Do both sentences mean the same thing? Answer:"
    )
    return Example(prompt, (" No", " Yes"), _int_label(r, "label", 2))


def _cola(r: dict) -> Example:
    prompt = f"Sentence: {_text(r, 'sentence')}\nIs this sentence grammatically acceptable? Answer:"
    return Example(prompt, (" No", " Yes"), _int_label(r, "label", 2))


def _entailment_prompt(r: dict) -> str:
    return (
        f"Premise: {_text(r, 'sentence1')}\nHypothesis: {_text(r, 'sentence2')}\n"
        "Does the premise entail the hypothesis? Answer:"
    )


def _rte(r: dict) -> Example:
    # GLUE RTE: 0 = entailment -> " Yes" (index 0), 1 = not_entailment -> " No" (index 1)
    return Example(_entailment_prompt(r), (" Yes", " No"), _int_label(r, "label", 2))


NLI_LABELS = {"entailment": 0, "not_entailment": 1}


def _nli(r: dict) -> Example:
    prompt = _entailment_prompt(r)
    if "label" not in r:
        raise ValueError("missing field 'label'")
    label = r["label"]
    if not isinstance(label, str) or label not in NLI_LABELS:
        raise ValueError(f"field 'label' must be one of {sorted(NLI_LABELS)}, got {_short(label)}")
    return Example(prompt, (" Yes", " No"), NLI_LABELS[label])


MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu(r: dict) -> Example:
    question = _text(r, "question")
    choices = r.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"field 'choices' must be a list of 4 strings, got {_short(choices)}")
    lines = [f"{letter}. {choice.strip()}" for letter, choice in zip(MMLU_LETTERS, choices)]
    prompt = question + "\n" + "\n".join(lines) + "\nAnswer:"
    return Example(prompt, tuple(" " + letter for letter in MMLU_LETTERS), _int_label(r, "answer", 4))


TASKS: dict[str, Task] = {
    "sst2": Task("sst2", _sst2, positive=1, num_candidates=2),
    "mrpc": Task("mrpc", _mrpc, positive=1, num_candidates=2),
    "cola": Task("cola", _cola, positive=1, num_candidates=2),
    "rte": Task("rte", _rte, positive=0, num_candidates=2),  # entailment = " Yes"
    "nli": Task("nli", _nli, positive=0, num_candidates=2),  # entailment = " Yes"
    "mmlu": Task("mmlu", _mmlu, positive=None, num_candidates=4),
}


def get_task(task: str | Task) -> Task:
    """The registered task of that name (a `Task` is returned unchanged)."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


def convert_record(task: str | Task, record: dict) -> Example:
    """Turn one record into an `Example` (ValueError with the reason if the record is malformed)."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    return get_task(task).convert(record)


# ---------------------------------------------------------------------------------------------
# Loading


def default_data_dir() -> Path:
    """`$ENCORE_PL_SHARED_DATA/encore-eval/glue_eval`, by default `../shared/data/...` next to the repo."""
    repo = Path(__file__).resolve().parents[1]
    shared = os.environ.get("ENCORE_PL_SHARED_DATA") or repo.parent / "shared" / "data"
    return Path(shared) / "encore-eval" / "glue_eval"


def _validate(task: Task, records: list, source: str) -> list[dict]:
    for i, record in enumerate(records):
        try:
            convert_record(task, record)
        except ValueError as err:
            raise ValueError(f"{source}: record {i}: {err}") from None
    return records


def load_task(name: str, data_dir: str | Path | None = None, dataset: str | None = None) -> list[dict]:
    """Records of a task, in file order, each checked to convert into an `Example`.

    From `<data_dir>/<name>.json` (a JSON list of objects), or, when `dataset` is given, from the
    `datasets` library: `dataset` is "path[:config]:split", e.g. "nyu-mll/glue:sst2:validation"
    (the records must have this module's field names).
    """
    task = get_task(name)
    if dataset is not None:
        import datasets

        parts = dataset.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"dataset must be 'path[:config]:split', got {dataset!r}")
        path, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        records = [dict(r) for r in datasets.load_dataset(path, config, split=split)]
        return _validate(task, records, dataset)

    path = Path(data_dir) if data_dir is not None else default_data_dir()
    path = path / f"{task.name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no data for task {task.name!r}: {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return _validate(task, records, str(path))


def few_shot_prompts(
    records: Sequence[dict], task: str | Task, k_shot: int, n_items: int | None
) -> list[Example]:
    """The items to score: records[k_shot : k_shot + n_items], each prompt preceded by the shots.

    The shots are records[:k_shot], each written with its correct answer; shots and the item are
    separated by blank lines. `n_items=None` scores every remaining record.
    """
    task = get_task(task)
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    if n_items is None:
        n_items = len(records) - k_shot
    if n_items < 1 or k_shot + n_items > len(records):
        raise ValueError(
            f"task {task.name!r}: {k_shot} shots + {n_items} items need {k_shot + n_items} records, "
            f"there are {len(records)}"
        )

    def example(i: int) -> Example:
        try:
            return convert_record(task, records[i])
        except ValueError as err:
            raise ValueError(f"task {task.name!r}: record {i}: {err}") from None

    context = "".join(example(i).solved() + SHOT_SEPARATOR for i in range(k_shot))
    items = []
    for i in range(k_shot, k_shot + n_items):
        ex = example(i)
        items.append(Example(context + ex.prompt, ex.candidates, ex.answer))
    return items


# ---------------------------------------------------------------------------------------------
# Metrics


def _f1(gold: Sequence[int], pred: Sequence[int], label: int) -> float:
    """F1 of one class: 2 TP / (2 TP + FP + FN), 0 if the class is neither gold nor predicted."""
    tp = sum(g == label and p == label for g, p in zip(gold, pred))
    fp = sum(g != label and p == label for g, p in zip(gold, pred))
    fn = sum(g == label and p != label for g, p in zip(gold, pred))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def binary_f1(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    """F1 (in [0, 1]) of the positive class; 0 when it is never predicted (or never correct)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return _f1(gold, pred, positive)


def macro_f1(gold: Sequence[int], pred: Sequence[int], labels: Sequence[int] | None = None) -> float:
    """Mean per-class F1 (in [0, 1]) over the classes that occur among the gold labels or predictions.

    A gold class that is never predicted counts with F1 = 0. Classes of `labels` that occur in
    neither list are left out (their F1 is undefined), as scikit-learn's default does.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    present = set(gold) | set(pred)
    classes = [c for c in (labels if labels is not None else sorted(present)) if c in present]
    return sum(_f1(gold, pred, c) for c in classes) / len(classes) if classes else 0.0


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    """Fraction (in [0, 1]) of predictions equal to the gold label."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


# ---------------------------------------------------------------------------------------------
# Scoring


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring; the model's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def candidate_logprobs(model, tok, examples: Sequence[Example], batch_size: int = 8) -> list[list[float]]:
    """For each example, the summed log-probability of each candidate's tokens after its prompt.

    A candidate's tokens are those that follow the prompt's tokens in `prompt + candidate` (the
    prompt's tokenisation is kept). The model reads `prompt + candidate[:-1]`; sequences shared by
    several candidates (all single-token candidates of an item) are run once. Sequences are sorted
    by length and batched with right padding and an attention mask.
    """
    if not examples:  # e.g. a process's empty share when there are more processes than items
        return []
    # the fed sequences, deduplicated; each candidate: (sequence index, first position, token ids)
    sequences: list[list[int]] = []
    seq_index: dict[tuple[int, ...], int] = {}
    plans: list[list[tuple[int, int, list[int]]]] = []
    for ex in examples:
        prompt_ids = tok(ex.prompt).input_ids
        plan = []
        for cand in ex.candidates:
            cand_ids = encode_target(tok, ex.prompt, cand)
            if not cand_ids:
                raise ValueError(f"candidate {cand!r} has no tokens")
            fed = tuple(prompt_ids + cand_ids[:-1])
            if fed not in seq_index:
                seq_index[fed] = len(sequences)
                sequences.append(list(fed))
            plan.append((seq_index[fed], len(prompt_ids) - 1, cand_ids))
        plans.append(plan)

    # (position, token) pairs each sequence must score; the logits at position p predict token p + 1.
    # Single-token candidates of an item share a position, with different tokens.
    wanted: list[set[tuple[int, int]]] = [set() for _ in sequences]
    for plan in plans:
        for s, start, cand_ids in plan:
            wanted[s].update((start + j, token) for j, token in enumerate(cand_ids))

    device = _device(model)
    keep_supported = _accepts_logits_to_keep(model)
    logprob: list[dict[tuple[int, int], float]] = [{} for _ in sequences]
    # The k-shot context is the same for every item: run the common token prefix once and reuse
    # its key/value cache (it ends before the first scored position, so every score is recomputed).
    shared = len(common_prefix(sequences))
    shared = min([shared] + [pos for w in wanted for pos, _ in w])
    prefix_kv = None
    with _eval_mode(model):
        if shared > 0:
            out = model(input_ids=torch.tensor([sequences[0][:shared]], device=device), use_cache=True)
            prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            ids, mask = pad_right([sequences[i][shared:] for i in batch], tok.pad_token_id, device)
            rows, positions, tokens = [], [], []
            for row, i in enumerate(batch):
                for pos, token in sorted(wanted[i]):
                    rows.append(row), positions.append(pos - shared), tokens.append(token)
            inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": prefix_kv is not None}
            if prefix_kv is not None:
                n = len(batch)
                inputs["past_key_values"] = DynamicCache(
                    ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv],
                    config=model.config,
                )
                inputs["attention_mask"] = torch.cat([torch.ones(n, shared, dtype=mask.dtype, device=device), mask], 1)
                inputs["position_ids"] = shared + torch.arange(ids.shape[1], device=device).expand(n, -1)
            if keep_supported:
                # only the logits at the scored positions (saves batch x length x vocab memory)
                keep = sorted(set(positions))
                column = {pos: c for c, pos in enumerate(keep)}
                logits = model(**inputs, logits_to_keep=torch.tensor(keep, device=device)).logits
                cols = [column[p] for p in positions]
            else:
                logits = model(**inputs).logits
                cols = positions
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
            token_lp = picked.log_softmax(-1).gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
            for row, pos, token, value in zip(rows, positions, tokens, token_lp.tolist()):
                logprob[batch[row]][pos + shared, token] = value

    return [
        [sum(logprob[s][start + j, token] for j, token in enumerate(cand_ids)) for s, start, cand_ids in plan]
        for plan in plans
    ]


def choose_answers(model, tok, examples: Sequence[Example], batch_size: int = 8) -> list[int]:
    """Each example's chosen candidate: the highest summed log-probability (ties: the first)."""
    scores = candidate_logprobs(model, tok, examples, batch_size)
    return [max(range(len(s)), key=lambda c: (s[c], -c)) for s in scores]


# ---------------------------------------------------------------------------------------------
# The published protocol ("paper"): ENCORE's glue_eval, commit b87d96d


PAPER_TEST_START = 10  # items are records[10:], shots come from records[:10] (useful_functions.py:22, 33)
PAPER_K_SHOT = 4  # --number_of_few_shots default "4,4,4,4,4,4" (experiments/evaluate_unified_editing.py:596)
PAPER_N_ITEMS = 100  # --number_of_tests default 100 (experiments/evaluate_unified_editing.py:602)
PAPER_MAX_NEW_TOKENS = 3  # GLUEEval.evaluate(gen_len=3), passed to every task (glue_eval.py:49-93)
# The context length the published code assumes for its models (useful_functions.py:36-43); any
# other model: its config's max_position_embeddings / n_positions (the published code would fail).
# As published, the lookup lowercases the name, so the gpt-j key never matches (its config gives 2048).
PAPER_CONTEXT_LENGTH = {
    "gpt2-xl": 1024, "llama-2-7b-hf": 4096, "EleutherAI/gpt-j-6B": 2048, "gpt2-large": 1024,
    "gpt2-medium": 1024, "meta-llama-3-8b": 4096,
}
INVALID = -1  # an answer that names no label


@dataclass(frozen=True)
class PaperTask:
    """A task as the published code writes and parses it (raw field values, nothing stripped)."""

    name: str
    shot: Callable[[dict], str]  # one solved demonstration, ending with "\n"
    question: Callable[[dict], str]  # the item, ending where the answer is generated
    gold: Callable[[dict], int]
    parse: Callable[[str, str], int]  # (decoded prompt + generation, decoded prompt) -> label or INVALID


def _first_match(text: str, words: Sequence[tuple[str, int]]) -> int:
    """The label of the first word (in this order) that occurs in `text` lowercased, else INVALID."""
    lowered = text.lower()
    for word, label in words:
        if word in lowered:
            return label
    return INVALID


def _after(marker: str, words: Sequence[tuple[str, int]]) -> Callable[[str, str], int]:
    """The published `_get_answer`: the text after the last `marker`, stripped, then `in` checks."""
    return lambda text, prompt: _first_match(text.split(marker)[-1].strip(), words)


def _mmlu_choices(r: dict) -> str:
    return "".join(f"({letter}) {choice}\n" for letter, choice in zip(MMLU_LETTERS, r["choices"]))


def _mmlu_answer(text: str, prompt: str) -> int:
    # mmlu_eval.py:73-82, 131: the generation is the decoded output with the decoded prompt removed
    return _first_match(text.replace(prompt, ""), [("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3)])


_MRPC_HEAD = "Are the sentences paraphrases of each other.\n"
_COLA_HEAD = "Is this sentence linguistically acceptable?\n"

PAPER_TASKS: dict[str, PaperTask] = {
    # sst_eval.py:24-28 (shots), 31 (item: no space after "Review :"), 46-53 (parse)
    "sst2": PaperTask(
        "sst2",
        lambda r: f"Review : {r['sentence']}\nSentiment : {'positive' if r['label'] == 1 else 'negative'}\n",
        lambda r: "Review :" + r["sentence"] + "\nSentiment :",
        lambda r: r["label"],
        _after("Sentiment :", [("positive", 1), ("negative", 0)]),
    ),
    # mrpc_eval.py:23-27, 38-40, 54-62
    "mrpc": PaperTask(
        "mrpc",
        lambda r: f"{_MRPC_HEAD}Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
        f"Answer: {'No' if r['label'] == 0 else 'Yes'}\n",
        lambda r: _MRPC_HEAD + "Sentence 1: " + r["sentence1"] + "\n" + "Sentence 2: " + r["sentence2"] + "\n" + "Answer:",
        lambda r: r["label"],
        _after("Answer:", [("yes", 1), ("no", 0)]),
    ),
    # cola_eval.py:24-29, 40-41 (the item ends with "Answer: ", a space included), 56-64
    "cola": PaperTask(
        "cola",
        lambda r: f"{_COLA_HEAD}Sentence: {r['sentence']}\nAnswer: {'No' if r['label'] == 0 else 'Yes'}\n",
        lambda r: _COLA_HEAD + "Sentence: " + r["sentence"] + "\n" + "Answer: ",
        lambda r: r["label"],
        _after("Answer:", [("yes", 1), ("no", 0)]),
    ),
    # rte_eval.py:24-28, 39-41, 54-62. Published quirk, reproduced on purpose: label 0 (GLUE
    # entailment) is written "False" and "false" parses back to 0 -- an inverted True/False.
    "rte": PaperTask(
        "rte",
        lambda r: f"{r['sentence1']}\nquestion: {r['sentence2']} True or False?\n"
        f"answer: {'False' if r['label'] == 0 else 'True'}\n",
        lambda r: r["sentence1"] + "\n" + "question: " + r["sentence2"] + " True or False?" + "\n" + "answer:",
        lambda r: r["label"],
        _after("answer:", [("false", 0), ("true", 1)]),
    ),
    # nli_eval.py:29-35, 48-60 (gold: 1 = entailment)
    "nli": PaperTask(
        "nli",
        lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer: "
        f"{'True' if r['label'] == 'entailment' else 'False'}\n",
        lambda r: f"{r['sentence1']} entails the {r['sentence2']} True or False? Answer:",
        lambda r: 1 if r["label"] == "entailment" else 0,
        _after("True or False? Answer:", [("true", 1), ("false", 0)]),
    ),
    # mmlu_eval.py:24-32, 45-50, 73-82
    "mmlu": PaperTask(
        "mmlu",
        lambda r: f"Question: {r['question']}\n{_mmlu_choices(r)}Answer: {MMLU_LETTERS[r['answer']]}\n",
        lambda r: "Question: " + r["question"] + "\n" + _mmlu_choices(r) + "Answer:",
        lambda r: r["answer"],
        _mmlu_answer,
    ),
}


def paper_answer(name: str, text: str, prompt: str = "") -> int:
    """The label the published code reads in `text` (the decoded prompt and generation), or -1.

    `prompt` (the decoded prompt) is only used by MMLU, which parses `text` without it.
    """
    return PAPER_TASKS[get_task(name).name].parse(text, prompt)


@dataclass(frozen=True)
class PaperItem:
    prompt: str
    gold: int


def paper_context_length(model) -> int | None:
    """The context length the published code would assume for the model (None: unknown)."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "").lower().split("/")[-1]
    if name in PAPER_CONTEXT_LENGTH:  # the published lookup: model.config._name_or_path's last part
        return PAPER_CONTEXT_LENGTH[name]
    for attr in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


def paper_prompts(
    records: Sequence[dict], task: str | Task, k_shot: int | None = None, n_items: int | None = None,
    tok=None, context_length: int | None = None, max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
) -> list[PaperItem]:
    """The published items: records[10 : 10 + n_items], each after the shots records[:k_shot].

    None: 4 shots, 100 items (the published experiments). With a tokenizer and a context length,
    shots are dropped from the end as published, so that the prompt's and each kept shot's token
    counts (special tokens included, counted separately) plus `max_new_tokens` fit.
    """
    task = get_task(task)
    paper = PAPER_TASKS[task.name]
    k_shot = PAPER_K_SHOT if k_shot is None else k_shot
    n_items = PAPER_N_ITEMS if n_items is None else n_items
    if not 0 <= k_shot <= PAPER_TEST_START:  # useful_functions.py:28
        raise ValueError(f"the paper protocol takes 0 to {PAPER_TEST_START} shots, got {k_shot}")
    available = len(records) - PAPER_TEST_START
    if n_items < 1 or n_items > available:  # useful_functions.py:30
        raise ValueError(
            f"task {task.name!r}: the paper protocol scores records[{PAPER_TEST_START}:], at most {max(available, 0)} "
            f"items here, got n_items={n_items}"
        )
    for i in [*range(k_shot), *range(PAPER_TEST_START, PAPER_TEST_START + n_items)]:
        try:
            convert_record(task, records[i])  # the fields the templates read are there
        except ValueError as err:
            raise ValueError(f"task {task.name!r}: record {i}: {err}") from None
    shots = [paper.shot(records[i]) for i in range(k_shot)]
    limited = tok is not None and context_length is not None
    shot_lengths = [len(tok(s).input_ids) for s in shots] if limited else []
    items = []
    for i in range(PAPER_TEST_START, PAPER_TEST_START + n_items):
        question = paper.question(records[i])
        context = "".join(shots)
        if limited:  # sst_eval.py:32-40
            remaining = context_length - len(tok(question).input_ids) - max_new_tokens
            context = ""
            for shot, length in zip(shots, shot_lengths):
                remaining -= length
                if remaining < 0:
                    break
                context += shot
        items.append(PaperItem(context + question, paper.gold(records[i])))
    return items


def weighted_f1(gold: Sequence[int], pred: Sequence[int]) -> float:
    """scikit-learn's `f1_score(gold, pred, average="weighted")`, in [0, 1].

    Per-class F1 for every class among the gold labels and predictions (an invalid answer, -1, is
    a class of its own), weighted by the class's number of gold labels: a class never in gold (such
    as -1) weighs nothing, but its predictions are misses of their gold classes.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return 0.0
    classes = sorted(set(gold) | set(pred))
    return sum(sum(g == c for g in gold) * _f1(gold, pred, c) for c in classes) / len(gold)


def paper_predictions(
    model, tok, name: str, prompts: Sequence[str], max_new_tokens: int = PAPER_MAX_NEW_TOKENS, batch_size: int = 8
) -> list[int]:
    """The published answer to each prompt: greedy generation, decoded with the prompt, parsed."""
    answers = []
    for prompt, new in zip(prompts, greedy_continuations(model, tok, prompts, max_new_tokens, batch_size)):
        ids = tok(prompt).input_ids
        # sst_eval.py:85, 94: the output (prompt ids + new ids) decoded without special tokens
        text = tok.decode(ids + new, skip_special_tokens=True)
        answers.append(paper_answer(name, text, tok.decode(ids, skip_special_tokens=True)))
    return answers


# ---------------------------------------------------------------------------------------------
# Scoring a task under either protocol

PROTOCOLS = ("logprob", "paper")
Protocol = Literal["logprob", "paper"]


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown downstream protocol {protocol!r}; use one of: {', '.join(PROTOCOLS)}")
    return protocol


def score_task(
    model, tok, name: str, records: Sequence[dict], k_shot: int | None = 4, n_items: int | None = 100,
    batch_size: int = 8, ranks: Optional[Ranks] = None, protocol: Protocol = "logprob",
    max_new_tokens: int | None = None,
) -> dict[str, float | int | str]:
    """Few-shot score of the model on one task: {"f1", "accuracy"} in percent, "n" items, "protocol".

    protocol "logprob": the first `k_shot` records are the shots, the next `n_items` are scored
    (`n_items=None`: all the remaining records); F1 is that of the task's positive class (label 1
    for sst2/mrpc/cola, entailment for rte/nli) or, for mmlu, the macro-F1 over the four choices.

    protocol "paper" (see the module docstring): shots records[:k_shot], items records[10 : 10 +
    n_items] (None: the published 4 shots and 100 items), greedy generation of `max_new_tokens`
    (None: the published 3), F1 = weighted F1 with invalid answers (-1) included; the result also
    has "invalid", the number of answers naming no label.

    With several processes (`ranks`) each answers its share of the items and the answers are
    gathered.
    """
    check_protocol(protocol)
    ranks = ranks or Ranks()
    task = get_task(name)
    if protocol == "paper":
        new_tokens = PAPER_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        if new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {new_tokens}")
        items = paper_prompts(records, task, k_shot, n_items, tok, paper_context_length(model), new_tokens)
        gold = [item.gold for item in items]
        answers = paper_predictions(model, tok, task.name, [it.prompt for it in ranks.share(items)], new_tokens, batch_size)
        mine = torch.tensor(answers, dtype=torch.long, device="cpu")
        pred = ranks.gather(mine, len(items)).tolist()
        return {
            "f1": 100.0 * weighted_f1(gold, pred), "accuracy": 100.0 * accuracy(gold, pred), "n": len(items),
            "protocol": protocol, "invalid": sum(p == INVALID for p in pred),
        }
    if k_shot is None:
        raise ValueError("the logprob protocol needs k_shot (an integer >= 0)")
    examples = few_shot_prompts(records, task, k_shot, n_items)
    gold = [ex.answer for ex in examples]
    mine = torch.tensor(choose_answers(model, tok, ranks.share(examples), batch_size), dtype=torch.long, device="cpu")
    pred = ranks.gather(mine, len(examples)).tolist()
    if task.positive is None:
        f1 = macro_f1(gold, pred, labels=range(task.num_candidates))
    else:
        f1 = binary_f1(gold, pred, positive=task.positive)
    return {"f1": 100.0 * f1, "accuracy": 100.0 * accuracy(gold, pred), "n": len(examples), "protocol": protocol}


def evaluate_downstream(
    model,
    tok,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    k_shot: int | None = 4,
    n_items: int | None = 100,
    batch_size: int = 8,
    protocol: Protocol = "logprob",
    max_new_tokens: int | None = None,
) -> dict[str, dict[str, float | int | str]]:
    """`score_task` on each task, read from `<data_dir>/<task>.json`: {task: {"f1", "accuracy", "n", "protocol", ...}}."""
    check_protocol(protocol)
    return {
        name: score_task(model, tok, name, load_task(name, data_dir), k_shot, n_items, batch_size,
                         protocol=protocol, max_new_tokens=max_new_tokens)
        for name in tasks
    }


# ---------------------------------------------------------------------------------------------
# Perplexity


def _first_tokens(tok, text_file: Path, max_tokens: int, margin: int = 32) -> list[int]:
    """The first `max_tokens` tokens of a text file (no special tokens), reading only a prefix.

    The prefix grows until it tokenises into `max_tokens + margin` tokens, so the token cut by
    the prefix's end lies beyond the kept ones.
    """
    budget = max(4096, 8 * (max_tokens + margin))
    text = ""
    with open(text_file, encoding="utf-8") as f:
        while True:
            chunk = f.read(budget - len(text))
            text += chunk
            at_end = len(text) < budget  # read() returns less than asked only at the end
            ids = tok(text, add_special_tokens=False, verbose=False).input_ids
            if at_end or len(ids) >= max_tokens + margin:
                return ids[:max_tokens]
            budget *= 2


@torch.no_grad()
def perplexity(
    model, tok, text_file: str | Path, max_tokens: int = 20000, seq_len: int = 512, batch_size: int = 4,
    ranks: Optional[Ranks] = None,
) -> float:
    """Perplexity on the first `max_tokens` tokens of a UTF-8 text file.

    The tokens (no special tokens added) are cut into non-overlapping sequences of `seq_len` (the
    last may be shorter); within each sequence every token but the first is predicted. The result
    is exp(mean NLL over all predicted tokens). With several processes (`ranks`) each runs its
    share of the sequences and the sums are added up.
    """
    ranks = ranks or Ranks()
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = _first_tokens(tok, Path(text_file), max_tokens)
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    chunks = [c for c in chunks if len(c) >= 2]  # a lone last token has nothing to predict from
    if not chunks:
        raise ValueError(f"{text_file}: too little text ({len(ids)} tokens) to measure perplexity")

    chunks = ranks.share(chunks)
    device = _device(model)
    total_nll, count = 0.0, 0
    with _eval_mode(model):
        for b in range(0, len(chunks), batch_size):
            batch_ids, mask = pad_right(chunks[b : b + batch_size], tok.pad_token_id, device)
            logits = model(input_ids=batch_ids, attention_mask=mask, use_cache=False).logits
            targets = batch_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # padding is not predicted
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total_nll += nll.item()
            count += int((targets != -100).sum())
    total_nll, count = ranks.sum(torch.tensor([total_nll, float(count)], dtype=torch.float64, device="cpu")).tolist()
    return math.exp(total_nll / count)
