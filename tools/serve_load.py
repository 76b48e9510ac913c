"""Load `edge-tune serve` on loopback: N concurrent clients, each sending 1-sentence requests for one of the
task patches (client i asks for patch i mod P), for a bounded time, with cross-request batching on and off,
each service in its own process (fresh, so its peak RSS is its own). While the largest load runs, one
patch is reloaded from its file and re-activated every second, and a bad request is sent every second.

Checks, per service: failed requests, answers naming a patch other than the one asked for, the reloaded
patches' answers against a fresh process's (probes sent one at a time), peak RSS (VmHWM) against the
profile's budget, the bad requests' latency, and from the service's /metrics its passes (sentences a
pass, ms a pass computing, and the share of the wall time some pass was computing). Prints a table and
writes a PNG of throughput and p99 latency against clients.

    python tools/serve_load.py --patches DIR [--clients 1,2,4,8,16] [--seconds 60] [--sweep-seconds 10]
                               [--paired-rounds 3] [--paired-seconds 10]
                               [--profile raspberry-pi-4-4gb] [--window-ms MS] [--out out/serve_load]

The two modes' main runs are minutes apart; the paired rounds (both services up, the largest load
alternating between them) give the throughput ratio with the machine's drift shared.

The clients share the 2 cores with the service (one asyncio process): figures are of the pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from local_postgres import free_port  # noqa: E402

SST2_DEV = ROOT / "data" / "sst2" / "dev.tsv"
BAD = [b"{not json", b'{"texts": []}', b'{"texts": ["x"], "patch": "nope"}', b'{"texts": "x"}']


def start(
    patches: Path, profile: str, batching: bool, threads: int | None = None, window_ms: float | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edge_tune.cli", "serve", "--patches", str(patches), "--profile", profile,
           "--port", str(port)] + ([] if batching else ["--no-batching"])  # fmt: skip
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--window-ms", str(window_ms)] if window_ms is not None and batching else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"error: the service exited: {proc.stdout.read().strip().splitlines()[-1]}")
            time.sleep(0.2)
    proc.kill()
    sys.exit("error: the service did not start within 120 s")


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def import_cost_mb(module: str) -> float:
    """Peak RSS of a fresh Python that imports `module` (and starts nothing) less a bare one's, MB."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's at fork and survives exec
    code = "{}; print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    peak = [int(subprocess.run([sys.executable, "-c", code.format(imp)], capture_output=True, text=True,
                               check=True).stdout) for imp in ("pass", f"import {module}")]  # fmt: skip
    return (peak[1] - peak[0]) / 1024


async def pass_totals(http: aiohttp.ClientSession) -> tuple[float, float, float]:
    """The service's passes so far, from /metrics: (passes, sentences, seconds computing)."""
    async with http.get("/metrics") as r:
        text = await r.text()
    get = lambda k: float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(k + " ")))  # noqa: E731
    return (
        get("edge_tune_pass_sentences_count"),
        get("edge_tune_pass_sentences_sum"),
        get("edge_tune_pass_seconds_sum"),
    )


