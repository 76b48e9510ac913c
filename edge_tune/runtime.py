"""Serving without torch: the base exported once (`edge-tune export --format onnx`, onnx_export.py) on ONNX
Runtime, each task an adapter file activated per run. Imports onnxruntime, tokenizers and numpy only (a
test checks that torch never loads), for the phone app or Jetson service that does not ship PyTorch.

    bank = PatchBank("out/onnx")          # model.onnx + tokenizer.json
    bank.load("out/onnx/sst2.onnx_adapter")   # or a .patch, converted here (no torch)
    bank.predict(["a gripping film"], patch="sst2")

An adapter file holds the patch's tensors under the graph's input names (LoRA transposed, B scaled by
alpha / r) and its manifest as the `edge_tune.manifest` tensor; its model version is the graph id of the
base it was made for. ONNX Runtime's `RunOptions.add_active_adapter` does not keep the adapter alive, and
two active adapters naming the same tensor do not raise: the bank keeps every loaded adapter in its table
for as long as any RunOptions refers to it, and each RunOptions holds exactly one adapter."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import EdgeTuneError, PatchError
from .manifest import STORED, Prediction, read_patch_file
from .tokens import encode, length_buckets, load_tokenizer, pad

ADAPTER_FORMAT = "edge_tune.onnx_adapter"
ADAPTER_VERSION = 1
MANIFEST_INPUT = "edge_tune.manifest"
GRAPH_FORMAT = "edge_tune.onnx"
# methods whose patches are values of the graph's patch inputs; the others change its structure
MAPPABLE = ("lora", "bitfit", "ia3", "head", "zeroshot", "fewshot", "prompt", "ptuning", "prefix")


def graph_meta(session: ort.InferenceSession, where: str) -> dict:
    """The edge_tune metadata of an exported graph (format, base fingerprint, graph id, precision)."""
    raw = session.get_modelmeta().custom_metadata_map.get("edge_tune")
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != GRAPH_FORMAT:
        raise EdgeTuneError(
            "not an edge_tune ONNX export", where, "export one with edge-tune export --format onnx"
        )
    return meta


def params_sha256(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name], np.float32)
        h.update(f"{name}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def patch_to_params(path: str | Path, inputs: dict[str, tuple], fingerprint: str) -> tuple[dict, dict]:
    """Read and validate a .patch without torch (size, header, manifest, sha256, finite values, base, names
    and shapes against the graph's `inputs`) -> (adapter manifest, {graph input: float32 array})."""
    where = str(path)
    pf = read_patch_file(path)
    m = pf.manifest
    if m.method not in MAPPABLE:
        raise PatchError(f"a {m.method} patch changes the graph's structure, not its inputs", where,
                         f"the ONNX export takes {', '.join(MAPPABLE)} patches; serve this one with torch")  # fmt: skip
    if m.base_fingerprint != fingerprint:
        raise PatchError(f"made for base {m.base_fingerprint[:12]}, the graph is of base {fingerprint[:12]}", where,
                         "export the graph from the patch's base")  # fmt: skip
    data = pf.data()
    pf.check_digest(data, where)
    params = {}
    for name, info in pf.header.tensors.items():
        dtype = np.dtype(STORED[info.dtype])
        a = np.frombuffer(data, dtype, (info.end - info.begin) // dtype.itemsize, info.begin)
        a = a.reshape(info.shape).astype(np.float32)
        if not np.isfinite(a).all():
            raise PatchError(f"tensor {name!r} holds NaN or Inf", where, "refusing a broken patch")
        if name.endswith(".lora_A"):
            a = a.T
        elif name.endswith(".lora_B"):
            a = a.T * np.float32(m.hyper["alpha"] / m.hyper["rank"])
        params[name] = np.ascontiguousarray(a)
    manifest = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "task": m.task, "method": m.method,
                "label_names": m.label_names, "seq_len": m.seq_len, "base_fingerprint": m.base_fingerprint,
                "params_sha256": params_sha256(params)}  # fmt: skip
    check_params(params, inputs, where)
    return manifest, params


def check_params(params: dict[str, np.ndarray], inputs: dict[str, tuple], where: str) -> None:
    """Every tensor names a patch input of the graph and fits its fixed dimensions (one line if not)."""
    unknown = sorted(params.keys() - inputs.keys())
    wrong = [n for n in sorted(params.keys() & inputs.keys()) if params[n].ndim != len(inputs[n])
             or any(d is not None and d != s for d, s in zip(inputs[n], params[n].shape, strict=True))]  # fmt: skip
    if unknown or wrong:
        what = "; ".join(f"{k}: {', '.join(v[:3])}{'...' if len(v) > 3 else ''}"
                         for k, v in (("not a graph input", unknown), ("wrong shape", wrong)) if v)  # fmt: skip
        raise PatchError(f"tensors do not fit the graph ({what})", where, "made for another base or export?")
    if (
        "head.weight" in params
        and params["head.weight"].shape[0] != params.get("head.bias", params["head.weight"][:, 0]).shape[0]
    ):
        raise PatchError("head.weight and head.bias disagree on the number of labels", where)  # fmt: skip


def write_adapter(path: str | Path, manifest: dict, params: dict[str, np.ndarray], graph_id: int) -> int:
    """An ONNX Runtime adapter file at `path` (atomically: temp file + rename); returns its size in bytes."""
    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(graph_id)
    blob = np.frombuffer(json.dumps(manifest, sort_keys=True).encode(), np.uint8).copy()
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in params.items()}
    fmt.set_parameters({**values, MANIFEST_INPUT: ort.OrtValue.ortvalue_from_numpy(blob)})
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        fmt.export_adapter(str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise PatchError(f"cannot write the adapter ({e})", path) from None
    return path.stat().st_size


def read_adapter(path: str | Path, inputs: dict[str, tuple], graph_id: int, fingerprint: str) -> dict:
    """Validate an adapter file against the graph (format, graph id, manifest, sha256, finite values, names
    and shapes) -> its manifest."""
    where = str(path)
    if not Path(path).is_file():
        raise PatchError("no such adapter file", where)
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        raw = fmt.get_parameters()
    except Exception:  # ONNX Runtime's message is a multi-line C++ assertion
        raise PatchError(
            "not a readable ONNX Runtime adapter file", where, "file corrupt or truncated?"
        ) from None
    blob = raw.pop(MANIFEST_INPUT, None)
    try:
        manifest = json.loads(bytes(blob.numpy()).decode()) if blob is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != ADAPTER_FORMAT:
        raise PatchError(
            "no edge_tune manifest in the adapter", where, "export it with edge-tune export --format onnx"
        )
    if manifest.get("format_version") != ADAPTER_VERSION:
        raise PatchError(
            f"adapter format v{manifest.get('format_version')!r} is not v{ADAPTER_VERSION}", where
        )
    if manifest.get("base_fingerprint") != fingerprint or fmt.get_model_version() != graph_id:
        raise PatchError(f"made for base {str(manifest.get('base_fingerprint'))[:12]}, the graph is of base "
                         f"{fingerprint[:12]}", where, "export the adapter from a patch of this base")  # fmt: skip
    labels = manifest.get("label_names")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
        raise PatchError("the adapter's manifest has no label names", where, "file corrupt")
    params = {n: v.numpy() for n, v in raw.items()}
    if any(a.dtype != np.float32 for a in params.values()):
        raise PatchError("adapter tensors must be float32", where, "file corrupt or foreign")
    if params_sha256(params) != manifest.get("params_sha256"):
        raise PatchError("tensor bytes do not match the adapter's sha256", where, "file corrupted in transit")
    bad = [n for n, a in params.items() if not np.isfinite(a).all()]
    if bad:
        raise PatchError(f"tensor {bad[0]!r} holds NaN or Inf", where, "refusing a broken adapter")
    check_params(params, inputs, where)
    return manifest


@dataclass
class _Loaded:
    adapter: ort.LoraAdapter  # kept alive here: RunOptions does not hold it
    run_options: ort.RunOptions
    manifest: dict
    path: str


class PatchBank:
    """The exported base on ONNX Runtime, many task adapters, one active (the default of `predict`).
    Runs are serialised by a lock, so an unload never frees an adapter a run is reading."""

    def __init__(self, export_dir: str | Path, threads: int | None = None, load_adapters: bool = True):
        """The graph in `export_dir` (model.onnx + tokenizer.json) and, with `load_adapters`, every
        *.onnx_adapter beside it (the first by name active); `threads`: ONNX Runtime's intra-op threads."""
        d = Path(export_dir)
        model = d / "model.onnx" if d.is_dir() else d
        if not model.is_file():
            raise EdgeTuneError(
                "no model.onnx here", export_dir, "export one with edge-tune export --format onnx"
            )
        so = ort.SessionOptions()
        so.log_severity_level = 3  # the patch inputs' "initializer in graph inputs" notice is by design
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise EdgeTuneError(
                f"ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:160]})", model
            ) from None
        self.meta = graph_meta(self.session, str(model))
        self.tokenizer = load_tokenizer(model.parent)
        self.inputs = {i.name: tuple(s if isinstance(s, int) else None for s in i.shape) for i in self.session.get_inputs() + self.session.get_overridable_initializers()
                       if i.name not in ("input_ids", "attention_mask", MANIFEST_INPUT)}  # fmt: skip
        self.adapters: dict[str, _Loaded] = {}
        self.active: str | None = None
        self._lock = threading.Lock()
        for path in sorted(model.parent.glob("*.onnx_adapter")) if load_adapters else []:
            self.load(path)

    def load(self, path: str | Path, name: str | None = None) -> str:
        """Validate and load an adapter file, or a .patch (converted without torch); returns its name in the
        bank (default: the task, else the file's stem). Loading a loaded name replaces it."""
        path = Path(path)
        fp, gid = self.meta["base_fingerprint"], self.meta["graph_id"]
        if path.suffix == ".patch":
            manifest, params = patch_to_params(path, self.inputs, fp)
            with tempfile.TemporaryDirectory(prefix="edge_tune_adapter_") as tmp:
                file = Path(tmp) / "a.onnx_adapter"
                write_adapter(file, manifest, params, gid)
                adapter = self._open(file)  # memory-mapped: the mapping outlives the unlinked file
        else:
            manifest = read_adapter(path, self.inputs, gid, fp)
            adapter = self._open(path)
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        name = name or manifest.get("task") or path.stem.split(".")[0]
        with self._lock:
            self.adapters[name] = _Loaded(adapter, run_options, manifest, str(path))
            if self.active is None:
                self.active = name
        return name

    @staticmethod
    def _open(path: Path) -> ort.LoraAdapter:
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception:
            raise PatchError(
                "ONNX Runtime cannot load the adapter", path, "file corrupt or truncated?"
            ) from None
        return adapter

    def activate(self, name: str) -> None:
        """Make `name` the default adapter of `predict` (a table lookup: no session or graph change)."""
        if name not in self.adapters:
            raise PatchError(
                f"no adapter named {name!r} in the bank",
                None,
                f"loaded: {', '.join(self.adapters) or 'none'}",
            )
        self.active = name

    def unload(self, name: str) -> None:
        """Forget adapter `name` (waits for a run in flight)."""
        with self._lock:
            self.adapters.pop(name, None)
            if self.active == name:
                self.active = None

    def predict(self, texts: list[str], patch: str | None = None, batch_size: int = 64) -> list[Prediction]:
        """Label and probability for each text under adapter `patch` (default: the active one)."""
        with self._lock:
            name = patch or self.active
            if name is None:
                raise PatchError("no active adapter", None, "load one first")
            if name not in self.adapters:
                raise PatchError(
                    f"no adapter named {name!r} in the bank", None, f"loaded: {', '.join(self.adapters)}"
                )
            loaded = self.adapters[name]
            labels = loaded.manifest["label_names"]
            tokens = encode(self.tokenizer, list(texts), loaded.manifest["seq_len"])
            order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
            out: list[Prediction | None] = [None] * len(texts)
            for s, e in length_buckets([len(tokens[i]) for i in order], batch_size):
                ids, mask = pad([tokens[i] for i in order[s:e]])
                feed = {"input_ids": ids, "attention_mask": mask}
                probs = self.session.run(["probabilities"], feed, loaded.run_options)[0]
                for i, p in zip(order[s:e], probs, strict=True):
                    k = int(p.argmax())
                    out[i] = Prediction(labels[k], float(p[k]), name)
            return out  # type: ignore[return-value]
