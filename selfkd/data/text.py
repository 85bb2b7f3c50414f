"""Labelled text for sequence classification: class folders of ``.txt`` files, CSV or JSONL.

    from selfkd.data.text import load_text
    bundle = load_text("bbc/", test_fraction=0.2, split_seed=0)         # folder of class folders
    bundle = load_text("tweets.csv", text_column="text", label_column="sentiment", encoding="latin-1")
    bundle.train.texts, bundle.train.labels, bundle.classes

Layouts (``format="auto"`` picks by what ``path`` is):

* ``folder``: ``ROOT/<class>/*.txt``, one document per file (BBC News' layout), or
  ``ROOT/train/<class>/*.txt`` with ``ROOT/test/<class>/*.txt`` (a given split, used as is). Hidden
  files and files not ending in ``.txt`` are skipped; class names are the folder names, sorted.
* ``csv`` (``.csv``; ``.tsv`` is tab-separated): a header row naming the columns; ``text_column``
  and ``label_column`` choose two of them.
* ``jsonl`` (``.jsonl``): one JSON object per line, with the two keys.

``encoding`` is one codec or a list tried in order per file (``["utf-8", "cp1252"]`` reads a folder
that mixes UTF-8 and Windows-1252 files). Labels are strings (a CSV's ``1`` is the class ``"1"``);
``classes`` declares them (and their order, i.e. the label indices); without it the classes are the
labels found, sorted.

**Split**: without a given ``test`` part, a fixed class-stratified split: per class,
``round(test_fraction · n_c)`` documents drawn with ``split_seed`` go to test (see
:func:`selfkd.data.split.stratified_split`), independent of any training seed. ``subset`` /
``test_subset`` then keep fixed class-balanced subsets (``subset_seed``) of each side.

**Bad input** raises :class:`~selfkd.errors.DataError`, one line naming the file (and line or row):
an empty document or label (only white space), a label outside the declared classes, a file that cannot be
read or decoded, a missing column or key, a class folder without documents.

Nothing is tokenised here (that is the model's business), and nothing runs at import.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import ConfigError, DataError
from .split import stratified_split, stratified_subset

Format = Literal["auto", "folder", "csv", "jsonl"]
FORMATS = ("auto", "folder", "csv", "jsonl")


@dataclass(frozen=True)
class TextSet:
    """Documents and their int64 labels; ``where[i]`` names the source of document ``i`` (for messages)."""

    texts: list[str]
    labels: torch.Tensor
    where: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: torch.Tensor) -> "TextSet":
        keep = idx.tolist()
        return TextSet([self.texts[i] for i in keep], self.labels[idx].clone(), [self.where[i] for i in keep])


@dataclass(frozen=True)
class TextBundle:
    train: TextSet
    test: TextSet
    classes: list[str]
    split: str  # how the test part came about, in words (for the run's record)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _decode(raw: bytes, where: str, encodings: Sequence[str]) -> str:
    for enc in encodings:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
        except LookupError:
            raise ConfigError(f"data.encoding: unknown codec {enc!r}") from None
    raise DataError(f"{where}: not valid {' or '.join(encodings)} text; set data.encoding (e.g. [utf-8, cp1252])")


def _read(path: Path, encodings: Sequence[str]) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    return _decode(raw, str(path), encodings)


def _scan_classes(root: Path) -> dict[str, list[Path]]:
    """``root/<class>/*.txt`` -> {class: sorted files}; a class folder without documents is an error."""
    out: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() == ".txt" and not f.name.startswith("."))
        if not files:
            raise DataError(f"{d}: class folder has no .txt documents")
        out[d.name] = files
    if not out:
        raise DataError(f"{root}: no class folders; expected {root}/<class>/*.txt (or train/ and test/ holding them)")
    return out


def _folder(root: Path, encodings: Sequence[str]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]] | None]:
    """(train rows, test rows or None) as (text, label, where)."""
    def rows(tree: dict[str, list[Path]]) -> list[tuple[str, str, str]]:
        return [(_read(f, encodings), c, str(f)) for c, files in tree.items() for f in files]

    if (root / "train").is_dir():
        test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
        if test_dir is None:
            raise DataError(f"{root}: has train/ but no test/ (or val/); give both, or class folders directly under {root}")
        return rows(_scan_classes(root / "train")), rows(_scan_classes(test_dir))
    return rows(_scan_classes(root)), None


def _columns(where: str, have: Sequence[str], text_column: str, label_column: str) -> None:
    for key, col in (("data.text_column", text_column), ("data.label_column", label_column)):
        if col not in have:
            raise DataError(f"{where}: no column {col!r} ({key}); columns: {', '.join(map(str, have))}")


def _csv(path: Path, text_column: str, label_column: str, encodings: Sequence[str]) -> list[tuple[str, str, str]]:
    text = _read(path, encodings)
    # newline="": line breaks inside quoted fields stay in the field (str.splitlines would also split on \x0b, \u2028, ...)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as err:
        raise DataError(f"{path}: line 1: not valid CSV ({err})") from None
    _columns(str(path), header, text_column, label_column)
    ti, li = header.index(text_column), header.index(label_column)
    out = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None
        if not row:
            continue  # a blank line
        where = f"{path}:line {reader.line_num}"
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, the header has {len(header)}")
        out.append((row[ti], row[li], where))
    return out


def _jsonl(path: Path, text_column: str, label_column: str, encodings: Sequence[str]) -> list[tuple[str, str, str]]:
    out = []
    for n, line in enumerate(_read(path, encodings).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:line {n}"
        try:
            obj = json.loads(line)
        except ValueError:
            raise DataError(f"{where}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        _columns(where, list(obj), text_column, label_column)
        text, label = obj[text_column], obj[label_column]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_column!r} is {type(text).__name__}, expected a string")
        if isinstance(label, (dict, list)) or label is None:
            raise DataError(f"{where}: {label_column!r} must be a string or a number")
        out.append((text, str(label), where))
    return out


def _labelled(rows: list[tuple[str, str, str]], index: dict[str, int]) -> TextSet:
    texts, labels, where = [], [], []
    for text, label, w in rows:
        if not text.strip():
            raise DataError(f"{w}: empty document")
        if label not in index:
            raise DataError(f"{w}: label {label!r} is not one of the classes {list(index)}")
        texts.append(text)
        labels.append(index[label])
        where.append(w)
    return TextSet(texts, torch.tensor(labels, dtype=torch.int64), where)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".jsonl":
        return "jsonl"
    raise ConfigError(f"data.path {path}: cannot tell the format from the name; set data.format (folder, csv, jsonl)")


def load_text(
    path: str | os.PathLike, *, format: Format = "auto", text_column: str = "text", label_column: str = "label",
    encoding: str | Sequence[str] = "utf-8", classes: Sequence[str] | None = None, test_fraction: float = 0.2,
    split_seed: int = 0, subset: int | None = None, test_subset: int | None = None, subset_seed: int = 0,
) -> TextBundle:
    """Read labelled documents and split them (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path {p}: not found")
    if format not in FORMATS:
        raise ConfigError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
    encodings = [encoding] if isinstance(encoding, str) else list(encoding)
    if not encodings:
        raise ConfigError("data.encoding: give at least one codec")
    kind = detect_format(p) if format == "auto" else format
    if kind == "folder" and not p.is_dir():
        raise DataError(f"data.path {p}: data.format=folder needs a directory")
    if kind != "folder" and not p.is_file():
        raise DataError(f"data.path {p}: data.format={kind} needs a file")
    if kind == "folder":
        train_rows, test_rows = _folder(p, encodings)
    else:
        read = _csv if kind == "csv" else _jsonl
        train_rows, test_rows = read(p, text_column, label_column, encodings), None
    if not train_rows:
        raise DataError(f"{p}: no documents")
    for _, label, w in train_rows + (test_rows or []):
        if not label.strip():  # would become a class '' (or ' '), found only later as a class too small to split
            raise DataError(f"{w}: the label is empty (column {label_column!r}); every document needs its class")
    found = sorted({label for _, label, _ in train_rows + (test_rows or [])})
    if classes is not None:
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ConfigError(f"data.classes {list(classes)}: expected at least 2 distinct class names")
        names = [str(c) for c in classes]
    else:
        names = found
    if len(names) < 2:
        raise DataError(f"{p}: found a single class {names}; classification needs at least 2")
    index = {c: k for k, c in enumerate(names)}
    train = _labelled(train_rows, index)
    if test_rows is not None:
        test = _labelled(test_rows, index)
        how = f"given ({p.name}/train and its test folder)"
    else:
        everything = train
        tr, te = stratified_split(everything.labels, test_fraction, split_seed)
        train, test = everything.subset(tr), everything.subset(te)
        how = f"stratified, test_fraction={test_fraction}, split_seed={split_seed}"
    if subset is not None:
        train = train.subset(stratified_subset(train.labels, subset, subset_seed, "data.subset", "training", "documents"))
    if test_subset is not None:
        test = test.subset(stratified_subset(test.labels, test_subset, subset_seed, "data.test_subset", "test", "documents"))
    return TextBundle(train, test, names, how)


def describe(bundle: TextBundle) -> dict[str, Any]:
    """Counts per class on each side (for the run's record)."""
    def counts(s: TextSet) -> dict[str, int]:
        c = torch.bincount(s.labels, minlength=bundle.num_classes).tolist()
        return {name: int(n) for name, n in zip(bundle.classes, c)}

    return {"classes": bundle.classes, "split": bundle.split, "train": counts(bundle.train), "test": counts(bundle.test)}
