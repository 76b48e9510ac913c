"""The compiled kernels of cpp_ext/: built on first use, cached, loaded behind the edge_tune:: op names.

Build: `torch.utils.cpp_extension.load` (ninja), into `$TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions) under a name that hashes the sources and the torch version, so an edit or a
torch upgrade rebuilds and a cached build loads with `torch.ops.load_library` alone (no compiler import).
No compiler, a failed build, or `EDGE_TUNE_KERNELS=0`: one log line, and the ops keep their pure-PyTorch
references (op_references.py), which compute the same results.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
from pathlib import Path

import torch

from .resources import kernel_sources_dir

log = logging.getLogger("edge_tune")

KERNELS_ENV = "EDGE_TUNE_KERNELS"  # "0": never build or load the C++ kernels
CPP_DIR = kernel_sources_dir()
CPU_SOURCES = [
    CPP_DIR / f
    for f in (
        "cpu_kernels.cpp",
        "cpu_dynamic.cpp",
        "cpu_int4_dynamic.cpp",
        "cpu_lora.cpp",
        "cpu_attention.cpp",
        "cpu_encoder_layer.cpp",
        "cpu_half_saved.cpp",
        "cpu_allocator.cpp",
    )
]
CUDA_SOURCES = [CPP_DIR / "cuda_kernels.cu"]  # built too where torch has CUDA
CFLAGS = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for then follows torch.get_num_threads()
_state: dict = {"loaded": None, "reason": ""}
_lock = threading.RLock()  # one build and one load, whichever thread gets there first
_loaders: list = []  # the torch.library registrations of install_first_call_loaders, while they stand


def install_first_call_loaders(names: list[str]) -> None:
    """Give each op's CPU slot a stand-in that loads the kernels on the op's first call and then calls it
    again, so `torch.ops.edge_tune.<op>(...)` runs the kernel whenever one is built or can be (or the
    reference, with one log line saying why), not the reference until something else happens to load them.
    load_kernels removes the stand-ins before the kernels register in their place."""
    if _state["loaded"] is not None or _loaders:
        return
    lib = torch.library.Library("edge_tune", "IMPL")  # noqa: TOR901  (custom_op would import torch._dynamo)

    def stand_in(name: str):
        def first_call(*args):
            load_kernels()
            return getattr(torch.ops.edge_tune, name).default(*args)

        return first_call

    for name in names:
        lib.impl(name, stand_in(name), "CPU")
    _loaders.append(lib)


def _drop_loaders() -> None:
    while _loaders:
        _loaders.pop()._destroy()


def _sources() -> list[Path]:
    return CPU_SOURCES + (CUDA_SOURCES if torch.cuda.is_available() else [])


def _build_name() -> str:
    h = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode())
    for src in [*_sources(), *sorted(CPP_DIR.glob("*.h"))]:
        h.update(src.read_bytes())
    return f"edge_tune_kernels_{h.hexdigest()[:12]}"


def _build_dir(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return Path(root) / name


def load_kernels() -> bool:
    """Build (first time) and load the CPU kernels; True if the edge_tune:: ops now run them."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            _drop_loaders()
            _state["loaded"] = _load()
    return _state["loaded"]


