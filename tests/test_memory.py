"""Memory savers: activation checkpointing gives the same gradients, and the training path never imports
torch._dynamo or sympy (~57 MB of RSS that a 400 MB device cannot spare)."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES

from edge_tune.data import collate, encode
from edge_tune.methods import MethodSpec, apply_method


@pytest.mark.parametrize("method", ["bitfit", "lora"])
def test_checkpointing_gives_the_same_gradients(base_int8, method):
    ids, mask = collate(list(encode(base_int8.tokenizer, [s for _, s in SENTENCES], 64)))
    y = torch.tensor([int(lbl) for lbl, _ in SENTENCES])
    grads = {}
    for ck in (False, True):
        b = copy.deepcopy(base_int8)
        b.model.reset_head(2, seed=0)
        params = apply_method(b.model, MethodSpec(method, rank=4, targets=("q", "v", "ff1")), seed=0)
        with torch.no_grad():  # non-zero LoRA B, so that A gets a gradient too
            for n, p in params.items():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        b.model.encoder.checkpointing = ck
        b.model.eval()
        F.cross_entropy(b.model(ids, mask), y).backward()
        grads[ck] = {n: p.grad.clone() for n, p in params.items()}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        assert grads[True][n].abs().sum() > 0 or grads[False][n].abs().sum() == 0, n
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7, msg=n)


def test_training_path_imports_no_dynamo_or_sympy(tmp_path, tsv):
    code = f"""
import sys
from edge_tune.adapt import adapt
adapt({str(tsv)!r}, {str(tmp_path / "x.patch")!r}, method="lora", steps=2, eval_every=2, progress=False)
adapt({str(tsv)!r}, {str(tmp_path / "y.patch")!r}, method="bitfit", profile="raspberry-pi-zero-2w", steps=2,
      eval_every=2, progress=False)
heavy = sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "sympy")))
print(heavy[:5])
sys.exit(1 if heavy else 0)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
