"""`edge-tune profile` on a tiny grid (a real 2-step run in a fresh process) and the report writers of
`edge-tune profile` and `tools/compare_peers.py` (table, JSON, PNG). Nothing here is timed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "peers"))

import compare_peers  # noqa: E402
import protocol  # noqa: E402

from edge_tune.profiling import table  # noqa: E402


def test_profile_runs_a_tiny_grid_and_writes_table_json_png(tmp_path):
    out = tmp_path / "prof"
    p = subprocess.run(
        [sys.executable, "-m", "edge_tune.cli", "profile", "--methods", "head", "--precisions", "int8",
         "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "peak MB" in p.stdout and "SST-2 dev" in p.stdout
    rows = json.loads((out / "profile.json").read_text())
    # the default profile deploys with ONNX Runtime: the head patch is also served there, torch-free
    assert [(r["method"], r["precision"], r["runtime"]) for r in rows] == [
        ("head", "int8", "torch"),
        ("head", "int8", "onnxruntime"),
    ]
    ort = rows[1]
    assert "error" not in ort and ort["lat1_ms"] > 0 and not ort["torch_imported"]
    assert ort["peak_rss_mb"] < rows[0]["peak_rss_mb"]
    assert abs(ort["dev_accuracy"] - rows[0]["dev_accuracy"]) < 0.02  # the int8 graph, per-token as ours
    assert "onnxruntime" in p.stdout
    r = rows[0]
    assert r["trainable"] == 770 and r["patch_kb"] > 0 and 0 <= r["dev_accuracy"] <= 1
    assert 0 < r["peak_rss_mb"] <= r["budget_mb"] and r["step_ms"] > 0 and r["lat1_ms"] > 0
    assert (out / "profile.png").stat().st_size > 10_000


def test_profile_table_shows_errors_in_their_row():
    good = {"method": "lora", "precision": "int8", "trainable": 74498, "patch_kb": 148.2, "peak_rss_mb": 500.0,
            "step_ms": 200.0, "train_sent_s": 160.0, "lat1_ms": 5.0, "lat32_ms": 280.0, "dev_accuracy": 0.84}  # fmt: skip
    text = table([good, {"method": "bitfit", "precision": "int4", "error": "BudgetError: needs 900 MB"}])
    lines = text.splitlines()
    assert len(lines) == 3 and "0.8400" in lines[1] and "BudgetError: needs 900 MB" in lines[2]


def _peer_rows():
    row = {
        "peak_rss_mb": 900.0,
        "step_ms": 400.0,
        "dev_accuracy": 0.81,
        "adapter_kb": 290.0,
        "batch1_ms": 10.0,
    }
    ours = {
        "peak_rss_mb": 380.0,
        "step_ms": 500.0,
        "dev_accuracy": 0.83,
        "adapter_kb": 148.0,
        "batch1_ms": 4.0,
        "served_batch1_ms": 2.0,
    }
    return {
        ("PEFT fp32", "lora"): row,
        ("ONNX Runtime", "bitfit"): {**row, "step_ms": 390.0, "batch1_ms": 3.9, "served_batch1_ms": 2.5},
        ("ExecuTorch", "bitfit"): {"error": "could not set up its venv: no network"},
        ("edge_tune int8", "lora"): ours,
    }


def test_compare_peers_table_ratios_and_error_rows():
    text = compare_peers.table(_peer_rows())
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    ours = next(ln for ln in lines if ln.startswith("| edge_tune int8 | lora"))
    assert (
        "0.42x" in ours and "1.25x" in ours and "0.40x" in ours and "0.51x" in ours
    )  # 380/900, 500/400, ...
    assert "could not set up its venv: no network" in text


def test_compare_peers_verdicts_say_met_and_missed():
    v = "\n".join(compare_peers.verdicts(_peer_rows()))
    assert "peak RSS / PEFT fp32 LoRA: 0.422 (target <= 0.45) met" in v
    assert "step time / ORT BitFit: 1.282 (target <= 1.0) MISSED" in v
    assert "served batch-1 latency / ORT BitFit: 0.800 (target <= 1.0) met" in v
    assert "n/a" in v  # no ORT LoRA row in this run


def test_a_later_phase_adds_to_a_workers_result(tmp_path):
    path = tmp_path / "r.json"
    protocol.write_result(path, step_ms=1.5)
    first = json.loads(path.read_text())
    protocol.add_to_result(path, served_batch1_ms=2.0)
    # the train phase's peak RSS stays
    assert json.loads(path.read_text()) == {**first, "served_batch1_ms": 2.0}
    assert protocol.worker_args(["--method", "lora", "--arrays", "a", "--model-dir", "m", "--work", "w",
                                 "--result", "r", "--phase", "serve"]).phase == "serve"  # fmt: skip


def test_compare_peers_plot_writes_a_png(tmp_path):
    compare_peers.plot(_peer_rows(), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_protocol_schedule_and_arrays(tmp_path):
    lrs = [protocol.lr_at("lora", s, 100) for s in range(100)]
    assert lrs[0] < lrs[5] == max(lrs) == protocol.LR["lora"] and lrs[-1] < lrs[50] and min(lrs) > 0
    path = tmp_path / "a.npz"
    compare_peers.make_arrays(path, steps=3, batch=2, seq_len=16)
    a = protocol.load_arrays(path)
    assert (
        a["train_ids"].shape == (6, 16)
        and a["train_mask"].shape == (6, 16)
        and a["train_labels"].shape == (6,)
    )
    assert a["dev_ids"].shape[1] == 16 and len(a["dev_labels"]) == 872
    assert np.all(a["train_mask"].sum(1) >= 3)  # [CLS] word [SEP] at least
    ids, mask = protocol.one_sentence(a)
    assert ids.shape == mask.shape and mask.all() and not math.isnan(float(ids.sum()))


def _imports_edge_tune(fn_node) -> bool:
    import ast

    for node in ast.walk(fn_node):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edge_tune"):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("edge_tune") for a in node.names):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("model_inputs", "texts_for_mixed"):
            return True  # helpers that import it
    return False


def test_peer_workers_never_import_edge_tune():
    """edge_tune's entry points set glibc's mmap threshold (rss.apply_process_settings), which slowed PEFT's step from
    ~600 to ~900 ms and changes its peak RSS: a peer measured in such a process is not the peer. Every
    PEFT worker function of the benchmarks, and the peers' worker scripts, must stay clear of it."""
    import ast

    workers = {"bench_kernels.py": "peft_model_worker", "swap_bench.py": "peft_worker",
               "memory_vs_peft.py": "peft_worker"}  # fmt: skip
    for script, name in workers.items():
        tree = ast.parse((ROOT / "tools" / script).read_text())
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
        assert not _imports_edge_tune(fn), f"{script}:{name} imports edge_tune"
    for script in ("hf_peft.py", "ort_train.py", "et_train.py", "protocol.py"):
        assert not _imports_edge_tune(ast.parse((ROOT / "tools" / "peers" / script).read_text())), script


def test_pareto_front_and_best_row():
    from edge_tune.profiling import best_row, pareto_front

    rows = [
        {"method": "a", "peak_rss_mb": 300, "patch_kb": 1, "dev_accuracy": 0.80, "budget_mb": 1000},
        {"method": "b", "peak_rss_mb": 400, "patch_kb": 100, "dev_accuracy": 0.85, "budget_mb": 1000},
        {"method": "c", "peak_rss_mb": 500, "patch_kb": 10, "dev_accuracy": 0.84, "budget_mb": 1000},  # beaten by b on RSS
        {"method": "d", "peak_rss_mb": 1200, "patch_kb": 9e4, "dev_accuracy": 0.90, "budget_mb": 1000},  # over budget
        {"method": "e", "error": "refused"},
    ]  # fmt: skip
    assert [r["method"] for r in pareto_front(rows, "peak_rss_mb")] == ["a", "b", "d"]
    assert [r["method"] for r in pareto_front(rows, "patch_kb")] == ["a", "c", "b", "d"]
    assert best_row(rows)["method"] == "b"
    assert best_row([rows[3], rows[4]]) is None
