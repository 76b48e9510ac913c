"""`edge-tune export --format executorch`: the plain-torch classifier the program is made from is our fp32
model; the lowered program (XNNPACK, int8 dynamic linears, weights in model.ptd) runs through
`executorch.runtime` with two different patches as forward inputs and answers as our int8 model does;
patches the program cannot take are one line."""

import pytest
import torch
from conftest import SENTENCES, synthetic_patch

from edge_tune.bank import PatchBank
from edge_tune.base import load_base
from edge_tune.cli import main
from edge_tune.errors import PatchError
from edge_tune.executorch_export import PlainClassifier, patch_inputs, program_shape
from edge_tune.methods import MethodSpec
from edge_tune.patch import load_patch

TEXTS = [s for _, s in SENTENCES]
LORA = MethodSpec("lora", rank=4, alpha=8.0, targets=("q", "v", "o"))


@pytest.fixture(scope="module")
def lora_patches(base_int8, tmp_path_factory):
    d = tmp_path_factory.mktemp("et_patches")
    return [synthetic_patch(base_int8, d / f"{t}.patch", t, LORA, i) for i, t in enumerate(("a", "b"))]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_plain_classifier_is_our_model(lora_patches, precision):
    """In fp32 the plain module is our fp32 model; over the int8 base's dequantized weights, our model with
    fp32 activations (EDGE_TUNE_INT8_ACTIVATIONS=fp32's path: the weights the program quantizes)."""
    from edge_tune import model as model_mod

    base = load_base(precision=precision)
    bank = PatchBank(base)
    for path in lora_patches:
        name = bank.load(path)
        plain = PlainClassifier(base, LORA.targets).eval()
        inputs = patch_inputs(load_patch(path), LORA.targets, LORA.rank, 6)
        for text in TEXTS[:3]:
            ids = torch.tensor([base.tokenizer.encode(text).ids])
            with torch.no_grad():
                got = plain(ids, torch.ones_like(ids), *inputs.values())[0]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(model_mod, "INT8_ACTIVATIONS", "fp32")
                want = bank.predict([text], patch=name)[0]
            assert abs(got.max().item() - want.probability) < 1e-5


def test_patches_the_program_cannot_take_are_one_line(base_int8, lora_patches, tmp_path):
    other = synthetic_patch(
        base_int8, tmp_path / "c.patch", "c", MethodSpec("lora", rank=2, targets=("q", "v")), 3
    )
    ff = synthetic_patch(
        base_int8, tmp_path / "d.patch", "d", MethodSpec("lora", rank=4, targets=("ff1",)), 4
    )
    bitfit = synthetic_patch(base_int8, tmp_path / "e.patch", "e", MethodSpec("bitfit"), 5)
    for paths, match in (([lora_patches[0], other], "does not fit the program's r4 on q,v,o"),
                         ([ff], "targets among q, k, v, o"), ([bitfit], "not a forward input")):  # fmt: skip
        with pytest.raises(PatchError, match=match) as e:
            program_shape([load_patch(p) for p in paths])
        assert "\n" not in str(e.value)


def test_the_program_runs_two_patches_through_executorch_runtime(fresh_base, lora_patches, tmp_path, capsys):
    pytest.importorskip("executorch", reason="ExecuTorch does not install on this platform")
    from safetensors.torch import load_file

    from edge_tune.executorch_export import load_program, run_program

    out = tmp_path / "et"
    assert main(["export", "--format", "executorch", "--out", str(out), "--max-tokens", "64",
                 *[a for p in lora_patches for a in ("--patch", str(p))]]) == 0  # fmt: skip
    assert {f.name for f in out.iterdir()} == {"model.pte", "model.ptd", "tokenizer.json", "executorch.json",
                                               "a.inputs", "b.inputs"}  # fmt: skip
    assert (out / "model.ptd").stat().st_size > (out / "model.pte").stat().st_size  # the weights live outside
    bank, forward = PatchBank(fresh_base), load_program(out)
    answers = {}
    for name in ("a", "b"):
        bank.load(lora_patches[ord(name) - ord("a")])
        inputs = load_file(out / f"{name}.inputs")
        for text in TEXTS:
            ids = torch.tensor([fresh_base.tokenizer.encode(text).ids])
            probs = run_program(forward, ids, torch.ones_like(ids), inputs)[0]
            want = bank.predict([text], patch=name)[0]
            answers[name, text] = probs
            assert abs(probs.max().item() - want.probability) < 0.05
            assert str(int(probs.argmax())) == want.label or abs(want.probability - 0.5) < 0.05
    assert any(not torch.allclose(answers["a", t], answers["b", t]) for t in TEXTS)
    assert main(["export", "--format", "executorch", "--out", str(tmp_path / "x"), "--max-tokens", "1000",
                 "--patch", str(lora_patches[0])]) == 2  # fmt: skip
    assert "outside 2..512" in capsys.readouterr().err
