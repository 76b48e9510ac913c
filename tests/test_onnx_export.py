"""`edge-tune export --format onnx` and the torch-free `edge_tune.runtime`: the fp32 graph is our fp32 model for
every mappable method, the int8 graph tracks our int8 model, the runtime never imports torch, adapters swap
and round-trip, and every bad file is one line with the bank still serving."""

import gc
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SENTENCES, synthetic_patch

from edge_tune.bank import PatchBank as TorchBank
from edge_tune.base import load_base
from edge_tune.cli import main
from edge_tune.errors import EdgeTuneError, PatchError
from edge_tune.methods import MethodSpec
from edge_tune.onnx_export import export_onnx, graph_id

pytest.importorskip("onnxruntime")
from edge_tune.runtime import PatchBank, write_adapter  # noqa: E402

TEXTS = [s for _, s in SENTENCES]
MAPPABLE = {
    "lora_qv": MethodSpec("lora", rank=4, alpha=8.0, targets=("q", "v")),
    "lora_all": MethodSpec("lora", rank=2, alpha=4.0, targets=("q", "k", "v", "o", "ff1", "ff2")),
    "bitfit": MethodSpec("bitfit"),
    "ia3": MethodSpec("ia3"),
    "head": MethodSpec("head"),
    "prompt": MethodSpec("prompt", tokens=4),
    "prefix": MethodSpec("prefix", tokens=3),
}


@pytest.fixture(scope="module")
def base_fp32():
    return load_base(precision="fp32")


@pytest.fixture(scope="module")
def patches(base_int8, tmp_path_factory):
    d = tmp_path_factory.mktemp("patches")
    return {
        k: synthetic_patch(base_int8, d / f"{k}.patch", k, spec, i)
        for i, (k, spec) in enumerate(MAPPABLE.items())
    }


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory, patches):
    out = tmp_path_factory.mktemp("onnx_fp32")
    export_onnx(out, [str(p) for p in patches.values()], precision="fp32")
    return out


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory, patches):
    out = tmp_path_factory.mktemp("onnx_int8")
    export_onnx(out, [str(patches["lora_qv"]), str(patches["bitfit"])], precision="int8")
    return out


def _logits(bank: PatchBank, texts, name=None):
    """The graph's logits for `texts` under adapter `name` (None: no adapter, the bare base)."""
    tokens = [bank.tokenizer.encode(t).ids for t in texts]
    ids = np.zeros((len(tokens), max(map(len, tokens))), np.int64)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = t
    feed = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    opts = bank.adapters[name].run_options if name else None
    return bank.session.run(["logits", "features"], feed, opts)


def _torch_logits(base, texts, patch=None):
    from edge_tune.data import collate
    from edge_tune.tokens import encode

    bank = TorchBank(base)
    if patch:
        bank.activate(bank.load(patch))
    tok = encode(base.tokenizer, texts, 128)
    with torch.inference_mode():
        ids, mask = collate([tok[i] for i in range(len(tok))])
        feats = base.model.pool(ids, mask)
        out = base.model.head(feats).numpy(), feats.numpy()
    bank.deactivate()
    return out


@pytest.mark.parametrize("kind", list(MAPPABLE))
def test_fp32_graph_is_our_fp32_model(base_fp32, fp32_export, patches, kind):
    """Each mappable method's adapter on the fp32 graph gives our fp32 model's logits within 1e-4, whether the
    bank loads the exported adapter file or converts the .patch itself."""
    bank = PatchBank(fp32_export)
    want, _ = _torch_logits(base_fp32, TEXTS, patches[kind])
    for name in (
        bank.load(fp32_export / f"{kind}.onnx_adapter"),
        bank.load(patches[kind], name="from_patch"),
    ):
        got, _ = _logits(bank, TEXTS, name)
        assert np.abs(got - want).max() < 1e-4, kind


def test_the_graph_without_an_adapter_is_the_base(base_fp32, fp32_export):
    _, want = _torch_logits(base_fp32, TEXTS)
    _, got = _logits(PatchBank(fp32_export), TEXTS)
    assert np.abs(got - want).max() < 1e-4


def test_int8_graph_tracks_our_int8_model(base_int8, int8_export, patches):
    """Per-token int8 activations as ops.int8_linear_dynamic: most sentences' features are the same to float
    rounding; one activation rounded to the other level (the kernel multiplies by 1 / scale, the graph
    divides) moves a sentence's by up to ~1% in direction; the labels agree."""
    bank = PatchBank(int8_export)
    for kind in ("lora_qv", "bitfit"):
        want_logits, want = _torch_logits(base_int8, TEXTS, patches[kind])
        got_logits, got = _logits(bank, TEXTS, bank.load(int8_export / f"{kind}.onnx_adapter"))
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.99 and np.median(cos) > 0.9999, (kind, cos)
        assert (got_logits.argmax(1) == want_logits.argmax(1)).mean() >= 7 / 8


