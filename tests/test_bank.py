"""PatchBank serving: swaps that round-trip bit-exactly across four task patches, no torn response under
concurrent predict + activate, mixed-patch batches equal per-patch passes, unload frees, refusals keep
serving."""

import copy
import gc
import random
import threading
import time
import weakref

import pytest
import torch
from conftest import SENTENCES

from edge_tune.bank import PatchBank
from edge_tune.errors import PatchError
from edge_tune.methods import MethodSpec, delta_shapes
from edge_tune.patch import Manifest, save_patch

TEXTS = [s for _, s in SENTENCES]
# Four "tasks" with different methods, ranks, targets and label counts, like sst2/cr/subj/mpqa would be.
TASKS = {
    "sst2": MethodSpec("lora", rank=8, alpha=16.0, targets=("q", "v")),
    "cr": MethodSpec("lora", rank=4, alpha=8.0, targets=("q", "k", "v", "o", "ff1", "ff2")),
    "subj": MethodSpec("bitfit"),
    "mpqa": MethodSpec("head"),
}


def synthetic_patch(base, path, task, spec, seed, labels=("0", "1")):
    """A patch with random (non-zero) deltas of the right shapes: swap mechanics do not need training."""
    g = torch.Generator().manual_seed(seed)
    defaults = dict(base.model.named_parameters())
    tensors = {}
    for n, shape in delta_shapes(base.model, spec, len(labels)).items():
        noise = torch.randn(shape, generator=g) * 0.05
        keep = n in defaults and not n.startswith("head.")
        tensors[n] = defaults[n].detach() + noise if keep else noise
    m = Manifest(
        spec.name, spec.hyper(), list(labels), base.fingerprint, base.precision, "", task=task, seq_len=64
    )
    save_patch(path, tensors, m)
    return path


@pytest.fixture(scope="module")
def task_patches(base_int8, tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    labels = {"cr": ("neg", "pos", "mixed")}
    return {
        t: synthetic_patch(base_int8, d / f"{t}.patch", t, spec, seed, labels.get(t, ("0", "1")))
        for seed, (t, spec) in enumerate(TASKS.items())
    }


@pytest.fixture
def bank(base_int8, task_patches):
    b = PatchBank(copy.deepcopy(base_int8))
    for p in task_patches.values():
        b.load(p)
    return b


def _probs(bank, name):
    return [(p.label, p.probability) for p in bank.predict(TEXTS, patch=name)]


def test_swaps_round_trip_bit_exactly_in_random_orders(bank):
    reference = {n: _probs(bank, n) for n in TASKS}
    assert len({tuple(v) for v in reference.values()}) == 4  # the four patches really differ
    rng = random.Random(0)
    for _ in range(40):
        n = rng.choice(list(TASKS))
        bank.activate(n)
        assert _probs(bank, None) == reference[n], n


def test_no_torn_response_under_concurrent_swaps(bank):
    reference = {n: _probs(bank, n) for n in TASKS}
    stop, errors, served = threading.Event(), [], []

    def predictor(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            ask = rng.choice([None, *TASKS])
            preds = bank.predict(TEXTS, patch=ask)
            got = preds[0].patch
            if ask is not None and got != ask or any(p.patch != got for p in preds):
                errors.append(("wrong patch", ask, got))
            if [(p.label, p.probability) for p in preds] != reference[got]:
                errors.append(("torn", got))
            served.append(got)

    def swapper():
        rng = random.Random(99)
        while not stop.is_set():
            bank.activate(rng.choice(list(TASKS)))

    threads = [threading.Thread(target=predictor, args=(i,)) for i in range(4)] + [
        threading.Thread(target=swapper)
    ]
    for t in threads:
        t.start()
    # A few seconds, and until enough responses came back to mean something (the reference ops, with the
    # kernels off, are ~15x slower); capped so a hang still fails.
    start = time.monotonic()
    while time.monotonic() - start < 3.0 or (len(served) < 40 and time.monotonic() - start < 120):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert len(served) >= 20 and len(set(served)) == 4


def test_mixed_batch_equals_per_patch_passes(bank):
    rng = random.Random(1)
    names = [rng.choice(list(TASKS)) for _ in range(4 * len(TEXTS))]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    # With BitFit in the mix: one pass per patch over its own rows; without: one pass, per-row LoRA. Each
    # is compared with a per-patch pass over the same sentences (so the same padded length: with dynamic
    # int8 activations a different padding may move the last bit of attention and flip a rounding).
    for mix, grouped in ((names, True), ([n for n in names if n != "subj"], False)):
        rows = [(t, n) for t, n in zip(texts, names, strict=True) if n in mix]
        batch = [t for t, _ in rows]
        mixed = bank.predict(batch, patches=[n for _, n in rows], batch_size=len(batch))
        for n in set(mix):
            idx = [i for i, (_, m) in enumerate(rows) if m == n]
            ref = bank.predict([batch[i] for i in idx] if grouped else batch, patch=n, batch_size=len(batch))
            want = ref if grouped else [ref[i] for i in idx]
            for i, w in zip(idx, want, strict=True):
                assert mixed[i].patch == n and mixed[i].label == w.label
                assert mixed[i].probability == w.probability  # the one-patch pass's bits


def test_mixed_batch_restores_the_active_patch(bank):
    bank.activate("subj")
    before = _probs(bank, None)
    bank.predict(TEXTS[:4], patches=["sst2", "cr", "mpqa", "sst2"])  # one pass, row by row
    assert bank.active == "subj" and _probs(bank, None) == before
    assert all(m.lora_rows is None for m in bank.base.model.modules() if hasattr(m, "lora_rows"))
    bank.predict(TEXTS[:4], patches=["sst2", "cr", "subj", "sst2"])  # with BitFit: a pass per patch
    assert bank.active == "subj" and _probs(bank, None) == before


def test_mixed_batch_bad_arguments(bank):
    with pytest.raises(PatchError, match="2 texts but 1 patch names"):
        bank.predict(TEXTS[:2], patches=["sst2"])
    with pytest.raises(PatchError, match="no patch named 'nope'"):
        bank.predict(TEXTS[:1], patches=["nope"])


def test_unload_frees_the_patch_memory(bank):
    mem = bank.memory_bytes()
    assert set(mem) == set(TASKS) and mem["sst2"] == 6 * 2 * 8 * (384 + 384) * 4 + (2 * 384 + 2) * 4
    bank.activate("cr")
    probe = weakref.ref(bank.patches["cr"].tensors["encoder.layers.0.ff1.lora_A"])
    bank.unload("cr")
    gc.collect()
    assert probe() is None and "cr" not in bank.memory_bytes() and bank.active is None


def test_refused_patch_keeps_the_bank_serving(bank, base_int8, tmp_path, task_patches):
    bank.activate("sst2")
    before = _probs(bank, None)
    blob = task_patches["cr"].read_bytes()
    corrupt = tmp_path / "corrupt.patch"
    corrupt.write_bytes(blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:])
    other = copy.deepcopy(base_int8)
    other.fingerprint = "f" * 64
    foreign = synthetic_patch(other, tmp_path / "foreign.patch", "foreign", TASKS["sst2"], 7)
    for path, match in ((corrupt, "sha256"), (foreign, "made for base")):
        with pytest.raises(PatchError, match=match):
            bank.load(path)
        assert bank.active == "sst2" and set(bank.patches) == set(TASKS) and _probs(bank, None) == before
