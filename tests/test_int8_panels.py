"""The integer cores of cpp_ext/int8_panels.h (x86 AVX2 / AVX-512 VNNI, ARM NEON / dotprod, scalar) against
a triple loop, by tests/int8_panels_check.cpp: built natively, and cross-compiled for AArch64 and run under
qemu-aarch64 as two CPUs, a Cortex-A72 (ARMv8.0, Raspberry Pi 4: no sdot) and qemu's `max` (sdot). The ARM
checks need Debian's g++-aarch64-linux-gnu and qemu-user (.ci/run installs them where it can); without
them they skip. Also: the whole extension compiles for AArch64."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "int8_panels_check.cpp"
CROSS = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64")
needs_arm = pytest.mark.skipif(
    CROSS is None or QEMU is None,
    reason="no AArch64 cross compiler or qemu-aarch64 (Debian: g++-aarch64-linux-gnu, qemu-user)",
)


def _lines(out: str) -> dict[str, str]:
    """'best avx2' / 'neon 100 cases 0 wrong' / 'avx2 unsupported' -> {name: rest}."""
    return dict(ln.split(" ", 1) for ln in out.strip().splitlines())


def _build(cxx: str, out: Path, *flags: str) -> Path:
    p = subprocess.run([cxx, "-O3", "-std=c++17", "-Wall", "-Werror", *flags, str(CHECK), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_int8_cores_of_this_cpu_match_the_triple_loop(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    p = subprocess.run([_build(cxx, tmp_path / "check")], capture_output=True, text=True, timeout=300)
    got = _lines(p.stdout)
    assert p.returncode == 0, p.stdout
    assert got["scalar"].endswith(" 0 wrong")
    assert got[got["best"]].endswith(" 0 wrong") and int(got[got["best"]].split()[0]) > 100_000


@needs_arm
@pytest.mark.parametrize(
    ("cpu", "best", "absent"), [("cortex-a72", "neon", "neon-dotprod"), ("max", "neon-dotprod", None)]
)
def test_arm_int8_cores_match_the_triple_loop_under_qemu(tmp_path, cpu, best, absent):
    exe = _build(CROSS, tmp_path / "check", "-static")
    p = subprocess.run([QEMU, "-cpu", cpu, str(exe)], capture_output=True, text=True, timeout=300)
    got = _lines(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    assert got["best"] == best
    assert got["neon"].endswith(" 0 wrong") and got["scalar"].endswith(" 0 wrong")
    assert got["avx2"] == "unsupported"
    if absent:
        assert got[absent] == "unsupported"
    else:
        assert got["neon-dotprod"].endswith(" 0 wrong")


@needs_arm
def test_extension_compiles_for_aarch64(tmp_path):
    """Every CPU source of the extension compiles (to objects: target-attribute errors only show in code
    generation) for AArch64 against this torch's headers, with the build's flags. Linking needs an AArch64
    libtorch, which is not here."""
    import torch.utils.cpp_extension as ce

    from edge_tune.kernels import CFLAGS, CPU_SOURCES

    includes = [f"-I{p}" for p in ce.include_paths()]

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        obj = tmp_path / f"{src.stem}.o"
        cmd = [CROSS, "-c", "-fPIC", "-std=c++20", *CFLAGS, *includes, str(src), "-o", str(obj)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(2) as pool:
        for src, p in zip(CPU_SOURCES, pool.map(compile_one, CPU_SOURCES), strict=True):
            errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
            assert p.returncode == 0, f"{src.name}: " + ("\n".join(errors[:10]) or p.stderr[-2000:])