def _load() -> bool:
    loaded = False
    if os.environ.get(KERNELS_ENV, "1") == "0":
        _state["reason"] = f"forced off by {KERNELS_ENV}=0"
        log.warning("edge_tune: C++ kernels off (%s); using the PyTorch reference ops", _state["reason"])
        return False
    try:
        if not all(s.is_file() for s in _sources()):
            raise FileNotFoundError(f"{CPP_DIR} is not shipped with this install")
        # the op schemas (ops.py) exist: importing any edge_tune module imported the package, which defines them
        name = _build_name()
        so = _build_dir(name) / f"{name}.so"
        if not so.is_file():
            # Built in a child process: torch.utils.cpp_extension imports torch._dynamo and sympy (~57 MB
            # RSS), which must not land in a training process that has a memory budget to keep.
            log.warning("edge_tune: building the C++ kernels once (~1 min) into %s", so.parent)
            import subprocess

            p = subprocess.run([sys.executable, "-m", "edge_tune.kernels", "--build"], capture_output=True,
                               text=True)  # fmt: skip
            if p.returncode or not so.is_file():
                raise RuntimeError((p.stderr.strip().splitlines() or ["the kernel build failed"])[-1])
        torch.ops.load_library(str(so))
        loaded = True
        from .rss import process_settings_applied, start_tensor_cache

        if process_settings_applied():  # the allocator is the entry points' to change, not a library's
            start_tensor_cache()
    except Exception as e:  # any build or load failure: the references still work
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        _state["reason"] = f"{e.__class__.__name__}: {first}"
        log.warning(
            "edge_tune: C++ kernels unavailable (%s); using the PyTorch reference ops", _state["reason"]
        )
    return loaded


def fallback_reason() -> str:
    """Why the references run instead of the kernels ('' when the kernels are loaded)."""
    load_kernels()
    return _state["reason"]


def _registered(source: Path) -> set[str]:
    """The op names a kernel source registers (its `m.impl("name", ...)` lines)."""
    return set(re.findall(r'm\.impl\("(\w+)"', source.read_text())) if source.is_file() else set()


def kernel_paths(op_names: list[str]) -> dict[str, str]:
    """Which implementation each of the edge_tune:: ops `op_names` runs now (for `edge-tune doctor`): the
    file that registers its CPU kernel, read from the sources themselves."""
    loaded = load_kernels()
    if not loaded:
        return {name: f"PyTorch reference ({fallback_reason()})" for name in op_names}
    where = {name: src.name for src in CPU_SOURCES for name in _registered(src)}
    # the dynamic ops' integer cores (cpp_ext/int8_panels.h), as picked for this CPU at load, and the
    # fp16-saved activations' path
    detail = {"cpu_dynamic.cpp": f", {torch.ops.edge_tune.int8_isa()} int8 cores",
              "cpu_int4_dynamic.cpp": f", {torch.ops.edge_tune.int8_isa()} int8 cores",
              "cpu_half_saved.cpp": f", {torch.ops.edge_tune.half_saved_isa()} path"}  # fmt: skip
    cuda_ops = _registered(CUDA_SOURCES[0]) if torch.cuda.is_available() else None

    def cuda(name: str) -> str:
        if cuda_ops is None:
            return ""
        # without a CUDA kernel, the op's reference (torch ops) runs on CUDA tensors
        return (
            "; CUDA tensors: CUDA (cpp_ext/cuda_kernels.cu)"
            if name in cuda_ops
            else "; CUDA tensors: PyTorch reference"
        )

    out = {}
    for name in op_names:
        src = where.get(name)
        cpu = f"C++ (cpp_ext/{src}{detail.get(src, '')})" if src else "PyTorch reference (no C++ kernel)"
        out[name] = cpu + cuda(name)
    return out


def _put_ninja_on_path() -> None:
    """torch's extension build runs `ninja` from PATH; the `ninja` package (a dependency) installs it beside
    the venv's python, which is not on PATH when the venv is not activated (`.venv/bin/python -m ...`)."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja  # the PyPI package: a ninja binary in ninja.BIN_DIR
    except ImportError:
        raise RuntimeError("ninja not found: `pip install ninja` (the kernel build needs it)") from None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build() -> None:
    _put_ninja_on_path()
    from torch.utils.cpp_extension import load

    _drop_loaders()  # load() registers the built kernels in this process too
    name = _build_name()
    out = _build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    load(name, [str(s) for s in _sources()], extra_cflags=CFLAGS, build_directory=str(out), is_python_module=False,
         verbose=False)  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m edge_tune.kernels --build   (`edge-tune doctor` shows what each op runs)")
    _build()
