"""PatchBank serving: swaps that round-trip bit-exactly across four task patches, no torn response under
concurrent predict + activate, mixed-patch batches equal per-patch passes, unload frees, refusals keep
serving."""

import copy
import dataclasses
import gc
import random
import threading
import time
import weakref

import pytest
import torch
from conftest import SENTENCES, synthetic_patch

from edge_tune import model as model_module
from edge_tune.bank import PatchBank
from edge_tune.errors import PatchError
from edge_tune.methods import METHODS, MethodSpec, delta_shapes
from edge_tune.patch import Manifest, save_patch

TEXTS = [s for _, s in SENTENCES]
# Four "tasks" with different methods, ranks, targets and label counts, like sst2/cr/subj/mpqa would be.
TASKS = {
    "sst2": MethodSpec("lora", rank=8, alpha=16.0, targets=("q", "v")),
    "cr": MethodSpec("lora", rank=4, alpha=8.0, targets=("q", "k", "v", "o", "ff1", "ff2")),
    "subj": MethodSpec("bitfit"),
    "mpqa": MethodSpec("head"),
}


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


def test_mixed_batch_equals_per_patch_passes(bank, monkeypatch):
    rng = random.Random(1)
    names = [rng.choice(list(TASKS)) for _ in range(4 * len(TEXTS))]
    texts = [TEXTS[i % len(TEXTS)] for i in range(len(names))]
    # With BitFit in the mix: one pass per patch over its own rows; without: one pass, per-row LoRA. Each
    # is compared with a per-patch pass over the same sentences (the same batch size, so the same summation
    # orders where a batch's size still sets them: pooling, the head).
    for mix, grouped in ((names, True), ([n for n in names if n != "subj"], False)):
        rows = [(t, n) for t, n in zip(texts, names, strict=True) if n in mix]
        batch = [t for t, _ in rows]
        for activations in ("dynamic", "fp32"):
            monkeypatch.setattr(model_module, "INT8_ACTIVATIONS", activations)
            mixed = bank.predict(batch, patches=[n for _, n in rows], batch_size=len(batch))
            for n in set(mix):
                idx = [i for i, (_, m) in enumerate(rows) if m == n]
                ref = bank.predict(
                    [batch[i] for i in idx] if grouped else batch, patch=n, batch_size=len(batch)
                )
                want = ref if grouped else [ref[i] for i in idx]
                for i, w in zip(idx, want, strict=True):
                    # a pass per patch, or one pass whose LoRA terms are each row's own patch's in sums that
                    # depend on the row alone (ops.lora_rows, as a one-patch inference pass adds its term):
                    # either way the one-patch pass's bits
                    assert mixed[i].patch == n
                    assert mixed[i].probability == w.probability


def test_a_mixed_pass_cuts_each_text_at_its_own_patchs_length(base_int8, tmp_path):
    """Patches trained at different lengths in one mixed pass: each text is cut where its own patch's
    single-patch pass cuts it, so the answers are that pass's."""
    bank = PatchBank(copy.deepcopy(base_int8))
    spec = MethodSpec("lora", rank=4, alpha=8.0, targets=("q", "v"))
    for seed, (name, seq_len) in enumerate((("short", 8), ("long", 64))):
        bank.load(synthetic_patch(base_int8, tmp_path / f"{name}.patch", name, spec, seed, seq_len=seq_len))
    texts = TEXTS * 2
    names = ["short", "long"] * len(TEXTS)
    mixed = bank.predict(texts, patches=names)
    for n in ("short", "long"):
        idx = [i for i, m in enumerate(names) if m == n]
        alone = bank.predict([texts[i] for i in idx], patch=n)
        assert [(mixed[i].patch, mixed[i].probability) for i in idx] == [(n, p.probability) for p in alone]
    # the same deltas cut at 64 tokens answer otherwise: the comparison above can tell the cuts apart
    bank.load(synthetic_patch(base_int8, tmp_path / "short64.patch", "short64", spec, 0, seq_len=64))
    short = [i for i, m in enumerate(names) if m == "short"]
    at64 = bank.predict([texts[i] for i in short], patch="short64")
    assert [p.probability for p in at64] != [mixed[i].probability for i in short]


