"""Labelled TSV data (`label<TAB>sentence` with a header), the built-in tasks, tokenisation and batching."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError
from .resources import tasks_dir
from .tokens import TokenizedTexts, pad

if TYPE_CHECKING:
    from torch import Tensor

DATA_DIR = tasks_dir()
TASKS = ("sst2", "cr", "subj", "mpqa")
MAX_TSV_BYTES = 512 * 1024 * 1024
log = logging.getLogger("edge_tune")


@dataclass
class Dataset:
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def read_tsv(path: str | Path, label_names: list[str] | None = None) -> Dataset:
    """Read `label<TAB>sentence` rows after a header line. Labels are strings; with `label_names` given
    (the training set's), any other label is an error, else the sorted distinct labels become the names."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_TSV_BYTES:
            raise DataError(f"larger than {MAX_TSV_BYTES >> 20} MB", path, "split it or sample it")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(
            "no such file", path, f"pass a TSV path or one of the tasks {', '.join(TASKS)}"
        ) from None
    except IsADirectoryError:
        raise DataError("is a directory", path, "pass a TSV file (or a folder holding train.tsv)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start})", path, "save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path) from None
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or not lines[0].strip():
        raise DataError("empty file", path, "expected a header 'label<TAB>sentence' and rows")
    header = [h.strip().lower() for h in lines[0].split("\t")]
    if header != ["label", "sentence"]:
        raise DataError(f"header is {lines[0][:60]!r}, expected 'label<TAB>sentence'", f"{path}:1")
    raw_labels, texts, empty_rows = [], [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(
                f"expected 2 tab-separated fields (label, sentence), found {len(parts)}", f"{path}:{n}"
            )
        label, sentence = parts[0].strip(), parts[1].strip()
        if not label:
            raise DataError("empty label", f"{path}:{n}")
        if not sentence:  # real corpora have a few (CR has one); nothing to learn from, so skip and say so
            empty_rows.append(n)
            continue
        raw_labels.append(label)
        texts.append(sentence)
    if empty_rows:
        log.warning(
            "warning: %s: skipped %d row(s) with an empty sentence (line %d ...)",
            path,
            len(empty_rows),
            empty_rows[0],
        )
    if not texts:
        raise DataError("has a header but no rows with text", path)
    if label_names is None:
        label_names = sorted(set(raw_labels))
        if len(label_names) < 2:
            raise DataError(
                f"only one label value ({label_names[0]!r}); a classifier needs at least two", path
            )
    index = {name: i for i, name in enumerate(label_names)}
    for n, label in enumerate(raw_labels):
        if label not in index:
            raise DataError(
                f"label {label!r} (row {n + 1}) is not one of the training labels {label_names}", path
            )
    return Dataset(texts, [index[x] for x in raw_labels], list(label_names), str(path))


def task_path(data: str | Path) -> Path:
    """A built-in task's folder for its name (unless a file of that name exists here), else the path."""
    path = Path(data)
    return DATA_DIR / str(data) if str(data) in TASKS and not path.exists() else path


def load_task(data: str | Path, dev_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and dev sets from a built-in task name, a folder with train.tsv (+ dev.tsv), or one TSV
    (its dev set is a seeded `dev_fraction` split of its rows)."""
    path = task_path(data)
    if path.is_dir():
        train = read_tsv(path / "train.tsv")
        if (path / "dev.tsv").is_file():
            return train, read_tsv(path / "dev.tsv", train.label_names)
        return split_dev(train, dev_fraction, seed)
    if not path.exists() and path.suffix.lower() not in (".tsv", ".txt"):
        raise DataError(
            f"unknown task or file {str(data)!r} — use one of {', '.join(TASKS)} or a path to a TSV"
        )
    return split_dev(read_tsv(path), dev_fraction, seed)


def split_dev(ds: Dataset, dev_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if len(ds) < 4:
        raise DataError(f"{len(ds)} rows are too few to split off a dev set", ds.source, "give at least 4")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, int(len(ds) * dev_fraction))

    def pick(idx: list[int]) -> Dataset:
        return Dataset([ds.texts[i] for i in idx], [ds.labels[i] for i in idx], ds.label_names, ds.source)

    return pick(order[n_dev:]), pick(order[:n_dev])


def per_class_rows(labels: list[int], n: int, seed: int) -> list[int]:
    """Indices (ascending) of up to `n` examples of each label, drawn with `seed`."""
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    taken: dict[int, int] = {}
    picked = []
    for i in order:
        if taken.get(labels[i], 0) < n:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            picked.append(i)
    return sorted(picked)


def take_per_class(ds: Dataset, n: int, seed: int) -> Dataset:
    """`ds` cut to at most `n` labelled examples a class (few-shot runs), drawn with `seed`."""
    rows = per_class_rows(ds.labels, n, seed)
    return Dataset([ds.texts[i] for i in rows], [ds.labels[i] for i in rows], ds.label_names, ds.source)


def label_descriptions(data: str | Path, label_names: list[str]) -> list[str]:
    """A sentence describing each label, for zero-shot heads: a task folder's `labels.tsv`
    (label<TAB>description, with header) where there is one, else the label names themselves."""
    path = task_path(data)
    table = path / "labels.tsv" if path.is_dir() else path.with_name("labels.tsv")
    if not table.is_file():
        return list(label_names)
    found = {}
    for n, line in enumerate(table.read_text(encoding="utf-8").splitlines()[1:], start=2):
        if line.strip():
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError("expected label<TAB>description", f"{table}:{n}")
            found[parts[0].strip()] = parts[1].strip()
    missing = [lbl for lbl in label_names if lbl not in found]
    if missing:
        raise DataError(f"no description for label(s) {missing}", table, "add a row for each label")
    return [found[lbl] for lbl in label_names]


def token_rows(ids: TokenizedTexts, pad_id: int = 0) -> np.ndarray:
    """The distinct token ids of `ids` and the padding id (int64, sorted): the rows of the word table that
    training on them can touch."""
    return np.unique(np.append(ids.flat, pad_id)).astype(np.int64)


def collate(rows: list[np.ndarray], pad_id: int = 0, length: int | None = None) -> tuple[Tensor, Tensor]:
    """tokens.pad as torch tensors: ids (B, T) int64, mask (B, T) int64 (1 = real token)."""
    import torch  # here, not at the top: the torch-free runtime's tools read TSVs with this module

    ids, mask = pad(rows, pad_id, length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: random.Random, group: int = 50
) -> list[list[int]]:
    """One epoch of batches with rows of similar length together (shuffle, sort within windows of
    `group` batches, shuffle the batches): padding, and so compute, drops ~3x on SST-2's short phrases."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
