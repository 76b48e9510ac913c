"""Memory savers: activation checkpointing gives the same gradients, and the training path never imports
torch._dynamo or sympy (~57 MB of RSS that a 400 MB device cannot spare)."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES

from edge_tune.data import collate
from edge_tune.methods import METHODS, MethodSpec, apply_method
from edge_tune.tokens import encode


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].trains_encoder])
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
from edge_tune.run import adapt
adapt({str(tsv)!r}, {str(tmp_path / "x.patch")!r}, method="lora", steps=2, eval_every=2, progress=False)
adapt({str(tsv)!r}, {str(tmp_path / "y.patch")!r}, method="bitfit", profile="raspberry-pi-zero-2w", steps=2,
      eval_every=2, progress=False)
heavy = sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "sympy")))
print(heavy[:5])
sys.exit(1 if heavy else 0)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]


# ---- the memory plan ----
from edge_tune.errors import BudgetError  # noqa: E402
from edge_tune.memory import (  # noqa: E402
    base_weight_bytes,
    plan_batch_size,
    plan_memory,
    saved_activation_bytes,
)


@pytest.mark.parametrize("method", list(METHODS))
def test_plan_parts_match_what_the_run_holds(base_int8, method):
    """The parameter-sized parts against what a real step holds (not the plan's own counting rule): the
    deltas the method attaches, the gradients one backward makes (a trained word table's sparse, before
    and after coalescing), the moments AdamW allocates (a word table's for the rows the data touches) plus
    the best copy; the base part against the loaded base's tensors; the head method saves no activations."""
    from edge_tune.memory import MB
    from edge_tune.optim import AdamW, clip_grad_norm
    from edge_tune.quant import tensor_bytes

    b = copy.deepcopy(base_int8)
    b.model.reset_head(2, seed=0)
    spec = MethodSpec(method, rank=8)
    params = apply_method(b.model, spec)
    n = sum(p.numel() for p in params.values())
    ids = torch.randint(1000, 1400, (16, 64), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([torch.zeros(1, dtype=torch.long), ids.unique()])  # the data's rows and the padding id
    plan = plan_memory(base_int8.config, spec, "int8", 16, 64, table_rows=len(rows))
    opt = AdamW(params.values())
    word = b.model.encoder.word.weight_full
    if word is not None:
        opt.rows_hint[word] = rows
    b.model(ids, torch.ones_like(ids)).sum().backward()
    grads = sum(p.grad.nbytes if not p.grad.is_sparse else p.grad._values().nbytes for p in params.values())
    clip_grad_norm(params.values(), 1.0)  # coalesces a sparse gradient: a second copy of its rows
    grads += sum(p.grad.values().nbytes for p in params.values() if p.grad.is_sparse)
    opt.step()
    moments = sum(st["exp_avg"].nbytes + st["exp_avg_sq"].nbytes for st in opt.state.values())
    assert plan.trainable_mb == pytest.approx(n * 4 / MB)
    assert plan.gradients_mb == pytest.approx(max(0.0, grads / MB - plan.activations_mb), abs=0.2)
    assert plan.optimizer_mb == pytest.approx((moments + n * 4) / MB)
    assert plan.base_weights_mb == pytest.approx(tensor_bytes(base_int8.model.encoder) / MB)
    assert (
        plan.startup_peak_mb > 100 and plan.runtime_floor_mb > 100 and plan.total_mb >= plan.startup_peak_mb
    )
    assert (plan.activations_mb == 0) == (not METHODS[method].trains_encoder)
    if word is not None:  # the table's moments: only its touched rows
        assert opt.state[word]["exp_avg"].shape[0] == len(rows) < word.shape[0]


def test_base_weight_bytes_match_the_loaded_base(base_int8):
    from edge_tune.base import load_base
    from edge_tune.quant import tensor_bytes

    for b in (base_int8, load_base(precision="int4")):
        assert base_weight_bytes(b.config, b.precision) == tensor_bytes(b.model.encoder), b.precision


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].trains_encoder])
def test_saved_activations_match_what_autograd_saves(base_int8, method):
    """Count the bytes autograd really saves in one forward (unique storages), against the plan's model."""
    b = copy.deepcopy(base_int8)
    spec = MethodSpec(method, rank=8, targets=("q", "v", "ff2"))
    apply_method(b.model, spec)
    B, T = 4, 32
    ids, mask = torch.randint(1000, 2000, (B, T)), torch.ones(B, T, dtype=torch.long)
    frozen = {t.untyped_storage().data_ptr() for t in [*b.model.parameters(), *b.model.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        b.model(ids, mask)
    predicted, _ = saved_activation_bytes(b.config, spec, B, T)
    assert sum(seen.values()) == pytest.approx(predicted, rel=0.10)


def test_plan_batch_size_keeps_caps_and_budget(base_int8):
    cfg, spec = base_int8.config, MethodSpec("bitfit")
    roomy, notes = plan_batch_size(cfg, spec, "int8", 4096, 32, 64)
    assert (roomy.micro_batch, roomy.grad_accum, roomy.checkpointing, notes) == (32, 1, False, [])
    full = plan_memory(cfg, spec, "int8", 32, 64).total_mb
    tight, notes = plan_batch_size(cfg, spec, "int8", full - 40, 32, 64)
    assert tight.fits(full - 40) and tight.micro_batch < 32 and tight.micro_batch * tight.grad_accum >= 32
    assert any("micro-batch" in n for n in notes)
    floor = plan_memory(cfg, spec, "int8", 1, 64, checkpointing=True, eval_batch=1).total_mb
    with pytest.raises(BudgetError, match=r"cannot fit 200 MB .*needs \d+ MB"):
        plan_batch_size(cfg, spec, "int8", 200, 32, 64)
    assert floor > 200


def test_spare_budget_buys_tensor_cache_slack(base_int8, monkeypatch):
    """plan_batch_size spends a quarter of the headroom on the tensor cache, at most 64 MB, and never more
    than fits; $EDGE_TUNE_TENSOR_CACHE_MB, where set, decides instead."""
    from edge_tune.rss import TENSOR_CACHE_ENV

    monkeypatch.delenv(TENSOR_CACHE_ENV, raising=False)
    cfg, spec = base_int8.config, MethodSpec("lora", rank=8, alpha=16.0, targets=("q", "v"))
    bare = plan_memory(cfg, spec, "int8", 16, 64).total_mb
    assert plan_batch_size(cfg, spec, "int8", 4096, 16, 64)[0].tensor_cache_mb == 64.0
    tight, _ = plan_batch_size(cfg, spec, "int8", bare + 40, 16, 64)
    assert tight.tensor_cache_mb == 10.0 and tight.micro_batch == 16
    assert tight.fits(bare + 40) and tight.total_mb == pytest.approx(bare + 10)
    assert plan_batch_size(cfg, spec, "int8", bare + 2, 16, 64)[0].tensor_cache_mb == 0.0
    monkeypatch.setenv(TENSOR_CACHE_ENV, "5")
    assert plan_batch_size(cfg, spec, "int8", 4096, 16, 64)[0].tensor_cache_mb == 5.0


def test_over_budget_run_is_refused_before_training(tmp_path, tsv, capsys):
    from edge_tune.cli import main

    prof = tmp_path / "tiny.toml"
    prof.write_text(
        'name = "tiny"\nschema_version = 1\ndescription = "too small"\nmemory_budget_mb = 150\nthreads = 2\n'
        'max_batch_size = 8\nmax_rank = 4\nmax_seq_len = 64\nprecision = "int8"\nbackend = "cpu"\n'
    )
    code = main(["train", "--data", str(tsv), "--profile", str(prof), "--out", str(tmp_path / "x.patch")])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "cannot fit 150 MB" in lines[0] and "needs" in lines[0]
    assert not (tmp_path / "x.patch").exists() and "train bitfit" not in err


def test_peak_rss_is_this_process_not_the_parent():
    """Linux carries ru_maxrss across fork+exec: a fresh process started by a 600 MB parent (pytest, a
    benchmark driver) would report 600 MB. The runtime floor and every per-method peak depend on this."""
    ballast = bytearray(600 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
    import edge_tune.rss as m

    # memory.py alone (stdlib imports only), so the child stays far below the parent
    code = (f"import importlib.util as u, sys; s = u.spec_from_file_location('m', {m.__file__!r}); "
            "mod = sys.modules['m'] = u.module_from_spec(s); s.loader.exec_module(mod); print(mod.peak_rss_mb())")  # fmt: skip
    child = float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert len(ballast) and 0 < child < 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux-only")
def test_floor_measured_from_a_parent_holding_torch_is_trimmed(tmp_path, monkeypatch):
    """pytest holds torch's pages resident; the floor's child shares them and could not trim them unless the
    parent trims first (measured: 260 MB instead of 204, above the untrimmed startup peak of 222)."""
    from edge_tune import floor

    monkeypatch.setenv("EDGE_TUNE_CACHE", str(tmp_path))
    torch.randn(64, 64) @ torch.randn(64, 64)  # this process's torch code is resident
    v = floor._floor_values(refresh=True)
    assert v["floor"] < v["startup"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux-only")
def test_trimming_code_pages_frees_memory_and_keeps_working(tmp_path):
    """A read-only file mapping stands in for a library's code: 48 MB resident, trimmed, still readable."""
    import mmap

    from edge_tune.rss import current_rss_mb, trim_resident_memory

    f = tmp_path / "lib.so"
    f.write_bytes(bytes(range(256)) * (48 * 4096))
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        touched = sum(m[i] for i in range(0, len(m), 4096))
        before = current_rss_mb()
        freed = trim_resident_memory()
        assert freed > 40 and current_rss_mb() < before - 40
        assert sum(m[i] for i in range(0, len(m), 4096)) == touched  # the dropped pages fault back in
    x = torch.randn(64, 64)  # torch's own code pages were trimmed too: it still computes
    assert torch.equal(x @ torch.eye(64), x)


def test_mmap_threshold_env(monkeypatch, capsys):
    from edge_tune.rss import MMAP_THRESHOLD_ENV, mmap_threshold_bytes

    monkeypatch.delenv(MMAP_THRESHOLD_ENV, raising=False)
    assert mmap_threshold_bytes() == 64 * 1024
    monkeypatch.setenv(MMAP_THRESHOLD_ENV, "2048")
    assert mmap_threshold_bytes() == 2048 * 1024
    for bad in ("-1", "0", "lots", "1.5"):
        monkeypatch.setenv(MMAP_THRESHOLD_ENV, bad)
        assert mmap_threshold_bytes() == 64 * 1024
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and MMAP_THRESHOLD_ENV in err
