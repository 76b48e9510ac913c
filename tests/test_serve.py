"""`edge-tune serve`: the real server on a free loopback port, every endpoint and bad input (one-line JSON
errors, the service still answering), answers equal to an in-process PatchBank's, per-text patches mixed
across concurrent requests, the watched folder, the token, and a concurrent-swap test: while a patch is
replaced over and over, every request is answered wholly by one version of it."""

import copy
import dataclasses
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import SENTENCES, synthetic_patch
from test_bank import TASKS

from edge_tune.bank import PatchBank
from edge_tune.kernels import load_kernels
from edge_tune.patch import load_patch, save_patch

pytest.importorskip("aiohttp")

TEXTS = [s for _, s in SENTENCES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *flags):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "edge_tune.cli", "serve", "--patches", str(folder), "--port", str(self.port),
               "--read-timeout", "1", *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
        raise RuntimeError("server did not start")

    def call(self, method, path, body=None, headers=None, raw=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, bytes | str) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, (payload.decode() if raw else json.loads(payload))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def folder(base_int8, tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    for seed, (t, spec) in enumerate(TASKS.items()):
        synthetic_patch(base_int8, d / f"{t}.patch", t, spec, seed)
    return d


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder)
    yield s
    s.stop()


def _expected(base_int8, folder, name, texts=TEXTS):
    bank = PatchBank(copy.deepcopy(base_int8))  # a bank re-points its base's slots: never share one
    bank.load(folder / f"{name}.patch", name=name)
    return [(p.label, p.probability) for p in bank.predict(texts, patch=name)]


def test_answers_equal_an_in_process_bank_for_each_patch(server, folder, base_int8):
    for name in TASKS:
        status, r = server.call("POST", "/v1/predict", {"texts": TEXTS, "patch": name})
        assert status == 200 and all(x["patch"] == name for x in r["results"]) and r["latency_ms"] > 0
        got = [(x["label"], x["probability"]) for x in r["results"]]
        # the same bits as an in-process bank's (the service sends probabilities to 6 decimals)
        assert got == [(label, round(p, 6)) for label, p in _expected(base_int8, folder, name)]


def test_per_text_patches_and_concurrent_requests_for_different_patches(server):
    names = list(TASKS)
    patches = [names[i % 4] for i in range(len(TEXTS))]
    status, r = server.call("POST", "/v1/predict", {"texts": TEXTS, "patches": patches})
    assert status == 200 and [x["patch"] for x in r["results"]] == patches
    alone = {
        n: server.call("POST", "/v1/predict", {"texts": TEXTS[:1], "patch": n})[1]["results"][0]
        for n in names
    }

    def one(i):
        return server.call("POST", "/v1/predict", {"texts": TEXTS[:1], "patch": names[i % 4]})[1]["results"][
            0
        ]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(64)))
    # bit for bit with the kernels; the references' fp32 matmuls round by the rows a patch has in the pass,
    # and a last-bit change may flip an int8 requantization step (test_bank's packed-pass test)
    exact = load_kernels()
    for i, a in enumerate(answers):  # whoever shared its pass, a sentence gets its answer alone
        want = alone[names[i % 4]]
        if exact:
            assert a == want
        else:
            assert (a["label"], a["patch"]) == (want["label"], want["patch"])
            assert a["probability"] == pytest.approx(want["probability"], abs=0.05)
    status, text = server.call("GET", "/metrics", raw=True)
    assert (
        status == 200
        and "edge_tune_pass_sentences_count" in text
        and 'edge_tune_patch_bytes{patch="sst2"}' in text
    )
    assert "edge_tune_peak_rss_mb" in text and "edge_tune_request_latency_seconds_bucket" in text


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/v1/predict", "{not json", 400, "malformed JSON"),
        ("POST", "/v1/predict", [1, 2], 400, "must be a JSON object"),
        ("POST", "/v1/predict", {"texts": "one"}, 400, "non-empty list of strings"),
        ("POST", "/v1/predict", {"texts": [1]}, 400, "non-empty list of strings"),
        ("POST", "/v1/predict", {"texts": ["  "]}, 400, "texts[0] is empty"),
        ("POST", "/v1/predict", {"texts": ["x" * 2001]}, 413, "at most 2000"),
        ("POST", "/v1/predict", {"texts": ["x"] * 65}, 413, "at most 64"),
        ("POST", "/v1/predict", {"texts": ["x"], "patch": "nope"}, 404, "no patch named 'nope'"),
        ("POST", "/v1/predict", {"texts": ["x"], "patch": 3}, 400, "must be a patch name"),
        ("POST", "/v1/predict", {"texts": ["x", "y"], "patches": ["sst2"]}, 400, "one per text"),
        ("POST", "/v1/predict", {"texts": ["x"], "tempo": 1}, 400, "unknown field 'tempo'"),
        ("POST", "/v1/predict", {"texts": ["x" * 900] * 1200}, 413, "Maximum request body size"),
        ("POST", "/v1/patches", {"file": "../outside.patch"}, 403, "outside the patches folder"),
        ("POST", "/v1/patches", {"file": "missing.patch"}, 404, "no file 'missing.patch'"),
        ("POST", "/v1/patches", {"file": "sst2.patch", "name": "../x"}, 400, '"name" must be'),
        ("DELETE", "/v1/patches/nope", None, 404, "no patch named 'nope'"),
        ("POST", "/v1/patches/nope/activate", None, 404, "no patch named 'nope'"),
        ("GET", "/v1/nothing", None, 404, "Not Found"),
        ("GET", "/v1/predict", None, 405, "Method Not Allowed"),
    ],
)
def test_bad_input_is_a_one_line_json_error_and_the_service_keeps_serving(
    server, method, path, body, status, message
):
    got, r = server.call(method, path, body)
    assert got == status and message in r["error"] and "\n" not in r["error"], r
    assert server.call("POST", "/v1/predict", {"texts": TEXTS[:2]})[0] == 200


