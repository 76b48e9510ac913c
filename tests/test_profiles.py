"""Device profiles: every shipped one loads; bad ones fail with one line naming the problem."""

import pytest

from edge_tune.errors import ProfileError
from edge_tune.profiles import (
    DEFAULT_PROFILE,
    clamp_to_profile,
    list_profile_names,
    load_profile,
    parse_profile,
)

GOOD = """name = "x"
schema_version = 1
description = "test"
memory_budget_mb = 500
threads = 2
max_batch_size = 8
max_rank = 4
max_seq_len = 64
precision = "int8"
backend = "cpu"
"""


def test_shipped_profiles_load():
    names = list_profile_names()
    assert {"raspberry-pi-4-4gb", "raspberry-pi-zero-2w", "jetson-orin-nano-8gb", "phone-midrange"} <= set(
        names
    )
    assert DEFAULT_PROFILE in names
    for n in names:
        assert load_profile(n).name == n


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            GOOD.replace("threads", "thread"),
            r"unknown key 'thread' \(did you mean 'threads'\?\).*missing key 'threads'",
        ),
        (GOOD.replace("max_rank = 4\n", ""), "missing key 'max_rank'"),
        (GOOD.replace('"int8"', '"int2"'), "precision must be one of"),
        (GOOD.replace("threads = 2", "threads = 0"), "threads must be a positive integer"),
        (GOOD.replace("threads = 2", 'threads = "two"'), "threads must be a positive integer"),
        (GOOD.replace("schema_version = 1", "schema_version = 9"), "schema_version is 9"),
        (GOOD.replace("max_seq_len = 64", "max_seq_len = 4096"), "at most 512"),
        (GOOD + "[[", "not valid TOML"),
        (GOOD + "serve_window_ms = -1\n", "serve_window_ms must be a number of ms in"),
        (GOOD + 'serve_window_ms = "5"\n', "serve_window_ms must be a number of ms in"),
        (GOOD + "serve_max_batch = 0\n", "serve_max_batch must be a positive integer"),
        (GOOD + 'deploy = "tflite"\n', "deploy must be one of torch, onnxruntime, executorch"),
    ],
)
def test_bad_profiles(text, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile(text, "p.toml")


def test_unknown_profile_suggests():
    with pytest.raises(
        ProfileError, match="unknown profile 'raspberry-pi-4' — did you mean 'raspberry-pi-4-4gb'"
    ):
        load_profile("raspberry-pi-4")


def test_profile_by_path(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text(GOOD)
    assert load_profile(p).memory_budget_mb == 500


def test_caps_are_clamped_with_a_warning():
    prof = parse_profile(GOOD, "p.toml")
    used, warnings = clamp_to_profile(prof, batch_size=32, rank=2, seq_len=128)
    assert used == {"batch_size": 8, "rank": 2, "seq_len": 64}
    assert len(warnings) == 2 and "batch_size 32 is above profile 'x'" in warnings[0]
    with pytest.raises(ProfileError, match="batch_size must be at least 1"):
        clamp_to_profile(prof, batch_size=0, rank=2, seq_len=8)


def test_the_serving_keys_are_optional():
    p = parse_profile(GOOD, "p.toml")
    assert (p.serve_window_ms, p.serve_max_batch) == (5.0, 64)
    p = parse_profile(GOOD + "serve_window_ms = 2.5\nserve_max_batch = 16\n", "p.toml")
    assert (p.serve_window_ms, p.serve_max_batch) == (2.5, 16)
    assert (
        p.deploy == "torch"
        and parse_profile(GOOD + 'deploy = "onnxruntime"\n', "p.toml").deploy == "onnxruntime"
    )
