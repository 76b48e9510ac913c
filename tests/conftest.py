import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from edge_tune.base import load_base
from edge_tune.data import Dataset
from edge_tune.methods import MethodSpec, delta_shapes
from edge_tune.patch import Manifest, save_patch
from edge_tune.trainer import TrainConfig, train

SENTENCES = [
    ("1", "a gorgeous , witty , seductive movie ."),
    ("0", "it 's a dull , lifeless mess ."),
    ("1", "an engrossing and moving portrait of a family ."),
    ("0", "the plot is nothing but boilerplate cliches ."),
    ("1", "warm , funny and beautifully acted ."),
    ("0", "tedious , predictable and far too long ."),
    ("1", "one of the best films of the year ."),
    ("0", "a waste of a talented cast ."),
]


def pytest_configure(config):
    """The suite measures its own runtime floor (floor.runtime_floor_mb) into a cache of its own: a test run
    must neither read a floor measured under other settings nor leave one behind for real runs. The suite's
    process runs with the settings every entry point applies (tests/test_package.py checks that importing
    edge_tune alone applies none)."""
    os.environ["EDGE_TUNE_CACHE"] = config._edge_tune_cache = tempfile.mkdtemp(prefix="edge_tune_cache_")
    from edge_tune.rss import apply_process_settings

    apply_process_settings()


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_edge_tune_cache", ""), ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_chosen_tensor_cache_slack(monkeypatch):
    """A run (adapt) keeps the tensor-cache slack it planned for the rest of its process; tests start at 0."""
    from edge_tune import rss

    monkeypatch.setattr(rss, "_chosen_slack_mb", 0.0)


@pytest.fixture(scope="session")
def base_int8():
    return load_base(precision="int8")


@pytest.fixture
def fresh_base(base_int8):
    """A private copy of the int8 base that a test may train or mutate."""
    return copy.deepcopy(base_int8)


@pytest.fixture(scope="session")
def tiny_ds():
    texts = [s for _, s in SENTENCES] * 4
    labels = [int(y) for y, _ in SENTENCES] * 4
    return Dataset(texts, labels, ["0", "1"], "tiny")


def write_tsv(path: Path, rows=SENTENCES, header="label\tsentence") -> Path:
    path.write_text(header + "\n" + "".join(f"{y}\t{s}\n" for y, s in rows), encoding="utf-8")
    return path


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "mine.tsv", SENTENCES * 3)


def quick_train(base, ds, method="bitfit", steps=3, seed=0, **kw):
    spec = MethodSpec(method, rank=kw.pop("rank", 4), alpha=8.0, targets=kw.pop("targets", ("q", "v")))
    cfg = TrainConfig(method=spec, batch_size=8, steps=steps, lr=1e-2, eval_every=steps, seed=seed, **kw)
    return train(base, ds, ds, cfg, progress=False)


@pytest.fixture(scope="session")
def ids_mask(base_int8):
    from edge_tune.data import collate
    from edge_tune.tokens import encode

    return collate(list(encode(base_int8.tokenizer, [s for _, s in SENTENCES], 64)))


def logits(base, ids_mask):
    base.model.eval()
    with torch.no_grad():
        return base.model(*ids_mask)


def synthetic_patch(base, path, task, spec, seed, labels=("0", "1"), seq_len=64):
    """A patch with random (non-zero) deltas of the right shapes: swap mechanics do not need training."""
    g = torch.Generator().manual_seed(seed)
    defaults = dict(base.model.named_parameters())
    tensors = {}
    for n, shape in delta_shapes(base.model, spec, len(labels)).items():
        noise = torch.randn(shape, generator=g) * 0.05
        keep = n in defaults and not n.startswith("head.")
        tensors[n] = defaults[n].detach() + noise if keep else noise
    m = Manifest(
        spec.name,
        spec.hyper(),
        list(labels),
        base.fingerprint,
        base.precision,
        "",
        task=task,
        seq_len=seq_len,
    )
    save_patch(path, tensors, m)
    return path
