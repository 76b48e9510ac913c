"""Disk and concurrency faults on real file systems and real processes: a full disk, a read-only
folder, and two `edge-tune train` processes writing the same patch."""

import os
import subprocess
import sys

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