def test_a_sentence_gets_its_answer_alone_or_in_any_batch(bank):
    """Batching on or off in a service: every sum of an inference pass runs in an order its own sentence
    sets (packed matmuls and attention, ops.lora_rows' LoRA terms, the pooling, model.head_logits), so a
    sentence's answer has the same bits alone, in a one-patch batch or in a mixed one, on 1 or 2 threads."""
    names = [("sst2", "cr")[i % 2] for i in range(len(TEXTS))]  # the two LoRA patches: one mixed pass
    mixed = bank.predict(TEXTS, patches=names)
    batched = {n: bank.predict(TEXTS, patch=n) for n in ("sst2", "cr")}
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for i, (text, name) in enumerate(zip(TEXTS, names, strict=True)):
                alone = bank.predict([text], patch=name)[0]
                assert alone == mixed[i] == batched[name][i]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_loads_swaps_and_restores(base_int8, tmp_path, ids_mask, method):
    """A patch of each registered method is validated on load, swaps in (A -> B -> A gives A's logits bit for
    bit, and A's differ from B's), and deactivating gives the bare base's logits back."""
    from conftest import logits

    bank = PatchBank(copy.deepcopy(base_int8))
    bare = logits(bank.base, ids_mask)
    spec = MethodSpec(method, rank=4, alpha=8.0, targets=("q", "v"))
    a = bank.load(synthetic_patch(base_int8, tmp_path / "a.patch", "a", spec, 1))
    b = bank.load(synthetic_patch(base_int8, tmp_path / "b.patch", "b", spec, 2))
    bank.activate(a)
    la = logits(bank.base, ids_mask)
    bank.activate(b)
    lb = logits(bank.base, ids_mask)
    bank.activate(a)
    assert torch.equal(logits(bank.base, ids_mask), la) and not torch.equal(la, lb)
    bank.deactivate()
    assert torch.equal(logits(bank.base, ids_mask), bare)


@pytest.mark.parametrize("method", list(METHODS))
def test_packed_pass_gives_the_padded_pass_bits_for_every_method(
    base_int8, tmp_path, ids_mask, method, monkeypatch
):
    """Encoder.forward's `packed` (the matmuls on real tokens only, attention per sentence unpadded) is how
    every inference pass runs: for a patch of each method, over sentences of different lengths, the padded
    pass's hidden states on real tokens and its logits (bit for bit with the kernels; on the references,
    SDPA's rounding differs by shape), and zeros on padding."""
    from edge_tune.kernels import load_kernels

    bank = PatchBank(copy.deepcopy(base_int8))
    spec = MethodSpec(method, rank=4, alpha=8.0, targets=("q", "v", "ff1"))
    bank.activate(bank.load(synthetic_patch(base_int8, tmp_path / "a.patch", "a", spec, 1)))
    model, (ids, mask) = bank.base.model.eval(), ids_mask
    assert mask.sum(1).unique().numel() > 2  # lengths differ: there is padding to leave out
    real = mask.bool()
    for activations in ("dynamic", "fp32"):
        monkeypatch.setattr(model_module, "INT8_ACTIVATIONS", activations)
        with torch.inference_mode():
            padded, packed = model.encoder(ids, mask), model.encoder(ids, mask, packed=True)
            logits_padded, logits_packed = model(ids, mask), model(ids, mask, packed=True)
        assert not packed[~real].any()
        if load_kernels():
            assert torch.equal(packed[real], padded[real]) and torch.equal(logits_packed, logits_padded)
        elif activations == "fp32":
            torch.testing.assert_close(logits_packed, logits_padded, rtol=1e-4, atol=1e-4)
        else:  # a last-bit change may flip one int8 requantization step (test_mixed_batch_equals_...)
            torch.testing.assert_close(logits_packed, logits_padded, rtol=0, atol=0.05)


