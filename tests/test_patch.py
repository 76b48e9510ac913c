"""Patches: bit-exact round trips and swaps, and refusal of anything corrupt or foreign."""

import copy
import json
import struct

import pytest
import torch
from conftest import logits, quick_train

from edge_tune.bank import PatchBank
from edge_tune.errors import PatchError
from edge_tune.patch import Manifest, load_patch, save_patch


def _make_patch(base, ds, path, method, seed):
    b = copy.deepcopy(base)
    r = quick_train(b, ds, method, steps=3, seed=seed)
    spec = {"bitfit": {}, "lora": {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}}[method]
    m = Manifest(method, spec, ["0", "1"], b.fingerprint, b.precision, "", task=f"{method}{seed}", seq_len=64)
    save_patch(path, r.tensors, m)
    return path, b


@pytest.fixture(scope="module")
def patches(base_int8, tiny_ds, tmp_path_factory, ids_mask):
    d = tmp_path_factory.mktemp("patches")
    out = {}
    for method, seed in (("bitfit", 1), ("lora", 2)):
        path, trained = _make_patch(base_int8, tiny_ds, d / f"{method}.patch", method, seed)
        out[method] = (path, logits(trained, ids_mask))
    return out


@pytest.fixture
def bank(base_int8):
    return PatchBank(copy.deepcopy(base_int8))


def test_round_trip_bit_exact(patches, base_int8):
    path, _ = patches["lora"]
    p = load_patch(path, base_int8)
    p2_path = path.with_name("again.patch")
    save_patch(p2_path, p.tensors, p.manifest)
    p2 = load_patch(p2_path, base_int8)
    assert p.manifest == p2.manifest and all(torch.equal(p.tensors[n], p2.tensors[n]) for n in p.tensors)
    assert p.file_bytes < 200 * 1024


def test_swap_a_b_a_is_bit_exact_and_matches_training(bank, patches, ids_mask):
    a = bank.load(patches["bitfit"][0])
    b = bank.load(patches["lora"][0])
    bank.activate(a)
    la = logits(bank.base, ids_mask)
    assert torch.equal(la, patches["bitfit"][1])  # same logits as the model right after training
    bank.activate(b)
    lb = logits(bank.base, ids_mask)
    assert torch.equal(lb, patches["lora"][1]) and not torch.equal(la, lb)
    bank.activate(a)
    assert torch.equal(logits(bank.base, ids_mask), la)


def test_deactivate_restores_the_base(bank, base_int8, patches, ids_mask):
    before = logits(bank.base, ids_mask)
    bank.activate(bank.load(patches["lora"][0]))
    bank.deactivate()
    assert torch.equal(logits(bank.base, ids_mask), before)


def test_predict_labels_and_unload(bank, patches, ids_mask):
    from conftest import SENTENCES

    name = bank.load(patches["bitfit"][0])
    preds = bank.predict([s for _, s in SENTENCES], patch=name)
    # what the trained model itself says (one padded batch here, length buckets there: close, not bit-equal)
    conf, idx = patches["bitfit"][1].softmax(-1).max(-1)
    assert [p.patch for p in preds] == [name] * len(SENTENCES)
    assert [p.label for p in preds] == [["0", "1"][i] for i in idx.tolist()]
    assert [p.probability for p in preds] == pytest.approx(conf.tolist(), abs=1e-4)
    bank.unload(name)
    assert bank.active is None and name not in bank.patches
    with pytest.raises(PatchError, match="no active patch"):
        bank.predict(["x"])


def _rewrite(src, dst, fn):
    dst.write_bytes(fn(bytearray(src.read_bytes())))
    return dst


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b[:5], "too short"),
        (lambda b: b[: len(b) // 2], "truncated|outside the file"),
        (lambda b: b[:-1], "outside the file|truncated"),
        (lambda b: b + b"\0" * 8, "after the tensors"),
        (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header claims"),
        (lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:]), "sha256"),
        (lambda b: b[:12] + b"\x00" + b[13:], "not valid JSON|malformed|corrupt"),
        (lambda b: b"\x80\x04\x95" + bytes(100), "header claims|too short|corrupt"),
    ],
)
def test_corrupt_patches_are_refused_and_bank_keeps_serving(bank, patches, ids_mask, tmp_path, mutate, match):
    name = bank.load(patches["bitfit"][0])
    bank.activate(name)
    before = logits(bank.base, ids_mask)
    bad = _rewrite(patches["lora"][0], tmp_path / "bad.patch", mutate)
    with pytest.raises(PatchError, match=match):
        bank.load(bad)
    assert bank.active == name and torch.equal(logits(bank.base, ids_mask), before)


