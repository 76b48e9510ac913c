"""edge_tune as a library: importing it changes nothing process-wide, its modules import without cycles, and
the ops are a public API that runs the kernels from the first call."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# glibc's malloc marks a chunk it served with mmap by bit 2 of the size word before it. 100 KB is below the
# default threshold (128 KB, and it only grows) and above the 64 KB the entry points set; malloc carves such
# a block from the heap's free top while it has room, so 300 of them (30 MB) are taken to get past it.
_MMAPPED = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
def mmapped():
    ps = [libc.malloc(100 * 1024) for _ in range(300)]
    flags = [ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2 for p in ps]
    for p in ps:
        libc.free(ctypes.c_void_p(p))
    return any(flags)
"""


def _run(code: str, env_extra: dict | None = None) -> str:

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | (env_extra or {})
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout.strip()


def test_import_changes_nothing_process_wide():
    """`import edge_tune` leaves glibc's malloc, the environment and torch's allocator as they were, and
    loading a base (which loads the kernels) leaves the environment and the allocator; an entry point's
    apply_process_settings changes all three, which shows the probes see a change. (malloc is probed right
    after the import: once a base has loaded and freed its staging buffers, the heap's free top serves 30 MB
    whatever the threshold.)"""
    out = _run(
        _MMAPPED
        + """
import os, json
env = dict(os.environ)
import torch
import edge_tune
from edge_tune import rss
seen = [mmapped(), dict(os.environ) == env]
edge_tune.load_base()
seen += [dict(os.environ) == env, bool(rss.tensor_cache_stats().get("on"))]
print(json.dumps(seen))
"""
    )
    assert out.splitlines()[-1] == "[false, true, true, false]", out
    out = _run(
        _MMAPPED
        + """
import edge_tune, os
from edge_tune import rss
rss.apply_process_settings()
m = mmapped()
edge_tune.load_base()
env = [os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")]
print(m, *env, bool(rss.tensor_cache_stats().get("on")))
"""
    )
    cache = os.environ.get("EDGE_TUNE_KERNELS") != "0"  # the tensor cache is part of the compiled kernels
    assert out.splitlines()[-1] == f"True 1 false {cache}", out


def test_the_cli_sets_openmp_spin_before_torch_loads_unless_the_user_did():
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: importing the CLI sets it before its verbs
    import torch; a user's GOMP_SPINCOUNT or OMP_WAIT_POLICY wins; with torch loaded, nothing is set."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def spin(code: str, **extra: str) -> str:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=base | extra, cwd=ROOT
        )
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.strip()

    cli = "import os, sys, edge_tune.cli; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    assert spin(cli) == "30000 True"
    assert spin(cli, GOMP_SPINCOUNT="7") == "7 True"
    assert spin(cli, OMP_WAIT_POLICY="PASSIVE") == "None True"
    late = "import os, torch; from edge_tune.rss import set_openmp_spin as s; print(s(), os.environ.get('GOMP_SPINCOUNT'))"
    assert spin(late) == "False None"


def _imports(path: Path) -> set[str]:
    """edge_tune modules `path` imports, at module level or inside its functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edge_tune"):
            found.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
    return {m.split(".")[0] for m in found}


def test_no_import_cycles():
    """Imports between edge_tune's modules, deferred ones included, form no cycle: a layer never reaches up
    to one that builds on it (the planner does not call the trainer or the CLI, the kernels' loader does not
    know the ops)."""
    mods = {p.stem: _imports(p) for p in (ROOT / "edge_tune").glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2 or m not in mods:
            return
        state[m] = 1
        for dep in sorted(mods[m]):
            visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(mods):
        visit(m, [])


def test_an_op_runs_its_kernel_from_the_first_call():
    """After `import edge_tune.ops`, calling an op through torch.ops runs the C++ kernel (it loads on the first
    call), not the fp64 reference; with EDGE_TUNE_KERNELS=0 the reference runs and one line says why."""
    code = """
import torch, edge_tune.ops
from edge_tune.quant import quantize_int8
q, s = quantize_int8(torch.randn(64, 32))
x = torch.randn(3, 32)
torch.ops.edge_tune.int8_linear_dynamic(x, q, s, None)
print(torch._C._dispatch_has_kernel_for_dispatch_key("edge_tune::int8_linear_dynamic", "CPU"))
"""
    from edge_tune.kernels import load_kernels

    if load_kernels():
        assert _run(code).splitlines()[-1] == "True"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "EDGE_TUNE_KERNELS": "0"})  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr
    assert "forced off by EDGE_TUNE_KERNELS=0" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_the_wheel_installs_and_runs_from_another_folder(tmp_path):
    """The wheel carries the device profiles, the kernels' sources and the built-in tasks: built here, installed
    into a fresh venv, it runs `doctor`, `profiles` and a short `train` from a folder that is not the checkout.
    The wheel goes in without its dependencies, which the new venv borrows from this one through a .pth
    line (offline, and seconds instead of a torch install); the venv's own site-packages comes first, so
    edge_tune is the wheel's, checked below."""
    import shutil
    import sysconfig

    dist, venv, work, src = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere", tmp_path / "src"
    work.mkdir()
    # built from a copy: setuptools builds in the source tree (build/, *.egg-info), which is not a test's to litter
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", ".peers", "build", "out", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = dist.glob("edge_tune-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: without it pip uninstalls the edge_tune of the environment it runs in
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(venv), str(wheel)], check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGE_TUNE_PROFILES_DIR")}
    vpy = str(venv / "bin" / "python")

    def run(*argv):
        p = subprocess.run([vpy, *argv], capture_output=True, text=True, cwd=work, env=env, timeout=900)
        assert p.returncode == 0, (argv, p.stdout[-1000:], p.stderr[-2000:])
        return p.stdout

    where = run(
        "-c", "import edge_tune, edge_tune.resources as r; print(edge_tune.__file__, r.profiles_dir())"
    )
    assert all(str(venv) in w for w in where.split()), where
    cli = ["-m", "edge_tune.cli"]
    assert "C++ (cpp_ext/" in run(*cli, "doctor") or os.environ.get("EDGE_TUNE_KERNELS") == "0"
    assert "raspberry-pi-zero-2w" in run(*cli, "profiles")
    out = run(*cli, "train", "--data", "sst2", "--method", "bitfit", "--steps", "5", "--eval-every", "5",
              "--out", "sst2.patch")  # fmt: skip
    assert "wrote sst2.patch" in out and (work / "sst2.patch").is_file()
