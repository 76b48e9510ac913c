"""Fuzz the loaders that take user files: patches, profile TOMLs and data TSVs. Each case mutates a valid
file (truncation, bit flips, huge header lengths, appended bytes, wrong types, unicode, empty lines, CRLF)
and the only allowed outcomes are success or the project's own error with a one-line message.

    python tools/fuzz.py --minutes 5          # the long run; the test suite runs a bounded sample
"""

from __future__ import annotations

import argparse
import logging
import random
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge_tune.errors import EdgeTuneError  # noqa: E402

PROFILE = (
    Path(__file__).resolve().parent.parent / "device_profiles" / "raspberry-pi-zero-2w.toml"
).read_text()
TSV = "label\tsentence\n1\ta fine film .\n0\ta dull , lifeless mess .\n1\tgreat fun\n0\tbad\n"
ODD = [
    "\r\n",
    "\n\n",
    "\t",
    "\x00",
    "é",
    "日本",
    "\ufeff",
    "'",
    '"',
    "[",
    "]",
    "=",
    "-1",
    "1e309",
    "nan",
    "true",
    " ",
]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(7)
    if kind == 0 and b:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1 and b:  # flip bits, header or body
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 200)) if rng.random() < 0.5 else rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # header length claiming gigabytes, or anything
        return struct.pack("<Q", rng.choice([1 << 40, 1 << 62, len(b), 0, 7])) + bytes(b[8:])
    if kind == 3:  # appended bytes
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == 4:  # a pickle or random junk instead
        return rng.choice(
            [b"\x80\x04\x95" + bytes(40), bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))]
        )
    if kind == 5 and b:  # splice: duplicate or delete a span
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        return bytes(b[:i] + b[j:]) if rng.random() < 0.5 else bytes(b[:j] + b[i:j] + b[j:])
    return bytes(b)


def mutate_text(text: str, rng: random.Random) -> str:
    if rng.random() < 0.3:
        return mutate_bytes(text.encode(), rng).decode("utf-8", errors=rng.choice(["ignore", "replace"]))
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(lines)) if lines else 0
        op = rng.randrange(5)
        if op == 0 and lines:
            del lines[i]
        elif op == 1:
            lines.insert(i, rng.choice(ODD) + "\n")
        elif op == 2 and lines:
            pos = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + rng.choice(ODD) + lines[i][pos:]
        elif op == 3 and lines:  # swap a value's type
            lines[i] = lines[i].replace("400", '"400"').replace('"int8"', "8").replace("0\t", "2\t")
        else:
            lines = [ln.replace("\n", "\r\n") for ln in lines]
    return "".join(lines)


def patch_target(workdir: Path) -> Callable[[random.Random], None]:
    from edge_tune.base import load_base
    from edge_tune.methods import MethodSpec, apply_method, delta_shapes
    from edge_tune.patch import Manifest, load_patch, save_patch

    base = load_base(precision="int8")
    spec = MethodSpec("lora", rank=4, alpha=8.0, targets=("q",))
    apply_method(base.model, spec)
    import torch

    tensors = {n: torch.randn(s) for n, s in delta_shapes(base.model, spec, 2).items()}
    seeds = []
    for dtype in (torch.float32, torch.float16):  # both stored precisions
        good = workdir / "good.patch"
        save_patch(
            good, tensors, Manifest("lora", spec.hyper(), ["0", "1"], base.fingerprint, "int8", ""), dtype
        )
        seeds.append(good.read_bytes())
    path = workdir / "case.patch"

    def case(rng: random.Random) -> None:
        data = rng.choice(seeds)
        if rng.random() < 0.1:  # a dtype name swapped in the header: sizes or values no longer agree
            old, new = rng.choice(
                [(b'"F32"', b'"F16"'), (b'"F16"', b'"F32"'), (b'"F32"', b'"I32"'), (b'"F16"', b'"BF16"')]
            )
            data = data.replace(old, new, rng.randint(1, 3))
        path.write_bytes(mutate_bytes(data, rng))
        load_patch(path, base, max_rank=8)

    return case


def profile_target(workdir: Path) -> Callable[[random.Random], None]:
    from edge_tune.profiles import parse_profile

    return lambda rng: parse_profile(mutate_text(PROFILE, rng), "fuzz.toml")


def tsv_target(workdir: Path) -> Callable[[random.Random], None]:
    from edge_tune.data import read_tsv

    path = workdir / "case.tsv"

    def case(rng: random.Random) -> None:
        path.write_bytes(mutate_text(TSV, rng).encode("utf-8", errors="surrogatepass"))
        read_tsv(path)

    return case


TARGETS = {"patch": patch_target, "profile": profile_target, "tsv": tsv_target}


def fuzz(
    target: str, *, cases: int | None = None, seconds: float | None = None, seed: int = 0
) -> tuple[int, list[str]]:
    """Run one target; returns (cases tried, descriptions of unexpected outcomes)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        run = TARGETS[target](Path(d))
        tried, bad, t_end = 0, [], time.monotonic() + (seconds or 1e9)
        while (cases is None or tried < cases) and time.monotonic() < t_end:
            tried += 1
            try:
                run(rng)
            except EdgeTuneError as e:
                if "\n" in str(e) or not str(e):
                    bad.append(f"case {tried}: multi-line or empty message: {str(e)[:200]!r}")
            except Exception:  # noqa: BLE001 - anything else is a finding
                bad.append(f"case {tried}: {traceback.format_exc(limit=3)}")
    return tried, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--minutes", type=float, default=1.0, help="total wall time, split across targets (default 1)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.getLogger("edge_tune").setLevel(logging.ERROR)  # skipped-row warnings are expected outcomes here
    per = args.minutes * 60 / len(TARGETS)
    total_bad = 0
    print(f"{'target':<8} {'cases':>8} {'unexpected':>10}")
    for name in TARGETS:
        tried, bad = fuzz(name, seconds=per, seed=args.seed)
        total_bad += len(bad)
        print(f"{name:<8} {tried:>8} {len(bad):>10}")
        for b in bad[:5]:
            print("   ", b.strip().replace("\n", "\n    "))
    print(f"unexpected exceptions: {total_bad}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
