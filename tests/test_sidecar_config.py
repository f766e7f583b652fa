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


def test_unknown_model_ttl_is_a_duration_in_seconds_and_zero_turns_it_off():
    assert load_config(environ={}).unknown_model_ttl_s == 1.0
    assert load_config(environ={"SMDP_SIDECAR_UNKNOWN_MODEL_TTL_S": "0"}).unknown_model_ttl_s == 0.0
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="unknown_model_ttl_s"):
            load_config(overrides={"unknown_model_ttl_s": bad}, environ={})


@pytest.mark.parametrize("listen, token, warned", [("0.0.0.0:0", None, True), ("0.0.0.0:0", "s3cret", False),
                                                   ("127.0.0.1:0", None, False)])
def test_sidecar_warns_at_start_when_its_control_api_is_exposed_without_a_token(caplog, listen, token, warned):
    from plugin.runner import SidecarThread

    cfg = load_config(overrides={"listen": "127.0.0.1:0", "control_listen": listen, "control_token": token,
                                 "metrics_listen": "127.0.0.1:0", "triton_url": "127.0.0.1:9"}, environ={})
    with caplog.at_level("WARNING", logger="smdp.control"):
        with SidecarThread(cfg) as sc:
            assert sc.control_port
    hits = [r.getMessage() for r in caplog.records if r.name == "smdp.control" and r.levelname == "WARNING"]
    assert bool(hits) is warned
    assert all("control API on 0.0.0.0:0 has no token" in m for m in hits)


# -- `smdp serve`'s flags come from the typed configuration ----------------------------------------


def _serve_parser():
    import argparse

    from smdp.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _serve(argv: list[str]):
    return _serve_parser().parse_args(argv)


def test_serve_flags_set_their_fields_and_only_when_given(tmp_path, monkeypatch):
    from plugin.serve_cli import config_from_args

    import os

    for key in [k for k in os.environ if k.startswith("SMDP_SIDECAR_")]:
        monkeypatch.delenv(key)
    f = tmp_path / "sidecar.yaml"
    f.write_text("max_queue: 10\ndefault: {policy: 'threshold:3', weight: 0.25}\n")
    cfg = config_from_args(_serve(["--config", str(f), "--triton", "10.0.0.1:1", "--idle-power", "55",
                                   "--rate", "20", "--data-plane", "python", "--metrics-listen", "none",
                                   "--fixed"]))
    assert cfg.triton_url == "10.0.0.1:1" and cfg.data_plane == "python" and cfg.metrics_listen is None
    assert cfg.max_queue == 10  # not given: the file's
    d = cfg.default
    assert (d.policy, d.weight, d.idle_power_w, d.rate_rps, d.adaptive) == ("threshold:3", 0.25, 55.0, 20.0, False)
    plain = config_from_args(_serve([]))
    assert plain.control_listen == "127.0.0.1:8012" and plain.default.adaptive is True


def test_serve_flags_show_the_configured_default_and_refuse_what_the_field_refuses(capsys):
    from plugin.config import ModelPolicyConfig, SidecarConfig
    from plugin.serve_cli import POLICY_FLAGS, TOP_FLAGS, config_from_args

    parser_actions = {a.option_strings[-1]: a for a in _serve_parser()._actions if a.option_strings}
    for flags, model in ((TOP_FLAGS, SidecarConfig), (POLICY_FLAGS, ModelPolicyConfig)):
        for flag, field in flags.items():
            info = model.model_fields[field]
            shown = "none" if info.default is None else str(info.default)
            assert parser_actions[flag].help.endswith(f"(default: {shown})"), flag
            assert parser_actions[flag].default is None  # not given: the file and environment decide
    with pytest.raises(SystemExit):
        _serve(["--mode", "sideways"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="weight"):
        config_from_args(_serve(["--weight", "-1"]))


def test_allow_repository_control_has_a_serve_switch_and_the_file_still_decides_without_it(tmp_path):
    import argparse

    from plugin.serve_cli import add_serve_command, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    on = tmp_path / "on.yaml"
    on.write_text("allow_repository_control: true\n")
    assert config_from_args(parser.parse_args(["serve"])).allow_repository_control is False
    assert config_from_args(parser.parse_args(["serve", "--allow-repository-control"])).allow_repository_control
    assert config_from_args(parser.parse_args(["serve", "--config", str(on)])).allow_repository_control


def test_the_gate_holds_for_a_group_only_where_the_policy_was_solved_for_groups():
    from plugin.config import ModelPolicyConfig
    from plugin.policies import gate_rule
    from solver.arrival_model import POISSON, parse_arrivals
    from solver.policy import GateRule, greedy

    grouped = parse_arrivals("batch:3")
    cfg = ModelPolicyConfig(policy="greedy", max_wait_s=0.5)
    assert GateRule.of(gate_rule(cfg, greedy(4), grouped)).hold_s == pytest.approx(0.0005)
    assert GateRule.of(gate_rule(cfg, greedy(4), POISSON)).hold_s == 0
    assert GateRule.of(gate_rule(cfg, greedy(4), parse_arrivals("batch:1.05"))).hold_s == 0  # chance neighbours
    assert GateRule.of(gate_rule(cfg, greedy(4), parse_arrivals("mmpp:210,30:0.5,1"))).hold_s == 0  # no groups
    assert GateRule.of(gate_rule(cfg, greedy(4), parse_arrivals("mmpp:210,30:0.5,1:3,1.2"))).hold_s > 0
    off = cfg.model_copy(update={"group_hold_s": 0.0})
    assert GateRule.of(gate_rule(off, greedy(4), grouped)).hold_s == 0
    assert GateRule.of(gate_rule(cfg, greedy(4), grouped)).max_wait_s == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ModelPolicyConfig(group_hold_s=-0.001)