def test_the_runtime_never_imports_torch(int8_export, patches):
    code = f"""
import sys
from edge_tune.runtime import PatchBank
bank = PatchBank({str(int8_export)!r})
a = bank.load({str(int8_export / "lora_qv.onnx_adapter")!r})
b = bank.load({str(patches["bitfit"])!r}, name="from_patch")
answers = [bank.predict(["a gorgeous movie ."], patch=n)[0].label for n in (a, b)]
print("torch" in sys.modules, answers)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False"), out


def test_adapters_swap_and_round_trip(int8_export):
    """A -> B -> A gives A's answers exactly; the bank keeps each adapter alive itself (collected garbage
    does not free an active one); unload forgets it with one line on the next use."""
    bank = PatchBank(int8_export, load_adapters=False)
    a, b = bank.load(int8_export / "lora_qv.onnx_adapter"), bank.load(int8_export / "bitfit.onnx_adapter")
    gc.collect()
    first = bank.predict(TEXTS, patch=a)
    other = bank.predict(TEXTS, patch=b)
    bank.activate(b)
    bank.activate(a)
    assert bank.predict(TEXTS) == first and [p.probability for p in other] != [p.probability for p in first]
    bank.unload(a)
    with pytest.raises(PatchError, match="no adapter named 'lora_qv'") as e:
        bank.predict(TEXTS, patch=a)
    assert "\n" not in str(e.value)
    assert bank.predict(TEXTS, patch=b) == other


def _damage(src, dst, fn):
    dst.write_bytes(fn(bytearray(src.read_bytes())))
    return dst


@pytest.mark.parametrize("kind", ["truncated", "flipped", "garbage", "missing", "other_base", "not_mappable",
                                  "patch_other_base", "patch_corrupt"])  # fmt: skip
def test_bad_files_are_one_line_and_the_bank_keeps_serving(base_int8, int8_export, patches, tmp_path, kind):
    src = int8_export / "lora_qv.onnx_adapter"
    bank = PatchBank(int8_export, load_adapters=False)
    good = bank.load(int8_export / "bitfit.onnx_adapter")
    before = bank.predict(TEXTS)
    if kind == "truncated":
        bad, match = _damage(src, tmp_path / "a.onnx_adapter", lambda b: b[: len(b) // 2]), "not a readable"
    elif kind == "flipped":  # a byte in the middle of the tensor data: the sha256 catches it
        bad = _damage(src, tmp_path / "a.onnx_adapter", lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 1]) + b[len(b) // 2 + 1 :])  # fmt: skip
        match = "sha256|not a readable"
    elif kind == "garbage":
        bad, match = tmp_path / "a.onnx_adapter", "not a readable"
        bad.write_bytes(b"\x00" * 100)
    elif kind == "missing":
        bad, match = tmp_path / "none.onnx_adapter", "no such adapter file"
    elif kind == "other_base":  # an adapter written for another base's graph
        import onnxruntime as ort

        raw = ort.AdapterFormat.read_adapter(str(src)).get_parameters()
        manifest = json.loads(bytes(raw.pop("edge_tune.manifest").numpy()))
        manifest["base_fingerprint"] = "f" * 64
        bad, match = tmp_path / "a.onnx_adapter", "made for base ffffffffffff"
        write_adapter(bad, manifest, {n: v.numpy() for n, v in raw.items()}, graph_id("f" * 64))
    elif kind == "not_mappable":
        spec = MethodSpec("adapter")
        bad, match = (
            synthetic_patch(base_int8, tmp_path / "a.patch", "x", spec, 0),
            "changes the graph's structure",
        )
    elif kind == "patch_other_base":
        from edge_tune.patch import load_patch, save_patch

        p = load_patch(patches["lora_qv"])
        m = type(p.manifest)(**{**p.manifest.__dict__, "base_fingerprint": "e" * 64})
        bad, match = tmp_path / "a.patch", "made for base eeeeeeeeeeee"
        save_patch(bad, p.tensors, m)
    else:
        bad = _damage(patches["lora_qv"], tmp_path / "a.patch", lambda b: b[:-8] + bytes(8))
        match = "sha256|NaN"
    with pytest.raises(PatchError, match=match) as e:
        bank.load(bad)
    assert "\n" not in str(e.value)
    assert set(bank.adapters) == {good} and bank.predict(TEXTS) == before


def test_a_graph_that_is_not_an_export_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    onnx.save(helper.make_model(g), tmp_path / "model.onnx")
    with pytest.raises(EdgeTuneError, match="not an edge_tune ONNX export"):
        PatchBank(tmp_path)
    with pytest.raises(EdgeTuneError, match="no model.onnx here"):
        PatchBank(tmp_path / "nowhere")


def test_cli_export_onnx(patches, tmp_path, capsys):
    out = tmp_path / "deploy"
    assert main(["export", "--format", "onnx", "--out", str(out), "--patch", str(patches["head"])]) == 0
    assert {p.name for p in out.iterdir()} == {"model.onnx", "tokenizer.json", "head.onnx_adapter"}
    assert PatchBank(out).predict(TEXTS[:1], patch="head")[0].patch == "head"
    assert (
        main(
            [
                "export",
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "x"),
                "--patch",
                str(tmp_path / "no.patch"),
            ]
        )
        == 2
    )
    assert main(["export", "--format", "peft", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such patch file" in err[0] and "exports one patch" in err[1]
    assert not (tmp_path / "x").exists()
