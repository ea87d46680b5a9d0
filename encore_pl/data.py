"""Edit requests: reading, validating and ordering them (batches: datamodule.py).

Three input formats, one request type:
- "rome": CounterFact as published with ROME (`requested_rewrite` with a `{}` template,
  `paraphrase_prompts`, `neighborhood_prompts`, `generation_prompts`);
- "easyedit": the reduced CounterFact format (`prompt` with the subject filled in, `subject`,
  `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt`, `locality_ground_truth`);
- "zsre": zsRE in the MEND format (`src`, `subject`, `answers`, `rephrase`, `loc`, `loc_ans`), edited
  as ROME/MEMIT/ENCORE publish it: towards `answers[0]` (`alt` is not used), the neighbourhood
  prompt is the `loc` question without "nq question:" and with "?", scored on `loc_ans`.
Requests are edited in file order (or a seeded shuffle of it), in sequential batches of
`batch_size`; `unique_subjects` skips a request whose subject is already in the stream, as the
paper's sampled CounterFact/zsRE sets do.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional


Format = Literal["auto", "rome", "easyedit", "zsre"]

QUICKSTART_PATH = Path(__file__).parent / "assets" / "quickstart_facts.json"


@dataclass
class EditRequest:
    case_id: str
    subject: str
    prompt: str  # template with exactly one "{}" where the subject goes
    target_new: str  # with a leading space
    target_true: str  # with a leading space; zsRE: "" (the edit teaches the true answer, there is no old one)
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_target: str = ""  # what neighbourhood prompts should still answer (zsRE: loc_ans)
    generation_prompts: list[str] = field(default_factory=list)
    kind: Literal["counterfact", "zsre"] = "counterfact"

    @property
    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)


class InvalidRecord(ValueError):
    """A record that cannot be edited: says which file, which record and why."""

    def __init__(self, path: str, index: int, case_id, reason: str):
        self.path, self.index, self.case_id, self.reason = path, index, case_id, reason
        super().__init__(f"{path}: record {index} (id {case_id!r}): {reason}")


def _space(text: str) -> str:
    return text if text.startswith(" ") else " " + text


def _need_str(rec: dict, dotted: str) -> str:
    value = rec
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(f"missing field {dotted!r}")
        value = value[key]
    if not isinstance(value, str):
        raise ValueError(f"field {dotted!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {dotted!r} is empty")
    return value


def _str_list(rec: dict, key: str, required: bool = True) -> list[str]:
    if key not in rec:
        if required:
            raise ValueError(f"missing field {key!r}")
        return []
    value = rec[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"field {key!r} must be a list of non-empty strings")
    return value


def _template(prompt: str, subject: str) -> str:
    """Turn a filled prompt into a template by locating the subject (first occurrence)."""
    if "{}" in prompt:
        raise ValueError("prompt already contains '{}'")
    if subject not in prompt:
        raise ValueError(f"subject {subject!r} not found in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def parse_rome(rec: dict) -> EditRequest:
    subject = _need_str(rec, "requested_rewrite.subject")
    prompt = _need_str(rec, "requested_rewrite.prompt")
    if prompt.count("{}") != 1:
        raise ValueError(f"prompt template must contain '{{}}' exactly once: {prompt!r}")
    true = _need_str(rec, "requested_rewrite.target_true.str")
    return EditRequest(
        case_id=str(rec.get("case_id", "")),
        subject=subject.strip(),
        prompt=prompt,
        target_new=_space(_need_str(rec, "requested_rewrite.target_new.str")),
        target_true=_space(true),
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts"),
        neighborhood_prompts=_str_list(rec, "neighborhood_prompts"),
        neighborhood_target=_space(true),
        generation_prompts=_str_list(rec, "generation_prompts", required=False),
    )


def parse_easyedit(rec: dict) -> EditRequest:
    subject = _need_str(rec, "subject").strip()
    locality_truth = _need_str(rec, "locality_ground_truth")
    true = _need_str(rec, "ground_truth")
    if locality_truth.strip() != true.strip():
        # Neighbourhood prompts must share the true object to be scored P(true) > P(new).
        raise ValueError(f"locality_ground_truth {locality_truth!r} differs from ground_truth {true!r}")
    return EditRequest(
        case_id=str(rec.get("case_id", "")),
        subject=subject,
        prompt=_template(_need_str(rec, "prompt"), subject),
        target_new=_space(_need_str(rec, "target_new")),
        target_true=_space(true),
        paraphrase_prompts=[_need_str(rec, "rephrase_prompt")],
        neighborhood_prompts=[_need_str(rec, "locality_prompt")],
        neighborhood_target=_space(locality_truth),
    )


def parse_zsre(rec: dict) -> EditRequest:
    """As ENCORE's `dsets/zsre.py` (and MEMIT's): the edit's target is `answers[0]`, there is no
    old target; the neighbourhood prompt is the `loc` question with "nq question:" stripped and "?"
    appended (MEMIT keeps the "nq question:" prefix), scored on `loc_ans`."""
    subject = _need_str(rec, "subject").strip()
    answers = rec.get("answers")
    if not isinstance(answers, list) or not answers or not isinstance(answers[0], str) or not answers[0].strip():
        raise ValueError("field 'answers' must be a non-empty list of strings")
    question = _need_str(rec, "loc").replace("nq question:", "").strip()
    if not question:
        raise ValueError("field 'loc' holds no question after 'nq question:'")
    return EditRequest(
        case_id=str(rec.get("case_id", rec.get("id", ""))),
        subject=subject,
        prompt=_template(_need_str(rec, "src"), subject),
        target_new=_space(answers[0]),
        target_true="",
        paraphrase_prompts=[_need_str(rec, "rephrase")],
        neighborhood_prompts=[question + "?"],
        neighborhood_target=_space(_need_str(rec, "loc_ans")),
        kind="zsre",
    )


PARSERS = {"rome": parse_rome, "easyedit": parse_easyedit, "zsre": parse_zsre}


def detect_format(rec: dict) -> str:
    if "requested_rewrite" in rec:
        return "rome"
    if "src" in rec and "answers" in rec:
        return "zsre"
    if "prompt" in rec and "target_new" in rec:
        return "easyedit"
    raise ValueError(f"cannot tell the format of a record with keys {sorted(rec)}")


class RepeatedSubject(InvalidRecord):
    """A valid record left out by `unique_subjects`: its subject is already in the stream."""


def load_requests(path: str | Path, format: Format = "auto", **options) -> list[EditRequest]:
    """The validated requests of a JSON/JSONL file; `options` are `read_requests`'s (num_edits,
    on_invalid, order, seed, unique_subjects), which also returns the records it left out."""
    return read_requests(path, format, **options)[0]


def read_requests(
    path: str | Path,
    format: Format = "auto",
    num_edits: Optional[int] = None,
    on_invalid: Literal["error", "skip"] = "error",
    order: Literal["file", "seeded"] = "file",
    seed: int = 0,
    unique_subjects: bool = False,
) -> tuple[list[EditRequest], list[InvalidRecord]]:
    """Read, validate and return the first `num_edits` valid requests of a JSON/JSONL file.

    `order="seeded"` takes the records in a shuffled order fixed by `seed`; `unique_subjects`
    leaves out (as a `RepeatedSubject`, never an error) a record whose subject an earlier request
    of the stream already has. Returns the requests and the records left out (invalid ones only
    with `on_invalid="skip"`), in stream order.
    """
    records = read_records(path)
    if order not in ("file", "seeded"):
        raise ValueError(f"order must be 'file' or 'seeded', got {order!r}")
    indices = list(range(len(records)))
    if order == "seeded":
        random.Random(seed).shuffle(indices)
    requests, skipped, seen, subjects = [], [], {}, {}
    for index in indices:
        rec = records[index]
        case_id = rec.get("case_id", rec.get("id", index)) if isinstance(rec, dict) else index
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
            fmt = detect_format(rec) if format == "auto" else format
            req = PARSERS[fmt](rec)
            if not req.case_id:
                req.case_id = str(index)
            if req.case_id in seen:
                raise ValueError(f"duplicate id (first seen at record {seen[req.case_id]})")
            if req.target_true and req.target_new.strip() == req.target_true.strip():
                raise ValueError(f"target_new equals the true target {req.target_true.strip()!r}")
        except ValueError as e:
            err = InvalidRecord(str(path), index, case_id, str(e))
            if on_invalid == "error":
                raise err from None
            skipped.append(err)
            continue
        if unique_subjects and req.subject in subjects:
            skipped.append(RepeatedSubject(str(path), index, req.case_id,
                                           f"subject {req.subject!r} already edited (record {subjects[req.subject]})"))
            continue
        seen[req.case_id] = index
        subjects.setdefault(req.subject, index)
        requests.append(req)
        if num_edits is not None and len(requests) >= num_edits:
            break
    if num_edits is not None and len(requests) < num_edits:
        raise ValueError(f"{path}: asked for {num_edits} edits but only {len(requests)} valid records")
    return requests, skipped


def read_records(path: str | Path) -> list:
    """Records of a local JSON list / JSON-lines file (through `datasets`), or of a hub dataset."""
    import datasets

    path = Path(path)
    if not path.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
            return [_drop_none(r) for r in datasets.load_dataset(str(path), split="train").to_list()]
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    refuse_top_level_object(path, text)  # datasets would read it as one record
    try:
        ds = datasets.Dataset.from_json(str(path), keep_in_memory=True)
        # datasets unifies record schemas (absent keys become None): drop those again.
        return [_drop_none(r) for r in ds.to_list()]
    except Exception:
        pass  # e.g. records whose types disagree: read them plainly and validate one by one
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records (a JSON list, or JSON lines), got {type(data).__name__}")
    return data


def refuse_top_level_object(path: Path, text: str) -> None:
    """A file that is one JSON object is one record of JSON lines only if it is on one line and holds
    no list of objects; otherwise (e.g. `{"requests": [...]}`) it is not a list of records."""
    if not text.lstrip().startswith("{"):
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return  # JSON lines of several records, or not JSON (said later)
    wraps_records = any(isinstance(v, list) and v and all(isinstance(x, dict) for x in v) for v in data.values())
    if wraps_records or len(text.strip().splitlines()) > 1:
        raise ValueError(f"{path}: expected a list of records (a JSON list, or JSON lines), "
                         f"got an object with keys {sorted(data)}")


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value