async def run_load(url: str, names: list[str], texts: list[str], clients: int, seconds: float,
                   churn: bool, folder: Path) -> dict:  # fmt: skip
    lat, failed, wrong, bad_ms, reloads = [], 0, 0, [], 0
    stop = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(url, connector=conn) as http:

        async def client(i: int) -> None:
            nonlocal failed, wrong
            rng, name = random.Random(i), names[i % len(names)]
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                async with http.post("/v1/predict", json={"texts": [rng.choice(texts)], "patch": name}) as r:
                    body = await r.json()
                if r.status != 200:
                    failed += 1
                    continue
                lat.append(time.perf_counter() - t0)
                wrong += sum(a["patch"] != name for a in body["results"])

        async def churner() -> (
            None
        ):  # reload + re-activate a patch from its file, and one bad request, a second
            nonlocal failed, reloads
            k = 0
            while time.monotonic() < stop - 1:
                name = names[k % len(names)]
                for path, body in (("/v1/patches", {"file": f"{name}.patch", "name": name}),
                                   (f"/v1/patches/{name}/activate", None)):  # fmt: skip
                    async with http.post(path, json=body) as r:
                        failed += r.status not in (200, 201)
                reloads += 1
                t0 = time.perf_counter()
                async with http.post("/v1/predict", data=BAD[k % len(BAD)]) as r:
                    await r.read()
                    failed += r.status < 400
                bad_ms.append((time.perf_counter() - t0) * 1000)
                k += 1
                await asyncio.sleep(1.0)

        before, t0 = await pass_totals(http), time.perf_counter()
        await asyncio.gather(*[client(i) for i in range(clients)], *([churner()] if churn else []))
        wall = time.perf_counter() - t0
        passes, sentences, busy = (b - a for a, b in zip(before, await pass_totals(http), strict=True))
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(lat), "rps": len(lat) / wall, "p50_ms": q(0.5), "p99_ms": q(0.99),
            "failed": failed, "wrong_patch": wrong, "reloads": reloads, "sentences_per_pass": sentences / max(passes, 1),
            "ms_per_pass": busy / max(passes, 1) * 1000, "busy": busy / wall,
            "bad_ms_max": max(bad_ms) if bad_ms else None}  # fmt: skip


async def probe(url: str, names: list[str], texts: list[str]) -> list:
    """Each probe text under each patch, one request at a time (a pass of one, the same in any process)."""
    out = []
    async with aiohttp.ClientSession(url) as http:
        for name in names:
            for t in texts:
                async with http.post("/v1/predict", json={"texts": [t], "patch": name}) as r:
                    a = (await r.json())["results"][0]
                out.append((name, a["label"], a["probability"]))
    return out


def paired_ratios(folder: Path, args, names: list[str], texts: list[str], clients: int) -> list[float]:
    """Both services up at once, the load alternating between them in slices of `args.paired_seconds`
    (`args.paired_rounds` each, the order swapped every round): batching on / off throughput per round.
    The main runs measure the two modes minutes apart, and this machine's speed drifts over minutes."""
    procs = {b: start(folder, args.profile, b, args.threads, args.window_ms) for b in (False, True)}
    ratios = []
    try:
        for k in range(args.paired_rounds):
            rps = {}
            for b in (False, True) if k % 2 == 0 else (True, False):
                row = asyncio.run(
                    run_load(procs[b][1], names, texts, clients, args.paired_seconds, False, folder)
                )
                rps[b] = row["rps"]
            ratios.append(rps[True] / rps[False])
            print(f"paired round {k + 1}: on {rps[True]:.1f} / off {rps[False]:.1f} req/s = {ratios[-1]:.2f}x",
                  flush=True)  # fmt: skip
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(30)
    return ratios


PASS_SIZES = (1, 2, 4, 8, 16)


