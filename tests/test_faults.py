"""Disk and concurrency faults on real file systems and real processes: a full disk, a read-only
folder, and two `edge-tune train` processes writing the same patch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_tune.errors import PatchError
from edge_tune.patch import Manifest, load_patch, save_patch


def _manifest(base) -> Manifest:
    return Manifest("head", {}, ["0", "1"], base.fingerprint, "int8", "")


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KB tmpfs: a real file system that runs out of space. Needs root (mount)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_old_patch_and_leaves_no_temp(small_fs, base_int8):
    from safetensors.torch import save

    path = small_fs / "task.patch"
    m = _manifest(base_int8)
    save_patch(path, {"head.weight": torch.randn(2, 384), "head.bias": torch.randn(2)}, m)
    old = path.read_bytes()
    # fill the disk but for 40 KB, then export a 150 KB patch (a real ENOSPC from the kernel)
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    (small_fs / "filler").write_bytes(b"\0" * (free - 40 * 1024))
    big = {"head.weight": torch.randn(2, 384), "head.bias": torch.randn(2), "x": torch.randn(100, 384)}
    with pytest.raises(PatchError, match=r"cannot write \(No space left on device\) \(.*task.patch\) — "):
        save_patch(path, big, m)
    assert path.read_bytes() == old
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "task.patch"]
    # a checkpoint goes through the same atomic writer
    from edge_tune.patch import atomic_write

    with pytest.raises(PatchError, match="No space left"):
        atomic_write(small_fs / "task.patch.ckpt", save(big))
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler", "task.patch"]


def test_read_only_folder_keeps_old_patch(small_fs, base_int8):
    path = small_fs / "task.patch"
    m = _manifest(base_int8)
    save_patch(path, {"head.weight": torch.randn(2, 384), "head.bias": torch.randn(2)}, m)
    old = path.read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(PatchError, match=r"Read-only file system"):
        save_patch(path, {"head.weight": torch.zeros(2, 384), "head.bias": torch.zeros(2)}, m)
    assert path.read_bytes() == old and [p.name for p in small_fs.iterdir()] == ["task.patch"]


def test_two_processes_same_output_one_wins(tmp_path, tsv, base_int8):
    """Two real `edge-tune train` processes race for one --out: one writes a valid patch, the other
    fails fast with a one-line error and leaves no file of its own."""
    out = tmp_path / "race.patch"
    argv = [sys.executable, "-m", "edge_tune.cli", "train", "--data", str(tsv), "--method", "bitfit",
            "--out", str(out), "--steps", "40", "--eval-every", "20"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    errors = [x for x in loser.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "another edge-tune run is writing this patch" in errors[0], loser
    assert "Traceback" not in loser
    assert load_patch(out, base_int8).manifest.method == "bitfit"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mine.tsv") == ["race.patch"]


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_patch(tmp_path):
    """A real `edge-tune train` killed with SIGKILL after a checkpoint landed, then rerun with --resume:
    the patch is bit-identical to an uninterrupted run's, the kernel released the lock with the process,
    and nothing the kill left (the lock file, a checkpoint's half-written temp file) nor the checkpoint
    outlives the finished run."""
    import signal
    import time

    from edge_tune.run import output_lock

    data = tmp_path / "sst2_part.tsv"
    lines = (Path(__file__).resolve().parent.parent / "data" / "sst2" / "dev.tsv").read_text().splitlines()
    data.write_text("\n".join(lines[:241]) + "\n", encoding="utf-8")  # header + 240 sentences

    def cmd(out, *extra):
        return [sys.executable, "-m", "edge_tune.cli", "train", "--data", str(data), "--method", "lora",
                "--steps", "40", "--batch-size", "8", "--eval-every", "4", "--patience", "100",
                "--checkpoint-every", "4", "--patch-dtype", "fp32", "--out", str(out), *extra]  # fmt: skip

    ref = tmp_path / "ref.patch"
    subprocess.run(cmd(ref), check=True, capture_output=True, timeout=600)
    out, ckpt = tmp_path / "killed.patch", tmp_path / "killed.patch.ckpt"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert ckpt.is_file() and not out.exists()
    assert (tmp_path / ".killed.patch.lock").exists()  # what a kill leaves: a file, but no lock
    with output_lock(out):  # the kernel released the flock with the process: a new writer gets it
        pass
    # what a kill during a checkpoint's write would have left: the next run on this --out clears it
    (tmp_path / ".killed.patch.ckpt.tmp-999999-1").write_bytes(b"half a checkpoint")
    resumed = subprocess.run(cmd(out, "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_patch(ref), load_patch(out)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert a.manifest.metrics["dev_accuracy"] == b.manifest.metrics["dev_accuracy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.patch", "ref.patch", "sst2_part.tsv"]
