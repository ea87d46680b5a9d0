"""Every kind of bad record stops the run with file, record index, id and reason (or is skipped)."""

import json

import pytest

from encore_pl.data import QUICKSTART_PATH, EditDataModule, InvalidRecord, load_requests

GOOD_EASYEDIT = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
GOOD_ROME = {
    "case_id": 3,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
    },
    "paraphrase_prompts": ["Danielle Darrieux speaks"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
GOOD_ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: who plays walter in the big lebowski",
    "loc_ans": "John Goodman",
}


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_each_format_parses(tmp_path):
    (r,), _ = load_requests(write(tmp_path, [GOOD_EASYEDIT]))
    assert (r.prompt, r.target_new, r.target_true, r.case_id) == ("The mother tongue of {} is", " English", " French", "7")
    (r,), _ = load_requests(write(tmp_path, [GOOD_ROME]))
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is" and r.generation_prompts
    (r,), _ = load_requests(write(tmp_path, [GOOD_ZSRE]))
    assert (r.kind, r.prompt, r.target_new, r.neighborhood_target) == (
        "zsre", "What is the product made by {}?", " unmanned aircraft", " John Goodman")


def test_jsonl_and_shipped_quickstart_set(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(dict(GOOD_EASYEDIT, case_id=i)) for i in range(3)))
    assert len(load_requests(path)[0]) == 3
    shipped, _ = load_requests(QUICKSTART_PATH)
    assert len(shipped) >= 60
    assert all(len(r.paraphrase_prompts) >= 2 and len(r.neighborhood_prompts) >= 2 for r in shipped)


def with_(base, path, value):
    rec = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    target = rec
    for p in parents:
        target = target[p]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return rec


DELETE = object()

BAD = [
    ("subject not in prompt", with_(GOOD_EASYEDIT, "subject", "Edith Piaf"), "subject 'Edith Piaf' not found in prompt"),
    ("empty target", with_(GOOD_EASYEDIT, "target_new", "  "), "field 'target_new' is empty"),
    ("non-string target", with_(GOOD_EASYEDIT, "target_new", 42), "field 'target_new' must be a string, got int"),
    ("missing field", with_(GOOD_EASYEDIT, "rephrase_prompt", DELETE), "missing field 'rephrase_prompt'"),
    ("rome: no template", with_(GOOD_ROME, "requested_rewrite.prompt", "The mother tongue is"), "exactly once"),
    ("rome: missing target", with_(GOOD_ROME, "requested_rewrite.target_true", DELETE), "missing field 'requested_rewrite.target_true.str'"),
    ("rome: bad paraphrases", with_(GOOD_ROME, "paraphrase_prompts", "one string"), "'paraphrase_prompts' must be a list"),
    ("zsre: no answers", with_(GOOD_ZSRE, "answers", []), "'answers' must be a non-empty list"),
    ("new equals true", with_(GOOD_EASYEDIT, "target_new", "French"), "target_new equals the true target"),
    ("not an object", ["a", "list"], "must be a JSON object"),
]


@pytest.mark.parametrize("kind,bad,message", BAD, ids=[b[0] for b in BAD])
def test_bad_record_is_reported_with_file_index_id_and_reason(tmp_path, kind, bad, message):
    path = write(tmp_path, [dict(GOOD_EASYEDIT, case_id=100), bad])
    with pytest.raises(InvalidRecord) as info:
        load_requests(path)
    err = info.value
    assert err.index == 1 and message in err.reason and str(path) in str(err)
    assert f"record 1 (id {err.case_id!r})" in str(err)


def test_duplicate_id(tmp_path):
    path = write(tmp_path, [GOOD_EASYEDIT, dict(GOOD_EASYEDIT, subject="Danielle")])
    with pytest.raises(InvalidRecord, match=r"record 1 \(id 7\): duplicate id \(first seen at record 0\)"):
        load_requests(path)


def test_skip_mode_counts_and_keeps_order(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(4)]
    records[1]["subject"] = "Nobody"
    records[2]["target_new"] = ""
    requests, skipped = load_requests(write(tmp_path, records), on_invalid="skip")
    assert [r.case_id for r in requests] == ["0", "3"]
    assert [s.index for s in skipped] == [1, 2]


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_requests(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"case_id": 1,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_requests(broken)
    with pytest.raises(ValueError, match="asked for 5 edits but only 1 valid records"):
        load_requests(write(tmp_path, [GOOD_EASYEDIT]), num_edits=5)


def test_mixed_types_across_records_still_name_the_record(tmp_path):
    # A type clash between records defeats Arrow's schema inference; validation still names the record.
    records = [GOOD_EASYEDIT, dict(GOOD_EASYEDIT, case_id=8, ground_truth=["French"])]
    with pytest.raises(InvalidRecord, match=r"record 1 .*'ground_truth' must be a string, got list"):
        load_requests(write(tmp_path, records))


def test_datamodule_batches_in_file_order(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(5)]
    dm = EditDataModule(path=str(write(tmp_path, records)), num_edits=5, batch_size=2)
    dm.setup("fit")
    batches = [[r.case_id for r in b] for b in dm.train_dataloader()]
    assert batches == [["0", "1"], ["2", "3"], ["4"]]
