"""Crash safety: a run killed after a checkpoint and resumed ends bit-identical to an uninterrupted run;
non-finite steps are skipped and, repeated, stop the run with the best patch intact; writers exclude."""

import copy

import pytest
import torch

import edge_tune.train as train_mod
from edge_tune.errors import EdgeTuneError
from edge_tune.methods import MethodSpec
from edge_tune.train import TrainConfig, train


class Killed(Exception):
    pass


def _cfg(**kw):
    base = dict(
        method=MethodSpec("lora", rank=4, alpha=8.0), batch_size=4, steps=9, lr=1e-2, eval_every=3, seed=3
    )
    return TrainConfig(**(base | kw))


@pytest.mark.parametrize("kill_after_saves", [1, 2, 3])
def test_resume_after_kill_is_bit_identical(base_int8, tiny_ds, tmp_path, monkeypatch, kill_after_saves):
    ref = train(copy.deepcopy(base_int8), tiny_ds, tiny_ds, _cfg(), progress=False)

    ckpt = tmp_path / "run.ckpt"
    real_save, saves = train_mod.save_checkpoint, []

    def save_then_die(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == kill_after_saves:
            raise Killed  # the process "dies" right after a checkpoint landed

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train(copy.deepcopy(base_int8), tiny_ds, tiny_ds, _cfg(), False, ckpt, checkpoint_every=2)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train(
        copy.deepcopy(base_int8), tiny_ds, tiny_ds, _cfg(), False, ckpt, resume=True, checkpoint_every=2
    )
    assert resumed.steps == ref.steps and resumed.best_step == ref.best_step
    for n in ref.tensors:
        assert torch.equal(ref.tensors[n], resumed.tensors[n]), n


def test_resume_with_other_settings_is_refused(base_int8, tiny_ds, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    train(copy.deepcopy(base_int8), tiny_ds, tiny_ds, _cfg(steps=12), False, ckpt, checkpoint_every=2)
    assert ckpt.is_file()
    with pytest.raises(EdgeTuneError, match="other settings .*config.* rerun with the same flags"):
        train(copy.deepcopy(base_int8), tiny_ds, tiny_ds, _cfg(steps=12, lr=5e-3), False, ckpt, resume=True)


def test_nonfinite_steps_are_skipped_then_stop(base_int8, tiny_ds, monkeypatch):
    b = copy.deepcopy(base_int8)
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(logits, target, **kw):
        calls["n"] += 1
        loss = real(logits, target, **kw)
        return loss * float("nan") if calls["n"] > 4 else loss  # steps 5.. diverge

    monkeypatch.setattr(train_mod.F, "cross_entropy", poisoned)
    r = train(b, tiny_ds, tiny_ds, _cfg(eval_every=2, steps=20), progress=False)
    assert "non-finite steps in a row" in r.stop_reason and r.steps == 7
    assert all(torch.isfinite(t).all() for t in r.tensors.values()) and r.best_step == 4


def test_second_writer_fails_fast(tmp_path):
    from edge_tune.adapt import output_lock

    out = tmp_path / "x.patch"
    with (
        output_lock(out),
        pytest.raises(EdgeTuneError, match="another edge-tune run is writing"),
        output_lock(out),
    ):
        pass
    with output_lock(out):  # released: a later run may write
        pass
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    import errno
    import os

    from edge_tune.errors import PatchError
    from edge_tune.patch import atomic_write

    path = tmp_path / "p.patch"
    atomic_write(path, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(PatchError, match="No space left on device"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["p.patch"]


def test_memory_watchdog_stops_cleanly_with_a_valid_patch(base_int8, tiny_ds, tmp_path):
    from edge_tune.patch import Manifest, load_patch, save_patch

    b = copy.deepcopy(base_int8)
    r = train(b, tiny_ds, tiny_ds, _cfg(memory_budget_mb=1.0, steps=9), progress=False)
    assert "memory watchdog" in r.stop_reason and r.steps == 1
    m = Manifest(
        "lora", {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]}, ["0", "1"], b.fingerprint, "int8", ""
    )
    save_patch(tmp_path / "w.patch", r.tensors, m)
    assert load_patch(tmp_path / "w.patch", b).tensors.keys() == r.tensors.keys()
