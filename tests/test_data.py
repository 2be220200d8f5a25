import json

import pytest

from textclf.config import DataConfig
from textclf.data import DataValidationError, Example, build_splits, read_jsonl, stratified_split, subsample
from textclf.sources import load_splits


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_reads_rows_and_custom_fields(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"body": "hello", "team": "a"}, "", {"body": "bye", "team": 2}])
    rows = read_jsonl(f, text_field="body", label_field="team")
    assert [(r.text, r.label) for r in rows] == [("hello", "a"), ("bye", "2")]
    assert rows[1].source.endswith("d.jsonl:3")


def test_every_error_names_file_line_and_field(tmp_path):
    f = write(
        tmp_path / "bad.jsonl",
        [
            {"text": "ok", "label": "a"},
            "{not json",
            {"label": "a"},
            {"text": "   ", "label": "a"},
            {"text": "no label"},
            {"text": "x", "label": ""},
            {"text": 5, "label": "a"},
            "[1, 2]",
        ],
    )
    with pytest.raises(DataValidationError) as e:
        read_jsonl(f)
    errors = e.value.errors
    assert len(errors) == 7
    expected = [
        (2, "unreadable JSON"),
        (3, "field 'text': missing"),
        (4, "field 'text': empty text"),
        (5, "field 'label': missing label"),
        (6, "field 'label': empty label"),
        (7, "field 'text': expected a string"),
        (8, "expected a JSON object"),
    ]
    for err, (line, what) in zip(errors, expected):
        assert f"bad.jsonl:{line}:" in err and what in err, err


def test_invalid_utf8_and_missing_file(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"text": "ok", "label": "a"}\n\xff\xfe\n')
    with pytest.raises(DataValidationError, match=r"b.jsonl:2: not valid UTF-8"):
        read_jsonl(str(p))
    with pytest.raises(DataValidationError, match="file not found"):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def ex(text, label, i=0):
    return Example(text, label, f"f.jsonl:{i}")


def test_label_outside_label_set(tmp_path):
    train = [ex("a", "x", 1), ex("b", "y", 2), ex("c", "zz", 3)]
    with pytest.raises(DataValidationError, match=r"f.jsonl:3: field 'label': label 'zz' is not in the label set"):
        build_splits(train, [ex("d", "x")], [ex("e", "y")], labels=["x", "y"])


def test_class_too_small_for_stratified_split():
    train = [ex(f"t{i}", "big", i) for i in range(10)] + [ex("lonely", "small", 11)]
    with pytest.raises(DataValidationError, match=r"label 'small': 1 example\(s\) \(f.jsonl:11\).*at least 2"):
        build_splits(train, None, None, labels=None)


def test_stratified_split_is_seeded_and_keeps_every_class():
    rows = [ex(f"{lab}{i}", lab, i) for lab in "abc" for i in range(20)]
    rest1, held1 = stratified_split(rows, 0.25, seed=1)
    rest2, held2 = stratified_split(rows, 0.25, seed=1)
    _, held3 = stratified_split(rows, 0.25, seed=2)
    assert held1 == held2 and held1 != held3
    assert {e.label for e in held1} == set("abc")
    assert all(sum(e.label == lab for e in held1) == 5 for lab in "abc")
    assert not {e.text for e in held1} & {e.text for e in rest1}
    assert len(subsample(rows, 9, seed=0)) == 9


def test_overlap_between_train_and_test_is_reported():
    train = [ex("same text", "a", 1), ex("other", "b", 2)]
    test = [ex("Same Text ", "a", 7), ex("new", "b", 8)]
    splits = build_splits(train, [ex("v", "a")], test, labels=None)
    assert any("1 text(s) appear in both train and test" in w for w in splits.warnings)


def test_load_splits_collects_errors_from_every_file(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "", "label": "x"}])
    test = write(tmp_path / "test.jsonl", [{"txt": "a", "label": "x"}])
    cfg = DataConfig(train_file=train, validation_file=None, test_file=test)
    with pytest.raises(DataValidationError) as e:
        load_splits(cfg)
    assert any("train.jsonl:2: field 'text'" in m for m in e.value.errors)
    assert any("test.jsonl:1: field 'text': missing" in m for m in e.value.errors)


def test_bundled_default_data():
    splits = load_splits(DataConfig())
    assert len(splits.labels) == 10
    assert len(splits.train) == 3000 and len(splits.validation) == 300 and len(splits.test) == 1050
    assert not any("appear in both" in w for w in splits.warnings)


def test_hf_dataset_from_disk_with_classlabel(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features
            ),
            "test": datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features),
        }
    )
    ds.save_to_disk(tmp_path / "hf")
    splits = load_splits(DataConfig(hf_dataset=str(tmp_path / "hf")))
    assert splits.labels == ["neg", "pos"] and len(splits.test) == 2 and len(splits.validation) == 2
    assert splits.train[0].source.startswith(str(tmp_path / "hf") + "[train]:")


def test_hf_classlabel_minus_one_is_an_error_naming_split_and_row(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = {"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    train["label"][4] = -1
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(train, features=features),
            # Hub test splits often come unlabelled: -1 must not become the last class
            "test": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, -1, -1]}, features=features),
        }
    )
    ds.save_to_disk(tmp_path / "hf")
    with pytest.raises(DataValidationError) as e:
        load_splits(DataConfig(hf_dataset=str(tmp_path / "hf")))
    errors = e.value.errors
    assert any(
        "[train]:5: field 'label': label -1 is not one of the ClassLabel's 2 classes (-1: an unlabelled row)" in m
        for m in errors
    )
    assert any(
        m.endswith(
            "[test]: 2 unlabelled row(s) (label -1, as in many Hub test splits): a split to train or "
            "score on needs a label on every row; drop them (e.g. ds.filter(lambda r: r['label'] != -1), "
            "then save_to_disk and point hf_dataset at that folder)"
        )
        for m in errors
    )
    assert sum(f"[test]:{row}: field 'label': label -1" in m for m in errors for row in (2, 3)) == 2
    assert len(errors) == 5  # every split's problems in one report (a hint per split, then its rows)
