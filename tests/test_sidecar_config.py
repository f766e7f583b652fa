"""The sidecar's typed configuration: file < environment < flags, unknown keys refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from plugin.config import load_config


def test_file_environment_and_flags_layer_in_that_order(tmp_path):
    f = tmp_path / "sidecar.yaml"
    f.write_text(
        "triton_url: 10.0.0.1:8001\nmax_queue: 10\nmode: released\n"
        "models:\n  emulated_gpu: {policy: 'timeout:0.002', max_batch: 16}\n"
    )
    env = {"SMDP_SIDECAR_MAX_QUEUE": "20", "SMDP_SIDECAR_DEFAULT_POLICY": "threshold:4"}
    cfg = load_config(f, overrides={"triton_url": "127.0.0.1:9001"}, environ=env)
    assert cfg.triton_url == "127.0.0.1:9001"  # flag beats file
    assert cfg.max_queue == 20  # environment beats file
    assert cfg.mode == "released"
    assert cfg.policy_for("emulated_gpu").policy == "timeout:0.002"
    assert cfg.policy_for("emulated_gpu").max_batch == 16
    assert cfg.policy_for("other").policy == "threshold:4"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("max_queu: 5\n", "max_queu"),  # typo in a key
        ("models:\n  m: {polcy: greedy}\n", "polcy"),
        ("models:\n  m: {policy: 'timeout:-1'}\n", "timeout:-1"),
        ("models:\n  m: {policy: fastest}\n", "fastest"),
        ("models:\n  m: {weight: -1}\n", "weight"),
        ("models:\n  m: {weight: .nan}\n", "weight"),
        ("mode: sometimes\n", "mode"),
        ("max_queue: 0\n", "max_queue"),
    ],
)
def test_bad_settings_are_refused_with_the_offending_name(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises((ValidationError, ValueError)) as info:
        load_config(f, environ={})
    assert needle in str(info.value)


def test_unknown_environment_setting_is_refused():
    with pytest.raises(ValueError, match="SMDP_SIDECAR_LISTN"):
        load_config(environ={"SMDP_SIDECAR_LISTN": "0.0.0.0:1"})
