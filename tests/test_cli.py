"""The CLI as a user meets it: every shipped profile trains on a user's TSV; bad input is one line, exit 2."""

import subprocess
import sys

import pytest
from conftest import write_tsv

from edge_tune.cli import main
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
    assert code == 0 and label in ("0", "1") and 0.5 <= float(prob) <= 1.0


@pytest.mark.parametrize("method", ["head", "bitfit"])
def test_other_methods_and_eval(capsys, tmp_path, tsv, method):
    out = tmp_path / "m.patch"
    assert (
        run(capsys, "train", "--method", method, "--data", str(tsv), "--out", str(out), "--steps", "2")[0]
        == 0
    )
    code, stdout, _ = run(capsys, "eval", "--patch", str(out), "--data", str(tsv))
    assert code == 0 and stdout.startswith("accuracy ")


def test_caps_are_clamped_visibly(capsys, tmp_path, tsv):
    code, _, err = run(capsys, "train", "--profile", "raspberry-pi-zero-2w", "--data", str(tsv), "--method", "lora",
                       "--rank", "64", "--batch-size", "64", "--out", str(tmp_path / "c.patch"), "--steps", "1")  # fmt: skip
    assert code == 0
    assert "rank 64 is above profile 'raspberry-pi-zero-2w''s cap; using 8" in err
    assert "batch_size 64 is above" in err


def test_profiles_table(capsys):
    code, out, _ = run(capsys, "profiles")
    assert code == 0 and "raspberry-pi-zero-2w" in out and "budget_mb" in out


def _bad_cases(tmp_path, tsv):
    good = ["--data", str(tsv), "--out", str(tmp_path / "o.patch"), "--steps", "1"]
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    noheader = write_tsv(tmp_path / "nh.tsv", header="1\tfine film")
    badprof = tmp_path / "bad.toml"
    badprof.write_text('name = "x"\nthreds = 2\n')
    trunc = tmp_path / "trunc.patch"
    trunc.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    return [
        (
            ["train", "--data", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "o.patch")],
            "no such file",
        ),
        (["train", "--data", str(empty), "--out", str(tmp_path / "o.patch")], "empty file"),
        (["train", "--data", str(noheader), "--out", str(tmp_path / "o.patch")], "header is"),
        (["train", "--method", "dora", *good], "unknown method 'dora'"),
        (["train", "--profile", "pi9", *good], "unknown profile 'pi9'"),
        (["train", "--profile", str(badprof), *good], "unknown key 'threds'"),
        (
            ["train", "--data", str(tsv), "--out", str(tmp_path / "nodir" / "o.patch")],
            "folder does not exist",
        ),
        (["train", "--data", str(tsv), "--out", str(tmp_path)], "is a directory"),
        (["predict", "--patch", str(trunc), "hi"], "header claims|too short|corrupt"),
        (["predict", "--patch", str(tmp_path / "none.patch"), "hi"], "no such patch file"),
    ]


def test_bad_input_is_one_line(capsys, tmp_path, tsv):
    for argv, match in _bad_cases(tmp_path, tsv):
        code, out, err = run(capsys, *argv)
        lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and __import__("re").search(match, lines[0]), (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.patch").exists()
    assert not list(tmp_path.glob(".*tmp*")), "a temp file was left behind"


def test_console_script_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "predict", "--patch", str(tmp_path / "x"), "t"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr
