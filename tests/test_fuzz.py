"""A bounded sample of tools/fuzz.py: mutated patches, profiles and TSVs only ever succeed or raise our
one-line error."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz  # noqa: E402


@pytest.mark.parametrize(("target", "cases"), [("patch", 300), ("profile", 500), ("tsv", 500)])
def test_fuzz_sample(target, cases):
    tried, bad = fuzz.fuzz(target, cases=cases, seed=1)
    assert tried == cases
    assert not bad, "\n".join(bad[:3])


def test_pickle_renamed_to_patch_is_never_unpickled(tmp_path):
    import os
    import pickle

    from edge_tune.errors import PatchError
    from edge_tune.patch import load_patch

    sentinel = tmp_path / "sentinel"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    path = tmp_path / "evil.patch"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PatchError):
        load_patch(path)
    torch_style = tmp_path / "evil2.patch"
    import torch

    torch.save({"x": Evil()}, torch_style)
    with pytest.raises(PatchError):
        load_patch(torch_style)
    assert not sentinel.exists()
