"""The CLI as a user meets it: every shipped profile trains on a user's TSV; bad input is one line, exit 2."""

import re
import subprocess
import sys

import pytest
from conftest import write_tsv

from edge_tune.bank import PatchBank
from edge_tune.cli import main
from edge_tune.patch import load_patch
from edge_tune.profiles import list_profile_names


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("profile", list_profile_names())
def test_train_then_predict_on_every_profile(capsys, tmp_path, tsv, profile):
    out = tmp_path / "x.patch"
    code, stdout, _ = run(capsys, "train", "--method", "lora", "--profile", profile, "--data", str(tsv),
                          "--out", str(out), "--steps", "2", "--eval-every", "1")  # fmt: skip
    assert code == 0 and out.is_file() and "dev accuracy" in stdout and "MB budget" in stdout
    code, stdout, _ = run(capsys, "predict", "--patch", str(out), "a lovely film")
    label, prob = stdout.split("\t")[1:3]
    bank = PatchBank(precision=load_patch(out).manifest.base_precision)  # the same patch, through the library
    (want,) = bank.predict(["a lovely film"], patch=bank.load(out))
    assert code == 0 and (label, prob) == (want.label, f"{want.probability:.4f}")


@pytest.mark.parametrize("method", ["head", "bitfit", "ia3"])
def test_other_methods_and_eval(capsys, tmp_path, tsv, method):
    out = tmp_path / "m.patch"
    assert (
        run(capsys, "train", "--method", method, "--data", str(tsv), "--out", str(out), "--steps", "2")[0]
        == 0
    )
    code, stdout, _ = run(capsys, "eval", "--patch", str(out), "--data", str(tsv))
    assert code == 0 and stdout.startswith("accuracy ")


def test_caps_are_clamped_visibly(capsys, tmp_path, tsv):
    """Requests above the Pi Zero's caps (rank 8, batch 16, 64 tokens) are clamped with a warning each, and
    the written patch was trained with the clamped values."""
    from edge_tune.patch import load_patch

    out = tmp_path / "c.patch"
    code, _, err = run(capsys, "train", "--profile", "raspberry-pi-zero-2w", "--data", str(tsv), "--method", "lora",
                       "--rank", "64", "--batch-size", "64", "--seq-len", "200", "--out", str(out), "--steps", "1")  # fmt: skip
    assert code == 0
    assert "rank 64 is above profile 'raspberry-pi-zero-2w''s cap; using 8" in err
    assert "batch_size 64 is above profile 'raspberry-pi-zero-2w''s cap; using 16" in err
    assert "seq_len 200 is above profile 'raspberry-pi-zero-2w''s cap; using 64" in err
    m = load_patch(out).manifest
    assert m.hyper["rank"] == 8 and m.seq_len == 64 and m.metrics["batch_size"] == 16
    assert load_patch(out).tensors["encoder.layers.0.q.lora_A"].shape == (8, 384)


def test_profiles_table(capsys):
    code, out, _ = run(capsys, "profiles")
    assert code == 0 and "raspberry-pi-zero-2w" in out and "budget_mb" in out


def _synthetic_patch(base, path, fingerprint=None, poison=None, rank=4):
    import torch

    from edge_tune.methods import MethodSpec, delta_shapes
    from edge_tune.patch import Manifest, save_patch

    spec = MethodSpec("lora", rank=rank, alpha=8.0, targets=("q",))
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(sh, generator=g) for n, sh in delta_shapes(base.model, spec, 2).items()}
    if poison:
        tensors["head.bias"][0] = poison
    m = Manifest("lora", spec.hyper(), ["0", "1"], fingerprint or base.fingerprint, "int8", "", seq_len=64)
    save_patch(path, tensors, m)
    return path