def pass_cost(folder: Path, profile: str, threads: int | None, rounds: int = 5, reps: int = 12) -> dict:
    """In this process (run it in a fresh one): a mixed-patch pass's ms against its sentences, the median
    of each size over `rounds` interleaved rounds, and the least-squares line ms = fixed + per_sentence x n.
    The line bounds what batching can save: a sentence alone costs fixed + per_sentence, in a full pass
    little more than per_sentence."""
    from edge_tune.rss import set_openmp_spin

    set_openmp_spin()  # before torch loads, as `edge-tune serve` (the CLI) does
    from edge_tune.bank import PatchBank
    from edge_tune.profiles import load_profile
    from edge_tune.trainer import set_threads

    set_threads(load_profile(profile), threads)
    bank = PatchBank.from_profile(profile)
    names = [bank.load(path, name=path.stem) for path in sorted(folder.glob("*.patch"))]
    texts = [ln.split("\t", 1)[1] for ln in SST2_DEV.read_text().splitlines()[1:]]
    rng, times = random.Random(0), {n: [] for n in PASS_SIZES}
    for r in range(rounds + 1):  # round 0 warms up
        for n in PASS_SIZES:
            for _ in range(reps):
                batch, first = [rng.choice(texts) for _ in range(n)], rng.randrange(len(names))
                t0 = time.perf_counter()
                bank.predict(batch, patches=[names[(first + i) % len(names)] for i in range(n)])
                if r:
                    times[n].append((time.perf_counter() - t0) * 1000)
    ms = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    xs, ys = list(ms), list(ms.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {
        "pass_ms": {str(n): v for n, v in ms.items()},
        "fixed_ms": my - slope * mx,
        "per_sentence_ms": slope,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--patches", required=True, help="folder of task patches, each served under its file name"
    )
    ap.add_argument(
        "--clients", default="1,2,4,8,16", help="concurrent clients, comma-separated (default 1,2,4,8,16)"
    )
    ap.add_argument(
        "--seconds", type=float, default=60, help="seconds of the largest load, with reloads (default 60)"
    )
    ap.add_argument(
        "--sweep-seconds", type=float, default=10, help="seconds of each smaller load (default 10)"
    )
    ap.add_argument(
        "--profile", default="raspberry-pi-4-4gb", help="device profile (default raspberry-pi-4-4gb)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="the service's compute threads (default: the profile's)"
    )
    ap.add_argument(
        "--window-ms",
        type=float,
        default=None,
        help="the longest a pass waits after the last one for its clients, ms (default: the profile's serve_window_ms)",
    )
    ap.add_argument("--paired-rounds", type=int, default=3,
                    help="rounds of the largest load alternating between both services, up at once (default 3; 0: "
                         "none)")  # fmt: skip
    ap.add_argument(
        "--paired-seconds", type=float, default=10, help="seconds of each paired slice (default 10)"
    )
    ap.add_argument("--out", default="out/serve_load", help="folder for serve_load.json and .png")
    # the fresh process's part of the run: the pass-cost curve, printed as JSON
    ap.add_argument("--pass-cost-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.patches).resolve()
    names = sorted(p.stem for p in folder.glob("*.patch"))
    if not names:
        sys.exit(f"error: no .patch files in {folder}")
    if args.pass_cost_only:
        print(json.dumps(pass_cost(folder, args.profile, args.threads)))
        return 0
    counts = sorted({int(c) for c in args.clients.split(",")})
    if (
        not 1 <= counts[0] <= counts[-1] <= 64
        or max(args.seconds, args.sweep_seconds, args.paired_seconds) > 600
    ):
        sys.exit("error: clients must be in 1..64 and seconds at most 600")
    if not 0 <= args.paired_rounds <= 20:
        sys.exit("error: --paired-rounds must be in 0..20")
    texts = [ln.split("\t", 1)[1] for ln in SST2_DEV.read_text().splitlines()[1:]]
    from edge_tune.profiles import load_profile

    budget = load_profile(args.profile).memory_budget_mb
    results = {}
    for batching in (False, True):
        proc, url = start(folder, args.profile, batching, args.threads, args.window_ms)
        try:
            rows = []
            for c in counts:
                big = c == counts[-1]
                rows.append(asyncio.run(run_load(url, names, texts, c, args.seconds if big else args.sweep_seconds,
                                                 big, folder)))  # fmt: skip
                print(f"batching {'on ' if batching else 'off'} {c:3d} clients: {rows[-1]['rps']:7.1f} req/s, "
                      f"p50 {rows[-1]['p50_ms']:6.1f} ms, p99 {rows[-1]['p99_ms']:6.1f} ms", flush=True)  # fmt: skip
            after = asyncio.run(probe(url, names, texts[:8]))
            peak = vm_hwm_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        fresh, furl = start(folder, args.profile, batching, args.threads, args.window_ms)
        try:
            same = asyncio.run(probe(furl, names, texts[:8])) == after
        finally:
            fresh.terminate()
            fresh.wait(30)
        results["on" if batching else "off"] = {
            "rows": rows,
            "peak_rss_mb": peak,
            "after_reload_equals_fresh": same,
        }
    off, on = results["off"], results["on"]
    print("\n| batching | clients | req/s | p50 ms | p99 ms | sentences a pass | ms a pass | passes busy | failed "
          f"| wrong patch |\n|{'---|' * 10}")  # fmt: skip
    for mode in ("off", "on"):
        for r in results[mode]["rows"]:
            print(f"| {mode} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['sentences_per_pass']:.1f} | {r['ms_per_pass']:.1f} | {r['busy']:.0%} | {r['failed']} | "
                  f"{r['wrong_patch']} |")  # fmt: skip
    top_on, top_off = on["rows"][-1], off["rows"][-1]
    print(
        f"\n{counts[-1]} clients: throughput on / off {top_on['rps'] / top_off['rps']:.2f}x; p99 on "
        f"{top_on['p99_ms']:.1f} ms vs 2x off's p50 at {counts[0]} client(s) {2 * off['rows'][0]['p50_ms']:.1f} ms"
    )
    if args.paired_rounds:
        ratios = results["paired_ratios"] = paired_ratios(folder, args, names, texts, counts[-1])
        print(f"{counts[-1]} clients, paired ({args.paired_rounds} rounds of {args.paired_seconds:g} s a mode): "
              f"on / off {min(ratios):.2f}-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x")  # fmt: skip
    for mode in ("off", "on"):
        r, top = results[mode], results[mode]["rows"][-1]
        print(f"batching {mode}: {top['reloads']} reloads, {top['failed']} failed, {top['wrong_patch']} wrong-patch, "
              f"after reload == fresh process: {r['after_reload_equals_fresh']}, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"of {budget} MB, bad requests <= {top['bad_ms_max']:.1f} ms")  # fmt: skip
    cost = import_cost_mb("aiohttp.web")
    print(
        f"the HTTP library's RSS cost: import aiohttp.web adds {cost:.1f} MB to a bare Python "
        f"({cost / load_profile('raspberry-pi-zero-2w').memory_budget_mb:.1%} of the Pi Zero's budget)"
    )
    results["aiohttp_import_mb"] = cost
    cmd = [sys.executable, __file__, "--pass-cost-only", "--patches", str(folder), "--profile", args.profile]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    pc = results["pass_cost"] = json.loads(
        subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    )
    print("\nin process, a mixed-patch pass against its sentences (fresh process, median of 60 passes each):")
    print("| sentences | pass ms | ms a sentence |\n|---|---|---|")
    for n, v in pc["pass_ms"].items():
        print(f"| {n} | {v:.1f} | {v / int(n):.2f} |")
    f, t, one, most = pc["fixed_ms"], pc["per_sentence_ms"], pc["pass_ms"]["1"], max(pc["pass_ms"], key=int)
    print(f"a sentence in a pass of {most} costs {one / (pc['pass_ms'][most] / int(most)):.2f}x less than alone; "
          f"fit {f:.2f} ms a pass + {t:.2f} ms a sentence, so at most {(f + t) / t:.2f}x in any pass")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("off", "o--"), ("on", "s-")):
        xs = [r["clients"] for r in results[mode]["rows"]]
        a.plot(xs, [r["rps"] for r in results[mode]["rows"]], style, label=f"batching {mode}")
        b.plot(xs, [r["p99_ms"] for r in results[mode]["rows"]], style, label=f"batching {mode}")
    a.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput")
    b.set(xlabel="concurrent clients", ylabel="p99 latency, ms", title="p99 latency")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "serve_load.png", dpi=100)
    print(f"wrote {out / 'serve_load.json'}, {out / 'serve_load.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