def test_a_slow_client_gets_408_and_others_are_served_meanwhile(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    assert server.call("POST", "/v1/predict", {"texts": TEXTS[:1]})[0] == 200  # while the slow one waits
    reply = s.recv(4096).decode()
    s.close()
    assert " 408 " in reply.splitlines()[0] and "not received within 1 s" in reply


def test_patch_management_load_upload_activate_unload(server, folder, base_int8, tmp_path):
    assert {p["name"] for p in server.call("GET", "/v1/patches")[1]["patches"]} >= set(TASKS)
    assert server.call("POST", "/v1/patches", {"file": "cr.patch", "name": "cr2"}) == (201, {"loaded": "cr2"})
    status, r = server.call("POST", "/v1/patches?name=up", (folder / "subj.patch").read_bytes(),
                            {"Content-Type": "application/octet-stream"})  # fmt: skip
    assert (status, r) == (201, {"loaded": "up"})
    assert server.call("POST", "/v1/patches/up/activate") == (200, {"active": "up"})
    answer = server.call("POST", "/v1/predict", {"texts": TEXTS})[1]["results"]
    assert {a["patch"] for a in answer} == {"up"}
    assert [a["label"] for a in answer] == [w[0] for w in _expected(base_int8, folder, "subj")]
    corrupt = (folder / "subj.patch").read_bytes()[:-10] + b"\0" * 10
    status, r = server.call(
        "POST", "/v1/patches?name=bad", corrupt, {"Content-Type": "application/octet-stream"}
    )
    assert status == 422 and r["error"].startswith("refused patch")
    other = load_patch(folder / "sst2.patch")
    foreign = tmp_path / "foreign.patch"
    save_patch(foreign, other.tensors, dataclasses.replace(other.manifest, base_fingerprint="f" * 64))
    status, r = server.call("POST", "/v1/patches?name=foreign", foreign.read_bytes(),
                            {"Content-Type": "application/octet-stream"})  # fmt: skip
    assert status == 422 and "base" in r["error"]
    assert server.call("DELETE", "/v1/patches/cr2") == (200, {"unloaded": "cr2"})
    assert server.call("POST", "/v1/patches/sst2/activate")[0] == 200
    names = {p["name"] for p in server.call("GET", "/v1/patches")[1]["patches"]}
    assert "cr2" not in names and "bad" not in names and "foreign" not in names


def test_a_request_naming_a_patch_leaves_the_default_patch(server):
    assert server.call("POST", "/v1/patches/sst2/activate") == (200, {"active": "sst2"})
    for name in ("cr", "subj"):
        answer = server.call("POST", "/v1/predict", {"texts": TEXTS[:1], "patch": name})[1]["results"][0]
        assert answer["patch"] == name
    assert server.call("POST", "/v1/predict", {"texts": TEXTS[:1]})[1]["results"][0]["patch"] == "sst2"
    assert server.call("GET", "/healthz")[1]["active"] == "sst2"
    assert server.call("GET", "/v1/patches")[1]["active"] == "sst2"


def test_a_full_queue_is_503_with_retry_after(folder):
    s = Server(folder, "--queue", "1")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/predict", body=json.dumps({"texts": TEXTS[:2]}))
        r = conn.getresponse()
        assert (
            r.status == 503
            and r.getheader("Retry-After") == "1"
            and "queue full" in json.loads(r.read())["error"]
        )
        assert s.call("POST", "/v1/predict", {"texts": TEXTS[:1]})[0] == 200
    finally:
        s.stop()


def test_token_guards_management_and_the_folder_is_watched(folder, base_int8, tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    shutil.copy(folder / "sst2.patch", watched / "sst2.patch")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    s = Server(watched, "--token-file", str(token), "--watch", "0.2")
    try:
        assert s.call("POST", "/v1/patches/sst2/activate")[0] == 401
        assert (
            s.call("POST", "/v1/patches/sst2/activate", headers={"Authorization": "Bearer s3cret"})[0] == 200
        )
        assert s.call("POST", "/v1/predict", {"texts": TEXTS[:1]})[0] == 200  # predictions need no token
        tmp = watched / ".incoming"
        shutil.copy(folder / "mpqa.patch", tmp)
        os.replace(tmp, watched / "mpqa.patch")  # how edge_tune writes a patch: a rename
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "mpqa" not in {
            p["name"] for p in s.call("GET", "/v1/patches")[1]["patches"]
        }:
            time.sleep(0.1)
        answer = s.call("POST", "/v1/predict", {"texts": TEXTS, "patch": "mpqa"})[1]["results"]
        assert [a["label"] for a in answer] == [w[0] for w in _expected(base_int8, folder, "mpqa")]
    finally:
        s.stop()


def test_budget_refuses_a_load_that_would_cross_it(folder, tmp_path):
    from edge_tune.profiles import load_profile

    prof = dataclasses.asdict(load_profile())
    prof |= {"name": "tiny", "memory_budget_mb": 1}
    toml = tmp_path / "tiny.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in prof.items()) + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    s = Server(empty, "--profile", str(toml))
    try:
        status, r = s.call("POST", "/v1/patches?name=x", (folder / "sst2.patch").read_bytes(),
                           {"Content-Type": "application/octet-stream"})  # fmt: skip
        assert status == 507 and "of its 1 MB budget" in r["error"]
        assert s.call("POST", "/v1/predict", {"texts": TEXTS[:1]}) == (
            409,
            {"error": "no patch is active and the request names none"},
        )
    finally:
        s.stop()


def test_concurrent_swaps_never_mix_two_versions_in_one_answer(folder, base_int8, tmp_path):
    """Version A of patch 'x' says label 1 for every text, version B label 0 (the head's bias pushed apart);
    replacing x over and over while 8 clients ask: each answer is all-A or all-B."""
    base = load_patch(folder / "sst2.patch")
    versions = {}
    for v, push in (("A", 8.0), ("B", -8.0)):
        t = dict(base.tensors) | {"head.bias": torch.tensor([-push, push])}
        save_patch(tmp_path / f"{v}.patch", t, base.manifest)
        versions[v] = tmp_path / f"{v}.patch"
    served = tmp_path / "served"
    served.mkdir()
    for v in versions.values():
        shutil.copy(v, served / v.name)
    s = Server(served)
    assert s.call("POST", "/v1/patches", {"file": "A.patch", "name": "x"})[0] == 201
    stop, seen, errors = threading.Event(), [], []

    def swap():
        i = 0
        while not stop.is_set():
            st, _ = s.call("POST", "/v1/patches", {"file": "AB"[i % 2] + ".patch", "name": "x"})
            errors.append(st) if st != 201 else None
            i += 1

    def ask():
        while not stop.is_set():
            st, r = s.call("POST", "/v1/predict", {"texts": TEXTS, "patch": "x"})
            if st != 200:
                errors.append(st)
            else:
                seen.append({a["label"] for a in r["results"]})

    try:
        threads = [threading.Thread(target=swap)] + [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(8)
        stop.set()
        for t in threads:
            t.join()
    finally:
        s.stop()
    assert not errors and len(seen) > 20
    assert all(labels in ({"0"}, {"1"}) for labels in seen), [x for x in seen if len(x) > 1][:3]
    assert {"0"} in seen and {"1"} in seen  # both versions answered


def _passes(server) -> tuple[int, int]:
    text = server.call("GET", "/metrics", raw=True)[1]
    get = lambda k: int(float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(k + " "))))  # noqa: E731
    return get("edge_tune_pass_sentences_count"), int(get("edge_tune_pass_sentences_sum"))


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_passes_only_with_batching(folder, batching):
    s = Server(folder, "--window-ms", "400", *([] if batching else ["--no-batching"]))
    try:
        names = list(TASKS)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: s.call("POST", "/v1/predict", {"texts": TEXTS[i : i + 1], "patch": names[i % 4]}), range(8)))  # fmt: skip
        assert all(
            st == 200 and r["results"][0]["patch"] == names[i % 4] for i, (st, r) in enumerate(answers)
        )
        passes, sentences = _passes(s)
        assert sentences == 8
        assert passes < 8 if batching else passes == 8
    finally:
        s.stop()