def test_a_mixed_pass_after_a_patch_is_replaced_uses_the_new_one(bank, base_int8, task_patches, tmp_path):
    # the bank keeps the last mixed pass's stacked LoRA terms: a load under the same name must drop them
    names = ["sst2", "cr"] * 3
    before = bank.predict(TEXTS[:6], patches=names)
    other = synthetic_patch(base_int8, tmp_path / "sst2.patch", "sst2", TASKS["sst2"], seed=7)
    bank.load(other, name="sst2")
    fresh = PatchBank(copy.deepcopy(base_int8))
    fresh.load(other, name="sst2")
    fresh.load(task_patches["cr"], name="cr")
    after, want = bank.predict(TEXTS[:6], patches=names), fresh.predict(TEXTS[:6], patches=names)
    assert [p.probability for p in after] == [p.probability for p in want]
    assert [p.probability for p in after][::2] != [p.probability for p in before][::2]


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


def _resave(src, dst, change):
    """Rewrite patch `src` to `dst`: `change(tensors, manifest)` edits the tensors in place and may return a
    new manifest; the sha256 is made to match, so only the change itself can be refused."""
    from edge_tune.patch import load_patch

    p = load_patch(src)
    tensors = {n: t.clone() for n, t in p.tensors.items()}
    manifest = copy.deepcopy(p.manifest)
    new = change(tensors, manifest)
    save_patch(dst, tensors, new if isinstance(new, Manifest) else manifest)
    return dst


def _flip_last_byte(src, dst):
    blob = src.read_bytes()
    dst.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    return dst


def _foreign(src, dst):
    return _resave(src, dst, lambda t, m: dataclasses.replace(m, base_fingerprint="f" * 64))


def _set(name, value):
    def change(t, m):
        t[name] = value(t[name])

    return change


Q_A = "encoder.layers.0.q.lora_A"
# Every way a patch can be bad, each through the bank: (source task, how, what the one-line error says).
BAD_PATCHES = {
    "corrupt bytes": ("sst2", _flip_last_byte, "sha256"),
    "truncated": (
        "sst2",
        lambda s, d: d.write_bytes(s.read_bytes()[:-100]) and d,
        "outside the file|truncated",
    ),
    "not a patch": ("sst2", lambda s, d: d.write_bytes(b"\0" * 64) and d, "header claims|too short|corrupt"),
    "foreign base": ("cr", _foreign, "made for base"),
    "wrong shape": (
        "cr",
        lambda s, d: _resave(s, d, _set(Q_A, lambda t: t[:, :200])),
        "wrong shape: " + Q_A,
    ),
    "wrong rank": ("cr", lambda s, d: _resave(s, d, _set(Q_A, lambda t: t[:2])), "wrong shape: " + Q_A),
    "missing tensor": ("cr", lambda s, d: _resave(s, d, lambda t, m: t.pop(Q_A)), "missing: " + Q_A),
    "extra tensor": (
        "subj",
        lambda s, d: _resave(s, d, lambda t, m: t.update({Q_A: torch.zeros(8, 384)})),
        "unexpected",
    ),
    "wrong method": (
        "subj",
        lambda s, d: _resave(s, d, lambda t, m: dataclasses.replace(m, method="lora")),
        "do not fit a lora patch|manifest",
    ),
    "NaN": (
        "sst2",
        lambda s, d: _resave(s, d, _set(Q_A, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))),
        "NaN or Inf",
    ),
    "Inf": ("mpqa", lambda s, d: _resave(s, d, _set("head.bias", lambda t: t + float("inf"))), "NaN or Inf"),
    "over the rank cap": (
        "sst2",
        lambda s, d: d.write_bytes(s.read_bytes()) and d,
        "rank 8 is above the profile's cap 4",
    ),
    "unknown method": (
        "subj",
        lambda s, d: _resave(s, d, lambda t, m: dataclasses.replace(m, method="dora")),
        "dora",
    ),
}


@pytest.mark.parametrize("kind", BAD_PATCHES)
def test_bad_patches_are_refused_and_the_bank_keeps_serving(bank, task_patches, tmp_path, kind):
    """The bank (rank cap 4, as a profile would set) refuses each bad patch with one line and goes on serving
    its active patch with the same answers; nothing of the refused patch is kept."""
    task, make, match = BAD_PATCHES[kind]
    bank.max_rank = 4
    bank.activate("cr")
    before = _probs(bank, None)
    bad = make(task_patches[task], tmp_path / "bad.patch")
    with pytest.raises(PatchError, match=match) as e:
        bank.load(bad)
    assert "\n" not in str(e.value)
    assert bank.active == "cr" and set(bank.patches) == set(TASKS) and _probs(bank, None) == before
    assert all(m.lora_rows is None for m in bank.base.model.modules() if hasattr(m, "lora_rows"))