def test_patch_for_another_base_is_refused(patches, base_int8):
    other = copy.copy(base_int8)
    other.fingerprint = "f" * 64
    with pytest.raises(PatchError, match="made for base .* train the patch on this base"):
        load_patch(patches["bitfit"][0], other)


def test_manifest_problems(patches, base_int8, tmp_path):
    p = load_patch(patches["lora"][0], base_int8)
    bad = dict(p.tensors)
    bad.pop("head.bias")
    path = tmp_path / "missing.patch"
    save_patch(path, bad, p.manifest)
    with pytest.raises(PatchError, match="missing: head.bias"):
        load_patch(path, base_int8)
    nan = {n: t.clone() for n, t in p.tensors.items()}
    nan["head.bias"][0] = float("nan")
    save_patch(path, nan, p.manifest)
    with pytest.raises(PatchError, match="NaN or Inf"):
        load_patch(path, base_int8)
    save_patch(path, p.tensors, p.manifest)
    with pytest.raises(PatchError, match="rank 4 is above the profile's cap 2"):
        load_patch(path, base_int8, max_rank=2)


def test_not_a_patch(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PatchError, match="no edge_tune manifest"):
        load_patch(tmp_path / "plain.safetensors")
    with pytest.raises(PatchError, match="no such patch file"):
        load_patch(tmp_path / "nope.patch")


def test_manifest_version_checked(patches, tmp_path):
    blob = bytearray(patches["bitfit"][0].read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["edge_tune"])
    meta["format_version"] = 99
    header["__metadata__"]["edge_tune"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path = tmp_path / "v99.patch"
    path.write_bytes(struct.pack("<Q", len(new)) + new + blob[8 + n :])
    with pytest.raises(PatchError, match="v99 is not edge_tune.patch v1"):
        load_patch(path)


def test_wrong_dtype_and_extra_key_refused(patches, base_int8, tmp_path):
    from safetensors.torch import save

    from edge_tune.patch import MANIFEST_KEY

    p = load_patch(patches["bitfit"][0], base_int8)
    meta = {MANIFEST_KEY: json.dumps(p.manifest.__dict__)}
    for name, tensors, match in [
        ("f64", {n: t.double() for n, t in p.tensors.items()}, "is F64, patches hold F32 or F16 only"),
        ("i32", {n: t.int() for n, t in p.tensors.items()}, "is I32, patches hold F32 or F16 only"),
    ]:
        path = tmp_path / f"{name}.patch"
        path.write_bytes(save(tensors, metadata=meta))
        with pytest.raises(PatchError, match=match):
            load_patch(path, base_int8)
    extra = dict(p.tensors) | {"encoder.layers.0.q.lora_A": torch.zeros(4, 384)}
    save_patch(tmp_path / "extra.patch", extra, p.manifest)
    with pytest.raises(PatchError, match="unexpected: encoder.layers.0.q.lora_A"):
        load_patch(tmp_path / "extra.patch", base_int8)


def test_fp16_patch_round_trips_at_half_the_size(patches, base_int8, tmp_path):
    p = load_patch(patches["lora"][0], base_int8)
    half = tmp_path / "half.patch"
    size = save_patch(half, p.tensors, p.manifest, dtype=torch.float16)
    assert size < 0.55 * patches["lora"][0].stat().st_size
    q = load_patch(half, base_int8)
    assert all(q.tensors[n].dtype == torch.float32 for n in q.tensors)
    assert all(torch.equal(q.tensors[n], p.tensors[n].half().float()) for n in p.tensors)
    again = tmp_path / "again.patch"
    save_patch(again, q.tensors, q.manifest, dtype=torch.float16)
    assert again.read_bytes() == half.read_bytes()
    with pytest.raises(PatchError, match="float32 or float16"):
        save_patch(tmp_path / "x.patch", p.tensors, p.manifest, dtype=torch.bfloat16)