def _bad_cases(tmp_path, tsv, base):
    out = str(tmp_path / "o.patch")
    good = ["--data", str(tsv), "--out", out, "--steps", "1"]

    def f(name, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return str(p)

    folder = tmp_path / "task"
    folder.mkdir()
    write_tsv(folder / "train.tsv")
    write_tsv(folder / "dev.tsv", [("1", "fine"), ("maybe", "hmm")])
    prof = 'name = "x"\nschema_version = 1\ndescription = "d"\nmemory_budget_mb = 500\nthreads = 2\nmax_batch_size = 8\nmax_rank = 4\nmax_seq_len = 64\nprecision = "int8"\nbackend = "cpu"\n'
    valid = _synthetic_patch(base, tmp_path / "valid.patch")
    vb = valid.read_bytes()
    return [
        # data
        (["train", "--data", str(tmp_path / "missing.tsv"), "--out", out], "no such file"),
        (["train", "--data", f("empty.tsv", b""), "--out", out], "empty file"),
        (["train", "--data", f("nh.tsv", b"1\tfine film\n0\tbad\n"), "--out", out], "header is"),
        (
            ["train", "--data", f("fields.tsv", b"label\tsentence\n1 fine\n"), "--out", out],
            r"expected 2 tab-separated .*fields.tsv:2\)",
        ),
        (
            ["train", "--data", f("onelabel.tsv", b"label\tsentence\n1\ta\n1\tb\n"), "--out", out],
            "only one label",
        ),
        (["train", "--data", f("latin1.tsv", b"label\tsentence\n1\tcaf\xe9\n"), "--out", out], "not UTF-8"),
        (["train", "--data", f("nolabel.tsv", b"label\tsentence\n\tfine\n"), "--out", out], "empty label"),
        (["train", "--data", str(folder), "--out", out], "label 'maybe' .* not one of the training labels"),
        (["train", "--data", "sst3", "--out", out], "unknown task or file 'sst3'"),
        # profile
        (["train", "--profile", "pi9", *good], "unknown profile 'pi9'"),
        (
            ["train", "--profile", f("typo.toml", prof.replace("threads", "threds").encode()), *good],
            "unknown key 'threds' .did you mean 'threads'",
        ),
        (["train", "--profile", f("syntax.toml", b"name = \n"), *good], "not valid TOML"),
        (
            ["train", "--profile", f("type.toml", prof.replace("= 2", '= "2"').encode()), *good],
            "threads must be a positive integer",
        ),
        (
            [
                "train",
                "--profile",
                f("ver.toml", prof.replace("schema_version = 1", "schema_version = 2").encode()),
                *good,
            ],
            "schema_version is 2",
        ),
        (
            ["train", "--profile", f("prec.toml", prof.replace("int8", "int3").encode()), *good],
            "precision must be one of",
        ),
        # arguments
        (["train", "--method", "dora", *good], "unknown method 'dora'"),
        (["train", "--method", "lora", "--targets", "q,zz", *good], "unknown LoRA target"),
        (["train", *good, "--steps", "0"], "--steps must be at least 1"),
        (["train", *good, "--lr", "-1"], "--lr must be a positive number"),
        (["train", *good, "--grad-accum", "99"], "--grad-accum must be between 1 and the batch size"),
        (["train", *good, "--batch-size", "0"], "batch_size must be at least 1"),
        (["train", *good, "--seq-len", "2"], "--seq-len must be at least 3"),
        (["train", *good, "--steps", "many"], "invalid int value: 'many'"),
        (["train", "--data", str(tsv)], "required: --out"),
        (
            ["train", "--data", str(tsv), "--out", str(tmp_path / "nodir" / "o.patch")],
            "folder does not exist",
        ),
        (["train", "--data", str(tsv), "--out", str(tmp_path)], "is a directory"),
        # output paths the OS refuses: the lock beside the patch is the first thing written
        (
            ["train", "--data", str(tsv), "--out", "/proc/x.patch"],
            r"cannot write beside the patch .*/proc/x.patch",
        ),
        (["train", "--data", str(tsv), "--out", "/dev/null/x.patch"], "folder does not exist|cannot write"),
        (["demo", "--steps", "1", "--out", "/dev/null/x/y.patch"], "cannot create the output folder"),
        (["predict", "--patch", str(valid)], "required: TEXT"),
        # patches
        (["predict", "--patch", f("trunc.patch", vb[: len(vb) // 3]), "hi"], "truncated|outside the file"),
        (["predict", "--patch", f("flip.patch", vb[:-3] + bytes([vb[-3] ^ 0x10]) + vb[-2:]), "hi"], "sha256"),
        (
            ["predict", "--patch", f("huge.patch", (1 << 40).to_bytes(8, "little") + vb[8:]), "hi"],
            "header claims",
        ),
        (
            ["predict", "--patch", f("pickle.patch", b"\x80\x04\x95\x10" + bytes(60)), "hi"],
            "header claims|too short",
        ),
        (
            ["predict", "--patch", str(_synthetic_patch(base, tmp_path / "other.patch", "a" * 64)), "hi"],
            "made for base",
        ),
        (
            [
                "predict",
                "--patch",
                str(_synthetic_patch(base, tmp_path / "nan.patch", poison=float("inf"))),
                "hi",
            ],
            "NaN or Inf",
        ),
        (["predict", "--patch", str(tmp_path / "none.patch"), "hi"], "no such patch file"),
        (["predict", "--patch", str(tmp_path), "hi"], "is a directory"),
        (
            ["eval", "--patch", str(valid), "--data", f("evalbad.tsv", b"label\tsentence\n7\tx\n")],
            "label '7'",
        ),
    ]


def test_bad_input_table(capsys, tmp_path, tsv, base_int8):
    cases = _bad_cases(tmp_path, tsv, base_int8)
    assert len(cases) >= 25
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    for argv, match in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors exit from inside
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, code, err)
        lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and re.search(match, lines[0]), (argv, err)
        assert "Traceback" not in err, argv
        if str(tmp_path) in lines[0]:  # the file at fault is named in the `(where)` slot
            assert re.fullmatch(rf"error: .+ \({re.escape(str(tmp_path))}[^)]*\)( — .+)?", lines[0]), lines[0]
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before, "a bad input created or changed a file"


def test_console_script_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "predict", "--patch", str(tmp_path / "x"), "t"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "sst2.patch"
    assert main(["demo", "--steps", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for field in ("SST-2 dev acc", "patch ", "KB", "swap (activate)", "peak RSS", "MB budget"):
        assert field in text, field
    assert out.is_file() and out.stat().st_size < 200 * 1024


def test_plan_verb_prints_the_itemised_plan(capsys, tmp_path):
    assert main(["plan", "--profile", "raspberry-pi-4-4gb", "--method", "lora", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    for part in ("runtime floor", "base weights", "activations", "predicted peak", "-> fits"):
        assert part in out, part
    # over budget at the asked batch: exit 1, the verdict, and the micro-batch `train` would run instead
    code = main(["plan", "--profile", str(_profile(tmp_path, 340)), "--method", "lora", "--batch", "32"])
    out = capsys.readouterr().out
    assert code == 1 and "-> does NOT fit" in out and "-> fits" not in out
    would = re.search(r"would run: micro-batch (\d+) x (\d+) accumulation.*: (\d+) MB$", out.strip())
    assert would and int(would[1]) < 32 <= int(would[1]) * int(would[2]) and int(would[3]) <= 340, out
    # nothing fits (an fp32 base needs ~290 MB before any batch): one error line, exit 2
    code = main(
        ["plan", "--profile", str(_profile(tmp_path, 250)), "--method", "lora", "--precision", "fp32"]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1 and "cannot fit 250 MB" in err[0]


def _profile(tmp_path, budget_mb: int):
    prof = tmp_path / f"budget{budget_mb}.toml"
    prof.write_text(
        f'name = "b{budget_mb}"\nschema_version = 1\ndescription = "d"\nmemory_budget_mb = {budget_mb}\n'
        'threads = 2\nmax_batch_size = 32\nmax_rank = 8\nmax_seq_len = 64\nprecision = "int8"\nbackend = "cpu"\n'
    )
    return prof


def test_doctor_names_every_op_and_the_tensor_cache(capsys):
    from edge_tune.kernels import load_kernels
    from edge_tune.ops import ALL_OPS

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for op in ALL_OPS:
        assert f"edge_tune::{op} " in out
    if load_kernels():  # the dynamic ops name the integer cores picked for this CPU
        line = next(ln for ln in out.splitlines() if "edge_tune::int8_linear_dynamic " in ln)
        assert any(
            f"{isa} int8 cores" in line for isa in ("scalar", "avx2", "avx512-vnni", "neon", "neon-dotprod")
        )
        # each op's line names the source file that registers its CPU kernel
        from edge_tune.kernels import CPP_DIR

        for op in ALL_OPS:
            line = next(ln for ln in out.splitlines() if f"edge_tune::{op} " in ln)
            src = line.split("C++ (cpp_ext/", 1)[1].split(",")[0].split(")")[0]
            assert f'm.impl("{op}"' in (CPP_DIR / src).read_text(), line
    cache_line = next(ln for ln in out.splitlines() if ln.startswith("tensor cache"))
    assert cache_line.split()[2].startswith("on," if load_kernels() else "off")


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, tsv):
    """Piped to a log, `edge-tune train` prints a progress line at the first and the last step (and every
    PROGRESS_SECONDS between), where a terminal gets the bar: never minutes of silence."""
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "train", "--data", str(tsv), "--method", "bitfit",
                        "--steps", "3", "--eval-every", "2", "--out", str(tmp_path / "p.patch")],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-1000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("train bitfit: step ")]
    assert [ln.split(",")[0] for ln in lines] == ["train bitfit: step 1/3", "train bitfit: step 3/3"], (
        p.stderr
    )
    assert "steps/s" in lines[-1] and re.search(r"dev [01]\.\d{4}", lines[-1]), lines[-1]


def test_profile_methods_all_is_the_registry(monkeypatch, tmp_path, capsys):
    """`edge-tune profile --methods all` (the default) runs every registered method; an unknown one is one
    line before any run."""
    import edge_tune.profiling as profiling
    from edge_tune.methods import METHODS

    asked = []
    monkeypatch.setattr(profiling, "profile_grid", lambda prof, methods, *a, **k: asked.append(methods) or [])
    assert main(["profile", "--precisions", "int8", "--out", str(tmp_path)]) == 0
    assert main(["profile", "--methods", "all", "--precisions", "int8", "--out", str(tmp_path)]) == 0
    assert asked == [list(METHODS), list(METHODS)]
    assert main(["profile", "--methods", "lora,dora", "--out", str(tmp_path)]) == 2
    assert "unknown method 'dora'" in capsys.readouterr().err and len(asked) == 2