def test_every_bank_call_of_the_service_runs_on_its_pass_thread(folder, monkeypatch):
    # A second thread that runs torch ops keeps a second OpenMP team, and on a small device that made every
    # pass ~2.5x slower (serve.py): loading, swapping and passes all belong on the one pass thread.
    import asyncio

    from edge_tune.serve import ServeConfig, Service

    callers = []
    for name in ("__init__", "load", "activate", "predict"):
        original = getattr(PatchBank, name)

        def spy(*args, _original=original, **kwargs):
            callers.append(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(PatchBank, name, spy)
    # the Jetson's budget: this test process holds several bases, and a load is refused past the budget
    svc = Service(ServeConfig(patches=str(folder), profile="jetson-orin-nano-8gb"))

    async def ask():
        batcher = asyncio.create_task(svc.batcher())
        try:
            return await svc.predict(TEXTS[:2], list(TASKS)[:2])
        finally:
            batcher.cancel()

    try:
        assert [p.patch for p in asyncio.run(ask())] == list(TASKS)[:2]
        pass_thread = svc.pool.submit(threading.get_ident).result()
    finally:
        svc.pool.shutdown()
    assert len(callers) >= 1 + len(TASKS) + 1 and set(callers) == {pass_thread}


def test_after_a_pass_of_several_the_next_waits_for_its_clients_and_no_longer(tmp_path):
    # The clients a pass answered (and those queued behind it) come back as one pass, instead of the first
    # to return starting a pass alone; once they are all back the pass starts, whatever the window left.
    import asyncio

    from edge_tune import serve
    from edge_tune.manifest import Prediction

    class InstantBank:
        patches, active = {}, None

        def predict(self, texts, patches):
            return [Prediction("1", 1.0, p) for p in patches]

    # a window of a minute: a pass that waited it out would time the test out below
    svc = serve.Service(serve.ServeConfig(patches=str(tmp_path), window_ms=60_000), bank=InstantBank())
    n = serve.GATHER_MIN_REQUESTS + 1

    async def client(i: int):
        await asyncio.sleep(0.01 * i)  # returning one after another
        return await svc.predict([f"t{i}"], ["p"])

    async def run():
        batcher = asyncio.create_task(svc.batcher())
        try:
            await asyncio.gather(*[svc.predict([f"s{i}"], ["p"]) for i in range(n)])  # one pass of n
            before = svc.pass_rows.n
            await asyncio.wait_for(asyncio.gather(*[client(i) for i in range(n)]), 10)
            return svc.pass_rows.n - before
        finally:
            batcher.cancel()

    try:
        assert asyncio.run(run()) == 1  # the n returning clients shared one pass, started once all were back
    finally:
        svc.pool.shutdown()


def test_only_a_pass_of_several_requests_makes_the_next_wait_for_the_window(tmp_path, monkeypatch):
    # The batcher alone, over a bank that answers at once: which requests wait for the window.
    import asyncio

    from edge_tune import serve
    from edge_tune.manifest import Prediction

    class InstantBank:
        patches, active = {}, None

        def predict(self, texts, patches):
            return [Prediction("1", 1.0, p) for p in patches]

    svc = serve.Service(serve.ServeConfig(patches=str(tmp_path), window_ms=300), bank=InstantBank())
    waits = []
    wait_for = asyncio.wait_for

    async def spy(aw, timeout):
        waits.append(timeout)
        return await wait_for(aw, timeout)

    monkeypatch.setattr(serve.asyncio, "wait_for", spy)
    several = serve.GATHER_MIN_REQUESTS

    async def run():
        batcher = asyncio.create_task(svc.batcher())
        seen = []
        try:
            await svc.predict(["a"], ["p"])  # nothing before it: answered at once
            seen.append(len(waits))
            await asyncio.gather(*[svc.predict([t], ["p"]) for t in "bcdefgh"[:several]])  # one pass
            seen.append(svc.pass_rows.n)
            await svc.predict(["i"], ["p"])  # after a pass of several: waits the window for company
            seen.append(len(waits))
            await svc.predict(["j"], ["p"])  # after a pass of one: answered at once
            seen.append(len(waits))
        finally:
            batcher.cancel()
        return seen

    try:
        first, passes, after_several, after_one = asyncio.run(run())
    finally:
        svc.pool.shutdown()
    assert first == 0 and passes == 2 and after_several >= 1 and after_one == after_several
