"""PEFT interop: a LoRA patch exported as a PEFT adapter loads onto transformers' BertModel with no missing
or unexpected keys and gives this project's features; imported back it is the same patch; what does not
map is named in one line."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import synthetic_patch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edge_tune.bank import PatchBank
from edge_tune.errors import EdgeTuneError
from edge_tune.methods import MethodSpec
from edge_tune.patch import load_patch
from edge_tune.peft_adapter import CONFIG, HEAD, WEIGHTS, export_peft, import_peft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPEC = MethodSpec(
    "lora", rank=4, alpha=8.0, targets=("q", "v", "o", "ff2")
)  # "o" and "ff2": both *.output.dense


@pytest.fixture(scope="module")
def lora_patch(base_int8, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    return synthetic_patch(base_int8, d / "task.patch", "task", SPEC, seed=3)


def test_export_loads_in_peft_with_no_missing_or_unexpected_keys_and_same_features(lora_patch, tmp_path):
    from edge_tune.base import load_base
    from edge_tune.data import collate
    from edge_tune.tokens import encode

    out = export_peft(lora_patch, tmp_path / "adapter")
    hf = transformers.BertModel.from_pretrained(str(_model_dir()), local_files_only=True)
    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    # every saved tensor went to a LoRA slot, and every LoRA slot got one
    slots = {n for n, _ in model.named_parameters() if "lora_" in n}
    saved = load_file(out / WEIGHTS)
    assert len(slots) == len(saved) == 6 * len(SPEC.targets) * 2
    for key, t in saved.items():
        slot = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert torch.equal(dict(model.named_parameters())[slot].detach(), t), key

    base = load_base(precision="fp32")
    bank = PatchBank(base)
    bank.activate(bank.load(lora_patch))
    ids, mask = collate(list(encode(base.tokenizer, ["a gorgeous , witty movie .", "a dull mess ."], 64)))
    with torch.inference_mode():
        ours = base.model.pool(ids, mask)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        theirs = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert (ours - theirs).abs().max() < 1e-4
    with safe_open(out / HEAD, "pt") as f:
        meta_labels = json.loads(f.metadata()["label_names"])
    assert meta_labels == load_patch(lora_patch).manifest.label_names


def _model_dir():
    from edge_tune.base import default_model_dir

    return default_model_dir()


def test_import_gives_back_the_same_patch(lora_patch, tmp_path, base_int8):
    out = export_peft(lora_patch, tmp_path / "adapter")
    back = import_peft(out, tmp_path / "back.patch")
    a, b = load_patch(lora_patch), load_patch(back)
    assert b.manifest.spec() == a.manifest.spec() and b.manifest.label_names == a.manifest.label_names
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k].float(), b.tensors[k].float()) for k in a.tensors)
    bank = PatchBank(copy.deepcopy(base_int8))
    x, y = bank.load(lora_patch), bank.load(back)
    texts = ["a gorgeous , witty movie .", "a dull mess ."]
    assert [p.probability for p in bank.predict(texts, x)] == [p.probability for p in bank.predict(texts, y)]


def test_a_peft_adapter_made_by_peft_imports_with_a_head_from_another_patch(lora_patch, tmp_path):
    """An adapter PEFT itself saved (BertForSequenceClassification, classifier in modules_to_save)."""
    hf = transformers.BertForSequenceClassification.from_pretrained(
        str(_model_dir()), num_labels=2, local_files_only=True
    )
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key"], task_type="SEQ_CLS")
    model = peft.get_peft_model(hf, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    model.save_pretrained(tmp_path / "theirs")
    with pytest.raises(EdgeTuneError, match="carries no head"):
        import_peft(tmp_path / "theirs", tmp_path / "x.patch")
    out = import_peft(tmp_path / "theirs", tmp_path / "theirs.patch", head_from=lora_patch)
    p = load_patch(out)
    assert p.manifest.hyper["rank"] == 2 and p.manifest.hyper["targets"] == ["q", "k"]
    ours = p.tensors["encoder.layers.5.k.lora_B"]
    theirs = dict(model.named_parameters())[
        "base_model.model.bert.encoder.layer.5.attention.self.key.lora_B.default.weight"
    ]
    assert torch.equal(ours.float(), theirs.detach())


def test_what_does_not_map_is_named_in_one_line(lora_patch, tmp_path):
    out = export_peft(lora_patch, tmp_path / "adapter")
    tensors = load_file(out / WEIGHTS)
    key = next(k for k in tensors if "query.lora_A" in k)
    bad = dict(tensors) | {key: torch.zeros(3, 7), "base_model.model.encoder.layer.0.attention.self.gate.lora_A.weight": torch.zeros(4, 384)}  # fmt: skip
    save_file(bad, out / WEIGHTS)
    with pytest.raises(
        EdgeTuneError, match=r"gate\.lora_A\.weight.*has shape \(3, 7\), expected \(4, 384\)"
    ) as e:
        import_peft(out, tmp_path / "x.patch")
    assert "\n" not in str(e.value)
    cfg = json.loads((out / CONFIG).read_text()) | {"use_dora": True, "peft_type": "IA3"}
    (out / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(EdgeTuneError, match="peft_type is 'IA3'.*use_dora is True"):
        import_peft(out, tmp_path / "x.patch")


def test_cli_export_refuses_a_non_lora_patch_in_one_line(base_int8, tmp_path):
    bitfit = synthetic_patch(base_int8, tmp_path / "b.patch", "b", MethodSpec("bitfit"), seed=1)
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "export", "--format", "peft", "--patch", str(bitfit),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "takes LoRA patches; this one is bitfit" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
