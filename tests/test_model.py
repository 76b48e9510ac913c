"""Our encoder against transformers' BertModel (fp32), and the quantized bases against fp32."""

import pytest
import torch

from edge_tune.base import load_base


@pytest.fixture(scope="module")
def base_fp32():
    return load_base(precision="fp32")


def test_fp32_encoder_matches_transformers(base_fp32, ids_mask):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel.from_pretrained(str(base_fp32.model_dir), local_files_only=True).eval()
    ids, mask = ids_mask
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = base_fp32.model.encoder(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("precision", "min_cos"), [("int8", 0.99), ("int4", 0.9)])
def test_quantized_pooled_features_close_to_fp32(base_fp32, ids_mask, precision, min_cos):
    q = load_base(precision=precision)
    with torch.no_grad():
        ref, got = base_fp32.model.pool(*ids_mask), q.model.pool(*ids_mask)
    assert torch.nn.functional.cosine_similarity(ref, got).min() >= min_cos


def test_fingerprint_is_stable_and_precision_independent(base_fp32, base_int8):
    assert base_fp32.fingerprint == base_int8.fingerprint == load_base(precision="int4").fingerprint
    assert len(base_int8.fingerprint) == 64


def test_load_base_errors(tmp_path):
    from edge_tune.errors import EdgeTuneError

    with pytest.raises(EdgeTuneError, match="config"):
        load_base(tmp_path)
    with pytest.raises(EdgeTuneError, match="unknown precision"):
        load_base(precision="int3")
