"""Every kind of bad record stops the run with file, record index, id and reason (or is skipped)."""

import json

import pytest

from conftest import SHARED_DATA
from encore_pl.data import QUICKSTART_PATH, InvalidRecord, RepeatedSubject, read_requests
from encore_pl.datamodule import EditDataModule

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
    (r,), _ = read_requests(write(tmp_path, [GOOD_EASYEDIT]))
    assert (r.prompt, r.target_new, r.target_true, r.case_id) == ("The mother tongue of {} is", " English", " French", "7")
    (r,), _ = read_requests(write(tmp_path, [GOOD_ROME]))
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is" and r.generation_prompts
    (r,), _ = read_requests(write(tmp_path, [GOOD_ZSRE]))
    # as published (ENCORE dsets/zsre.py): towards answers[0], the nq question with "?", on loc_ans
    assert (r.kind, r.prompt, r.target_new, r.target_true) == ("zsre", "What is the product made by {}?", " uniform", "")
    assert (r.neighborhood_prompts, r.neighborhood_target) == (["who plays walter in the big lebowski?"], " John Goodman")


def test_jsonl_and_shipped_quickstart_set(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(dict(GOOD_EASYEDIT, case_id=i)) for i in range(3)))
    assert len(read_requests(path)[0]) == 3
    shipped, _ = read_requests(QUICKSTART_PATH)
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
        read_requests(path)
    err = info.value
    assert err.index == 1 and message in err.reason and str(path) in str(err)
    assert f"record 1 (id {err.case_id!r})" in str(err)


def test_duplicate_id(tmp_path):
    path = write(tmp_path, [GOOD_EASYEDIT, dict(GOOD_EASYEDIT, subject="Danielle")])
    with pytest.raises(InvalidRecord, match=r"record 1 \(id 7\): duplicate id \(first seen at record 0\)"):
        read_requests(path)


def test_skip_mode_counts_and_keeps_order(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(4)]
    records[1]["subject"] = "Nobody"
    records[2]["target_new"] = ""
    requests, skipped = read_requests(write(tmp_path, records), on_invalid="skip")
    assert [r.case_id for r in requests] == ["0", "3"]
    assert [s.index for s in skipped] == [1, 2]


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_requests(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"case_id": 1,')
    with pytest.raises(ValueError, match="not valid JSON"):
        read_requests(broken)
    with pytest.raises(ValueError, match="asked for 5 edits but only 1 valid records"):
        read_requests(write(tmp_path, [GOOD_EASYEDIT]), num_edits=5)


@pytest.mark.parametrize("indent", [None, 2])
def test_a_top_level_object_is_not_a_list_of_records(tmp_path, indent):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"requests": [GOOD_EASYEDIT], "version": 1}, indent=indent))
    for fmt in ("auto", "easyedit"):
        with pytest.raises(ValueError, match=r"wrapped.json: expected a list of records \(a JSON list, or JSON lines\), "
                                             r"got an object with keys \['requests', 'version'\]"):
            read_requests(path, format=fmt)
    path.write_text(json.dumps(GOOD_EASYEDIT, indent=2))  # one record, but not JSON lines
    with pytest.raises(ValueError, match="expected a list of records"):
        read_requests(path)
    path.write_text(json.dumps(GOOD_EASYEDIT) + "\n")  # JSON lines of one record
    assert [r.case_id for r in read_requests(path)[0]] == ["7"]


def test_mixed_types_across_records_still_name_the_record(tmp_path):
    # A type clash between records defeats Arrow's schema inference; validation still names the record.
    records = [GOOD_EASYEDIT, dict(GOOD_EASYEDIT, case_id=8, ground_truth=["French"])]
    with pytest.raises(InvalidRecord, match=r"record 1 .*'ground_truth' must be a string, got list"):
        read_requests(write(tmp_path, records))


def test_datamodule_batches_in_file_order(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(5)]
    dm = EditDataModule(path=str(write(tmp_path, records)), num_edits=5, batch_size=2)
    dm.setup("fit")
    batches = [[r.case_id for r in b] for b in dm.train_dataloader()]
    assert batches == [["0", "1"], ["2", "3"], ["4"]]


def test_zsre_records_whose_alt_is_the_answer_are_edited_towards_the_answer():
    """17 records of the shared zsRE subset have alt == answers[0] (the first at index 101): they
    stopped every zsRE run of more than 101 edits. Edited towards answers[0], all are valid."""
    path = SHARED_DATA / "zsre-mend-subset" / "zsre_mend_train-1k.json"
    if not path.exists():
        pytest.skip(f"shared zsRE subset not found at {path}")
    records = json.loads(path.read_text())
    requests, skipped = read_requests(path, format="zsre")
    assert skipped == [] and len(requests) == len(records)
    same = [i for i, r in enumerate(records) if r["alt"].strip() == r["answers"][0].strip()]
    assert len(same) == 17 and same[0] == 101
    for rec, req in zip(records, requests):
        assert req.target_new.startswith(" ") and req.target_new.strip() == rec["answers"][0].strip()
        assert req.neighborhood_prompts == [rec["loc"].replace("nq question:", "").strip() + "?"]
        assert req.neighborhood_target.strip() == rec["loc_ans"].strip()


def test_unique_subjects_leaves_out_and_counts_repeated_subjects(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(4)]
    records[1] = dict(records[1], subject="Michel Rocard", prompt="The mother tongue of Michel Rocard is")
    path = write(tmp_path, records)
    requests, left_out = read_requests(path, unique_subjects=True)
    assert [r.case_id for r in requests] == ["0", "1"]
    assert [e.index for e in left_out] == [2, 3] and all(isinstance(e, RepeatedSubject) for e in left_out)
    assert "already edited (record 0)" in str(left_out[0])
    # num_edits counts the requests kept; too few unique ones is an error
    assert [r.case_id for r in read_requests(path, num_edits=2, unique_subjects=True)[0]] == ["0", "1"]
    with pytest.raises(ValueError, match="asked for 3 edits but only 2"):
        read_requests(path, num_edits=3, unique_subjects=True)
    assert len(read_requests(path)[0]) == 4  # off by default


def test_seeded_order_is_a_seeded_shuffle(tmp_path):
    path = write(tmp_path, [dict(GOOD_EASYEDIT, case_id=i) for i in range(30)])
    ids = lambda **kw: [r.case_id for r in read_requests(path, **kw)[0]]
    assert ids() == [str(i) for i in range(30)]
    shuffled = ids(order="seeded", seed=1)
    assert shuffled == ids(order="seeded", seed=1) != ids(order="seeded", seed=2)
    assert sorted(shuffled, key=int) == ids() and shuffled != ids()
    assert ids(order="seeded", seed=1, num_edits=5) == shuffled[:5]


def test_data_module_counts_repeated_subjects_apart_from_invalid_records(tmp_path):
    records = [dict(GOOD_EASYEDIT, case_id=i) for i in range(3)] + [{"case_id": 9}]
    data = EditDataModule(str(write(tmp_path, records)), on_invalid="skip", unique_subjects=True)
    data.setup("fit")
    assert len(data.requests) == 1 and len(data.repeated) == 2 and len(data.skipped) == 1
