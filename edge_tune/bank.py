"""PatchBank: one loaded base, many patches, switched in microseconds.

Swap mechanism: each loaded patch's tensors are wrapped once, at load time, as the Parameters the model's
delta slots (biases, LayerNorm terms, LoRA factors, head) will point at. `activate` re-points those slots
(`module._parameters[name] = tensor`): no copy, no allocation, no base reload. tools/swap_bench.py also
times the alternative (copying BitFit biases into the live tensors) and reports both.

Concurrency: one lock. `activate`, `unload` and every forward pass take it, so a response is computed
wholly under one patch and names it; a swap waits for the forward in flight (milliseconds), never the
other way round. Forwards do not run side by side, but each already uses all the profile's threads. Keep
every call on one thread where you can (serve.py runs all of its on one pass thread): each thread that runs
a parallel torch op keeps its own OpenMP team, and once the teams hold more threads than there are cores,
libgomp stops spinning between parallel regions and a pass runs ~2.5x slower.

Mixed batches: `predict(texts, patches=[...])` runs LoRA (and head-only) patches row by row in one forward
pass: every targeted linear adds each row's own patch's rank-r term (ops.lora_rows; the frozen base, the
expensive part, runs once). The term's sums depend on the row alone, and a one-patch pass adds its term the
same way; with the pooling and the head (model.head_logits) per row too, a sentence gets the same bits
alone, in a one-patch batch or in a mixed one. BitFit patches change every bias and LayerNorm, so a mix
with BitFit runs one pass per patch instead (same results, more passes)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from .base import Base, load_base
from .data import Dataset, collate
from .errors import PatchError
from .manifest import Prediction
from .methods import MethodSpec
from .model import QuantLinear, head_logits, prepack_linears
from .patch import Patch, load_patch
from .rss import apply_process_settings
from .tokens import encode


class PatchBank:
    """One loaded base, many patches; see the module docstring for how swapping and locking work."""

    def __init__(self, base: Base | None = None, precision: str = "int8", max_rank: int | None = None):
        apply_process_settings()
        self.base = base or load_base(precision=precision)
        # every pass here is inference: the int8 weights packed once, not per call (+ their size in RSS)
        prepack_linears(self.base.model)
        self.max_rank = max_rank
        self.patches: dict[str, Patch] = {}
        # Per patch: (module, attribute, patch tensor, base tensor or None) for every slot it re-points.
        self._bindings: dict[str, list[tuple[nn.Module, str, nn.Parameter, nn.Parameter | None]]] = {}
        # Per patch: the plain attributes activating it sets besides its tensors (Method.bank_settings, e.g.
        # LoRA's scale): (object, attribute, value, default).
        self._settings: dict[str, list[tuple[nn.Module, str, float, float]]] = {}
        self._specs: dict[str, MethodSpec] = {}  # per patch, its manifest's method, parsed once at load
        # The last mixed pass's patch names and their stacked LoRA terms (_lora_terms): passes of one service
        # mostly mix the same patches. Dropped on every load and unload.
        self._row_terms: tuple[tuple[str, ...], dict] | None = None
        self.active: str | None = None
        self._lock = threading.RLock()
        self._modules = dict(self.base.model.named_modules())
        # Base values of every slot a patch can re-point, restored when the patch is deactivated.
        self._defaults = dict(self.base.model.named_parameters())

    @classmethod
    def from_profile(cls, profile: str | None = None) -> PatchBank:
        from .profiles import load_profile

        p = load_profile(profile)
        return cls(precision=p.precision, max_rank=p.max_rank)

    def load(self, path: str | Path, name: str | None = None) -> str:
        """Validate and keep a patch in memory; returns its name in the bank (the manifest's task by
        default, made unique). A refused patch raises PatchError and leaves the bank as it was."""
        patch = load_patch(path, self.base, self.max_rank, name)
        bindings = []
        for tname, t in patch.tensors.items():
            mod, _, attr = tname.rpartition(".")
            bindings.append(
                (self._modules[mod], attr, nn.Parameter(t, requires_grad=False), self._defaults.get(tname))
            )
        spec = patch.manifest.spec()
        settings = spec.method.bank_settings(self._modules, list(patch.tensors), spec)
        with self._lock:
            if patch.name in self.patches and name is None:
                i = 2
                while f"{patch.name}-{i}" in self.patches:
                    i += 1
                patch.name = f"{patch.name}-{i}"
            if patch.name == self.active:
                self.deactivate()
            self.patches[patch.name] = patch
            self._row_terms = None
            self._bindings[patch.name] = bindings
            self._settings[patch.name] = settings
            self._specs[patch.name] = spec
        return patch.name

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of tensor data each loaded patch holds (the base is shared and not counted)."""
        with self._lock:
            return {n: p.nbytes() for n, p in self.patches.items()}

    def deactivate(self) -> None:
        """Return the model to the bare base (no patch)."""
        with self._lock:
            if self.active is None:
                return
            for module, attr, _, default in self._bindings[self.active]:
                module._parameters[attr] = default
            for obj, attr, _, default in self._settings[self.active]:
                object.__setattr__(obj, attr, default)  # a plain value: skip nn.Module's setattr checks
            self.active = None

    def activate(self, name: str) -> None:
        """Make patch `name` the live one."""
        with self._lock:
            if name not in self.patches:
                raise PatchError(f"no patch named {name!r} in the bank", None, f"loaded: {self._names()}")
            self.deactivate()
            # Direct slot assignment: nn.Module.__setattr__'s checks cost microseconds per tensor.
            for module, attr, value, _ in self._bindings[name]:
                module._parameters[attr] = value
            for obj, attr, value, _ in self._settings[name]:
                object.__setattr__(obj, attr, value)
            self.active = name

    def unload(self, name: str) -> None:
        """Forget patch `name` and drop every reference the bank holds to its tensors."""
        with self._lock:
            if name == self.active:
                self.deactivate()
            self.patches.pop(name, None)
            self._row_terms = None
            self._bindings.pop(name, None)
            self._settings.pop(name, None)
            self._specs.pop(name, None)

    def _names(self) -> str:
        return ", ".join(self.patches) or "none"

    def predict(
        self,
        texts: list[str],
        patch: str | None = None,
        batch_size: int = 64,
        patches: list[str] | None = None,
    ) -> list[Prediction]:
        """Label and probability for each text under `patch` (default: the active one), or row by row
        under `patches` (one name per text) in as few forward passes as the patches allow."""
        if patches is not None:
            return self._predict_mixed(list(texts), list(patches), batch_size)
        with self._lock:
            if patch is not None and patch != self.active:
                self.activate(patch)
            if self.active is None:
                raise PatchError("no active patch", None, "load one and activate it first")
            m = self.patches[self.active].manifest
            tokens = encode(self.base.tokenizer, list(texts), m.seq_len)
            p = self.base.model.predict_proba([tokens[i] for i in range(len(tokens))], batch_size)
            return self._to_predictions(p, m.label_names, self.active)

    def accuracy(self, ds: Dataset, patch: str | None = None) -> float:
        """Fraction of `ds` labelled right under `patch` (default: the active one); labels compared by name."""
        preds = self.predict(ds.texts, patch=patch)
        return sum(p.label == ds.label_names[y] for p, y in zip(preds, ds.labels, strict=True)) / len(ds)

    @staticmethod
    def _to_predictions(probs: Tensor, label_names: list[str], name: str) -> list[Prediction]:
        conf, idx = probs.max(-1)
        return [Prediction(label_names[i], c, name) for i, c in zip(idx.tolist(), conf.tolist(), strict=True)]

    def _predict_mixed(self, texts: list[str], patches: list[str], batch_size: int) -> list[Prediction]:
        if len(patches) != len(texts):
            raise PatchError(
                f"{len(texts)} texts but {len(patches)} patch names", None, "give one name per text"
            )
        with self._lock:
            unknown = sorted(set(patches) - self.patches.keys())
            if unknown:
                raise PatchError(
                    f"no patch named {unknown[0]!r} in the bank", None, f"loaded: {self._names()}"
                )
            names = sorted(set(patches))
            if len(names) == 1 or not all(self._specs[n].method.row_mixable for n in names):
                out: list[Prediction | None] = [None] * len(texts)
                for n in names:
                    rows = [i for i, p in enumerate(patches) if p == n]
                    for i, pred in zip(
                        rows, self.predict([texts[i] for i in rows], n, batch_size), strict=True
                    ):
                        out[i] = pred
                return out  # type: ignore[return-value]
            return self._forward_rows(texts, patches, names, batch_size)

    @torch.inference_mode()
    def _forward_rows(self, texts: list[str], patches: list[str], names: list[str], batch_size: int):
        model, was_active, was_training = self.base.model, self.active, self.base.model.training
        pid = torch.tensor([names.index(p) for p in patches])
        tokens: list = [None] * len(texts)
        cut = [self.patches[p].manifest.seq_len for p in patches]  # each text at its own patch's length
        for seq_len in sorted(set(cut)):  # one tokenizer call per length (patches mostly share one)
            rows = [i for i, c in enumerate(cut) if c == seq_len]
            enc = encode(self.base.tokenizer, [texts[i] for i in rows], seq_len)
            for j, i in enumerate(rows):
                tokens[i] = enc[j]
        terms = self._lora_terms(names)
        out: list[Prediction | None] = [None] * len(texts)
        self.deactivate()
        if was_training:  # a no-op eval() still walks every module (~0.1 ms a pass)
            model.eval()
        try:
            order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
            for s in range(0, len(order), batch_size):  # packed passes: padding costs nothing to cut around
                idx = torch.tensor(order[s : s + batch_size])
                ids, mask = collate([tokens[i] for i in idx.tolist()])
                token_patch = pid[idx].repeat_interleave(mask.sum(1))  # (N,): each packed token's patch
                for lin, (a, bt, offsets, scales) in terms.items():
                    lin.lora_rows = (a, bt, token_patch, offsets, scales)
                feats = model.pool(ids, mask, packed=True)
                for u in pid[idx].unique().tolist():
                    sel = (pid[idx] == u).nonzero().flatten()
                    t = self.patches[names[u]].tensors
                    probs = head_logits(feats[sel], t["head.weight"], t["head.bias"]).softmax(-1)
                    for i, pred in zip(idx[sel].tolist(), self._to_predictions(probs, self.patches[names[u]].manifest.label_names, names[u]), strict=True):  # fmt: skip
                        out[i] = pred
        finally:
            for lin in terms:
                lin.lora_rows = None
            if was_training:
                model.train()
            if was_active is not None:
                self.activate(was_active)
        return out

    def _lora_terms(self, names: list[str]) -> dict[QuantLinear, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """For every linear any of `names` adds a term to (Method.row_terms), as ops.lora_rows takes them:
        the patches' A stacked (R, in) and B^T stacked (R, out), each patch's ranks in the stack as offsets
        (P + 1,) (an empty range for a patch with no term there) and its scale (P,), P = len(names)."""
        if self._row_terms is not None and self._row_terms[0] == tuple(names):
            return self._row_terms[1]
        found: dict[QuantLinear, dict[int, tuple[Tensor, Tensor, float]]] = {}
        for u, n in enumerate(names):
            spec = self._specs[n]
            if spec.method.row_terms is None:
                continue
            for lin, (a, b, scale) in spec.method.row_terms(
                self._modules, self.patches[n].tensors, spec
            ).items():
                found.setdefault(lin, {})[u] = (a, b, float(scale))
        stacked = {}
        for lin, terms in found.items():
            ranks = [terms[u][0].shape[0] if u in terms else 0 for u in range(len(names))]
            stacked[lin] = (
                torch.cat([a for a, _, _ in terms.values()]).contiguous(),
                torch.cat([b.t() for _, b, _ in terms.values()]).contiguous(),
                torch.tensor([0, *ranks]).cumsum(0),
                torch.tensor([terms[u][2] if u in terms else 0.0 for u in range(len(names))]),
            )
        self._row_terms = (tuple(names), stacked)
        return stacked


def patch_accuracy(path: str | Path, ds: Dataset) -> float:
    """Accuracy of the patch file at `path` on `ds`, on a fresh base of the patch's precision."""
    bank = PatchBank(precision=load_patch(path).manifest.base_precision)
    return bank.accuracy(ds, bank.load(path))
