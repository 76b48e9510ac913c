"""Where the files that ship with edge_tune are: the device profiles, the kernels' sources and the built-in
tasks. In the source tree they sit beside edge_tune/ (device_profiles/, cpp_ext/, data/); installed, they
are the resource packages edge_tune.device_profiles, edge_tune.cpp_ext and edge_tune.tasks (pyproject's
package-dir), found through importlib.resources in a wheel and an editable install alike."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _folder(package: str) -> Path:
    # A regular package on disk (wheels install unzipped): its folder is a real path, which the kernel build
    # and the TSV and TOML readers need.
    return Path(str(files(package)))


def profiles_dir() -> Path:
    """The shipped device profiles (*.toml)."""
    return _folder("edge_tune.device_profiles")


def kernel_sources_dir() -> Path:
    """The C++ / CUDA sources of the kernels (*.cpp, *.cu, *.h)."""
    return _folder("edge_tune.cpp_ext")


def tasks_dir() -> Path:
    """The built-in tasks: one folder each (sst2, cr, subj, mpqa) with train.tsv and dev.tsv."""
    return _folder("edge_tune.tasks")
