"""selfkd.data.text: class folders, CSV and JSONL, the stratified split, and one-line errors on bad input."""
import json

import pytest
import torch

from selfkd.data.split import stratified_split
from selfkd.data.text import load_text
from selfkd.errors import ConfigError, DataError


def folder(root, per_class=(5, 10), ext=".txt"):
    for c, n in zip(("b_news", "a_sport"), per_class):
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i:03d}{ext}").write_text(f"{c} document number {i}\n")
    return root


def test_folder_layout_classes_sorted_and_split_stratified(tmp_path):
    b = load_text(folder(tmp_path / "d"), test_fraction=0.2, split_seed=0)
    assert b.classes == ["a_sport", "b_news"]
    assert len(b.train) + len(b.test) == 15
    assert torch.bincount(b.test.labels).tolist() == [2, 1]  # round(0.2·10), round(0.2·5)
    for s in (b.train, b.test):  # every document keeps its folder's label
        for text, y in zip(s.texts, s.labels.tolist()):
            assert text.startswith(b.classes[y])
    assert not set(b.train.texts) & set(b.test.texts)


def test_split_is_fixed_by_its_own_seed(tmp_path):
    root = folder(tmp_path / "d")
    a, b = load_text(root, split_seed=1), load_text(root, split_seed=1)
    c = load_text(root, split_seed=2)
    assert a.test.texts == b.test.texts
    assert a.test.texts != c.test.texts
    torch.manual_seed(99)  # the global (training) RNG plays no part
    assert load_text(root, split_seed=1).test.texts == a.test.texts


def test_stratified_split_hand_counts():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    tr, te = stratified_split(labels, 0.3, seed=0)
    assert sorted(tr.tolist() + te.tolist()) == list(range(12))
    assert torch.bincount(labels[te], minlength=3).tolist() == [2, 1, 1]  # round(2.1), round(0.9), round(0.6)


def test_given_train_test_split_is_used_as_is(tmp_path):
    folder(tmp_path / "d" / "train")
    folder(tmp_path / "d" / "test", per_class=(1, 2))
    b = load_text(tmp_path / "d")
    assert (len(b.train), len(b.test)) == (15, 3)
    assert b.split.startswith("given")


def test_subset_is_class_balanced_and_fixed(tmp_path):
    b = load_text(folder(tmp_path / "d"), subset=6, test_subset=2, subset_seed=3)
    assert torch.bincount(b.train.labels).tolist() == [3, 3]
    assert torch.bincount(b.test.labels).tolist() == [1, 1]
    assert load_text(tmp_path / "d", subset=6, subset_seed=3).train.texts == b.train.texts


def test_csv_latin1_with_named_columns_and_declared_classes(tmp_path):
    p = tmp_path / "tweets.csv"
    rows = ["sentiment,confidence,text"] + [f"{s},0.9,caf\xe9 {s} {i}" for i in range(4) for s in ("negative", "positive")]
    p.write_bytes("\n".join(rows).encode("latin-1"))
    b = load_text(p, text_column="text", label_column="sentiment", encoding="latin-1",
                  classes=["positive", "negative"], test_fraction=0.25)
    assert b.classes == ["positive", "negative"]
    assert all("café" in t for t in b.train.texts)
    assert all(t.split()[1] == b.classes[y] for t, y in zip(b.train.texts, b.train.labels.tolist()))
    with pytest.raises(DataError, match=r"tweets.csv: not valid utf-8 text"):
        load_text(p, label_column="sentiment")


def test_csv_quoted_fields_keep_their_line_breaks(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"two\nlines",a\n"tab\x0bvertical",b\nplain,a\nmore,b\n', newline="")
    b = load_text(p, test_fraction=0.5)
    assert sorted(b.train.texts + b.test.texts) == sorted(["two\nlines", "tab\x0bvertical", "plain", "more"])


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"body": f"text {i}", "y": i % 2}) + "\n" for i in range(6)))
    b = load_text(p, text_column="body", label_column="y", test_fraction=0.34)
    assert b.classes == ["0", "1"] and len(b.test) == 2


def test_encoding_list_reads_mixed_files(tmp_path):
    root = folder(tmp_path / "d")
    (root / "a_sport" / "009.txt").write_bytes("a \xa315.8m signing".encode("latin-1"))  # as BBC's sport/199.txt
    with pytest.raises(DataError, match=r"009.txt: not valid utf-8 text"):
        load_text(root)
    b = load_text(root, encoding=["utf-8", "cp1252"])
    assert "a £15.8m signing" in b.train.texts + b.test.texts


@pytest.mark.parametrize("case,match", [
    ("empty", r"a_sport/003.txt: empty document"),
    ("label", r"d.csv:line 3: label 'maybe' is not one of the classes \['no', 'yes'\]"),
    ("column", r"d.csv: no column 'text' \(data.text_column\); columns: body, label"),
    ("fields", r"d.csv:line 2: 1 fields, the header has 2"),
    ("nodocs", r"b_news: class folder has no .txt documents"),
    ("jsonkey", r"d.jsonl:line 2: no column 'label'"),
    ("nolabel", r"d.csv:line 3: the label is empty \(column 'label'\)"),
    ("blanklabel", r"d.csv:line 2: the label is empty \(column 'label'\)"),
    ("jsonnolabel", r"d.jsonl:line 2: the label is empty \(column 'label'\)"),
])
def test_bad_input_one_line_naming_the_file(tmp_path, case, match):
    if case in ("empty", "nodocs"):
        root = folder(tmp_path / "d")
        if case == "empty":
            (root / "a_sport" / "003.txt").write_text("  \n\t")
        else:
            for f in (root / "b_news").iterdir():
                f.rename(f.with_suffix(".md"))
        path, kw = root, {}
    elif case in ("jsonkey", "jsonnolabel"):
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "a", "label": "x"}\n' + ('{"text": "b"}\n' if case == "jsonkey" else
                                                            '{"text": "b", "label": ""}\n{"text": "c", "label": "y"}\n'))
        kw = {}
    else:
        path = tmp_path / "d.csv"
        body = {"label": "text,label\nhello,yes\nhi,maybe\n", "column": "body,label\nhello,yes\n",
                "fields": "text,label\nhello\n", "nolabel": "text,label\nhello,yes\nhi,\nhey,no\nyo,no\n",
                "blanklabel": "text,label\nhello, \nhi,yes\nhey,no\n"}[case]
        path.write_text(body)
        kw = {"classes": ["no", "yes"]} if case == "label" else {}
    with pytest.raises(DataError, match=match) as err:
        load_text(path, **kw)
    assert "\n" not in str(err.value)


def test_bad_options(tmp_path):
    root = folder(tmp_path / "d")
    with pytest.raises(ConfigError, match="data.test_fraction"):
        load_text(root, test_fraction=1.5)
    with pytest.raises(ConfigError, match="data.subset=99 exceeds the 12 training documents"):
        load_text(root, subset=99)
    with pytest.raises(DataError, match="not found"):
        load_text(tmp_path / "missing")