# The generic ways a patch of any method can be bad: (how, given the tensor to damage; the error says).
BAD_FOR_EVERY_METHOD = {
    "wrong shape": (lambda n: _set(n, lambda t: t.reshape(-1)[:-1].clone()), "wrong shape: {n}"),
    "missing tensor": (lambda n: lambda t, m: t.pop(n), "missing: {n}"),
    "NaN": (
        lambda n: _set(
            n, lambda t: t.reshape(-1).index_fill(0, torch.tensor([0]), float("nan")).view(t.shape)
        ),
        "NaN or Inf",
    ),  # fmt: skip
    "foreign base": (
        lambda n: lambda t, m: dataclasses.replace(m, base_fingerprint="f" * 64),
        "made for base",
    ),
    "another method": (
        lambda n: (
            lambda t, m: dataclasses.replace(
                m, method="lora", hyper={"rank": 2, "alpha": 4.0, "targets": ["q"]}
            )
        ),
        "do not fit a lora patch",
    ),  # fmt: skip
}


@pytest.mark.parametrize("kind", BAD_FOR_EVERY_METHOD)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_every_method_survives_the_bad_patch_table(bank, base_int8, tmp_path, method, kind):
    """A damaged patch of each registered method: refused with one line naming what is wrong, the bank
    serving its active patch with the same answers."""
    spec = MethodSpec(method, tokens=4, adapter_size=8, train_from=5)
    good = synthetic_patch(base_int8, tmp_path / "good.patch", "x", spec, 7)
    # a tensor only this method's patches hold (the head for head-only methods)
    shapes = delta_shapes(base_int8.model, spec, 2)
    name = next((n for n in sorted(shapes) if not n.startswith("head.")), "head.weight")
    damage, match = BAD_FOR_EVERY_METHOD[kind]
    bad = _resave(good, tmp_path / "bad.patch", damage(name))
    bank.activate("cr")
    before = _probs(bank, None)
    with pytest.raises(PatchError, match=match.format(n=name).replace(".", r"\.")) as e:
        bank.load(bad)
    assert "\n" not in str(e.value)
    assert bank.active == "cr" and set(bank.patches) == set(TASKS) and _probs(bank, None) == before


def test_a_bank_packs_its_int8_weights_once_and_answers_with_the_same_bits(bank, ids_mask):
    """PatchBank packs every int8 linear's weight once (model.prepack_linears) for its inference passes: each
    patch's answers, and a mixed pass's, are those of the same model packing per call; a pass under
    autograd (training) still packs per call, its output and gradients unchanged."""
    from edge_tune.model import QuantLinear, prepack_linears

    linears = [m for m in bank.base.model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.packed is not None for m in linears)
    assert prepack_linears(bank.base.model) == 0  # once
    names = [("sst2", "cr")[i % 2] for i in range(len(TEXTS))]  # the two LoRA patches: one mixed pass
    packed = {n: _probs(bank, n) for n in TASKS}, bank.predict(TEXTS, patches=names)
    kept = [m.packed for m in linears]
    for m in linears:
        m.packed = None
    assert packed == ({n: _probs(bank, n) for n in TASKS}, bank.predict(TEXTS, patches=names))
    # under autograd the packing is never read: a forward and backward with it equal one without
    bank.activate("sst2")
    model, (ids, mask) = bank.base.model.train(), ids_mask
    lora = [p.requires_grad_() for n, p in model.named_parameters() if "lora_" in n]
    runs = []
    for packs in ([None] * len(linears), kept):
        for m, k in zip(linears, packs, strict=True):
            m.packed = k
        torch.manual_seed(0)  # the same dropout masks
        out = model(ids, mask)
        runs.append((out.detach(), torch.autograd.grad(out.sum(), lora)))
    assert lora and torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
