"""Structural checks of the deployment files: compose, Dockerfile, Kubernetes, operator guide.

No Docker daemon or cluster is available where the suite runs, so every cross-reference is checked
against the real thing it names instead: sub-commands and flags are parsed by the real ``smdp``
argparse parser, Locust flags by Locust's parser with the project's locustfile loaded, Triton flags
against the embedded ``tritonserver --help``, configs by ``plugin.config.load_config``, paths and
model names against the repository, ports against what each service actually binds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
DOC = ROOT / "docs" / "operations.md"
OUR_IMAGE = "smdp-batching"
APP_DIR = "/app"  # WORKDIR of the image: relative paths in the sidecar config resolve against it

sys.path.insert(0, str(ROOT / "deploy"))
import config_doc  # noqa: E402
import healthcheck  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Loading


class _Reset:
    """Compose's ``!reset`` (drop the attribute when merging an override file)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _Override:
    """Compose's ``!override`` (replace instead of merging)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class _ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(cls):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))

    return construct


_ComposeLoader.add_constructor("!reset", _tagged(_Reset))
_ComposeLoader.add_constructor("!override", _tagged(_Override))


def load_compose(path: Path = COMPOSE) -> dict:
    data = yaml.load(path.read_text(), Loader=_ComposeLoader)
    assert isinstance(data, dict), f"{path.name}: expected a mapping"
    return data


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for mappings and the two tags (sequences are replaced)."""
    if isinstance(override, _Reset):
        return None
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            merged = merge_compose(base.get(key), value)
            if merged is None and isinstance(value, _Reset):
                out.pop(key, None)
            else:
                out[key] = merged
        return out
    return override


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    return k8s_documents()


def _kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _smdp_parser() -> argparse.ArgumentParser:
    from smdp.cli import build_parser

    return build_parser()


def parse_smdp(argv: list[str]) -> argparse.Namespace:
    """Parse with the real ``smdp`` parser; argparse's complaint becomes the assertion message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _smdp_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`smdp {shlex.join(argv)}` is rejected by the real parser:\n{err.getvalue()}")


def _subcommands() -> set[str]:
    parser = _smdp_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag=value`` or ``--flag value`` in an argument list (the last one wins)."""
    found = None
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(argv):
            found = argv[i + 1]
    return found


def _flag_values(argv: list[str], flag: str) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            out.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
    return out


def _port(address: str) -> int:
    host, port = healthcheck.split_address(address)
    return port


def _host(address: str) -> str:
    return healthcheck.split_address(address)[0]


def _is_ours(service: dict) -> bool:
    return "build" in service or str(service.get("image", "")).startswith(OUR_IMAGE)


def _argv(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _entrypoint(service: dict) -> list[str] | None:
    ep = service.get("entrypoint")
    if ep is None:
        return None
    return shlex.split(ep) if isinstance(ep, str) else [str(c) for c in ep]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")


def _resolved_environment(service: dict, placeholder: str = "compose-interpolated") -> dict[str, str]:
    """The service's environment with every ``${VAR...}`` replaced by a stand-in value."""
    return {k: _INTERPOLATION.sub(placeholder, v) for k, v in _environment(service).items()}


def _volumes(service: dict) -> list[tuple[str, str, bool]]:
    """(host path, container path, read-only) of bind mounts, short and long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def _host_path(service: dict, container_path: str) -> Path | None:
    """The repository file a container path is mounted from (the longest matching mount)."""
    best = None
    for host, target, _ in _volumes(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            if best is None or len(target) > len(best[1]):
                best = (host, target)
    if best is None:
        return None
    rest = container_path[len(best[1]):].lstrip("/")
    return (ROOT / best[0]).resolve() / rest if rest else (ROOT / best[0]).resolve()


def _sidecar_config(service: dict):
    """The SidecarConfig the compose sidecar runs with: mounted file < compose environment < flags."""
    from plugin.config import load_config

    args = parse_smdp(_argv(service))
    path = _host_path(service, args.config)
    assert path is not None and path.is_file(), f"sidecar --config {args.config} is not mounted from the repository"
    return load_config(path, overrides=_flag_overrides(args), environ=_resolved_environment(service))


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The top-level SidecarConfig fields ``smdp serve`` flags set (flags named after their field)."""
    from plugin.config import SidecarConfig

    return {k: v for k, v in vars(args).items() if k in SidecarConfig.model_fields and v is not None}


def _listen_fields(config) -> dict[str, str]:
    """Every address field the sidecar binds (listen, listen_http, control_listen, metrics_listen, ...) that is set."""
    return {name: getattr(config, name) for name in type(config).model_fields
            if (name == "listen" or name.startswith("listen_") or name.endswith("_listen")) and getattr(config, name)}


def _model_config(name: str) -> str:
    path = ROOT / "model_repository" / name / "config.pbtxt"
    assert path.is_file(), f"model {name!r} is not in model_repository/ ({path} missing)"
    return path.read_text()


def _model_max_batch(name: str) -> int:
    m = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", _model_config(name), re.M)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------------------------------
# What each compose service listens on, derived from its own command and configuration


def listening_ports(name: str, service: dict) -> set[int]:
    argv = _argv(service)
    entry = _entrypoint(service)
    image = str(service.get("image", ""))
    if image.startswith("nvcr.io/nvidia/tritonserver"):
        return {int(_flag_value(argv, "--http-port") or 8000), int(_flag_value(argv, "--grpc-port") or 8001),
                int(_flag_value(argv, "--metrics-port") or 8002)}
    if image.startswith("prom/prometheus"):
        return {_port(_flag_value(argv, "--web.listen-address") or "0.0.0.0:9090")}
    if _is_ours(service) and entry == ["locust"]:
        if "--worker" in argv:
            return set()
        return {int(_flag_value(argv, "--web-port") or 8089), int(_flag_value(argv, "--master-bind-port") or 5557)}
    if _is_ours(service) and entry is None:
        args = parse_smdp(argv)
        if args.command == "serve":
            return {_port(a) for a in _listen_fields(_sidecar_config(service)).values()}
        if args.command == "solver-serve":
            return {_port(args.listen)}
    raise AssertionError(f"service {name!r}: no rule for what it listens on; teach listening_ports()")


@pytest.fixture(scope="module")
def ports(services) -> dict[str, set[int]]:
    return {name: listening_ports(name, svc) for name, svc in services.items()}


# --------------------------------------------------------------------------------------------------
# Compose


EXPECTED_SERVICES = {"triton", "solver", "sidecar", "locust-master", "locust-worker", "prometheus"}


def test_compose_has_the_stack(services):
    assert set(services) == EXPECTED_SERVICES


def test_every_service_has_an_image_or_build_and_a_healthcheck(services):
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name}: neither image nor build"
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = str(svc["image"])
        assert ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    assert services["triton"]["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"


def test_our_services_build_the_project_image(services):
    ours = [n for n, s in services.items() if _is_ours(s)]
    assert set(ours) == {"solver", "sidecar", "locust-master", "locust-worker"}
    for name in ours:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_smdp_commands_exist_and_their_flags_parse(services):
    subcommands = _subcommands()
    seen = set()
    for name, svc in services.items():
        if not _is_ours(svc) or _entrypoint(svc) is not None:
            continue
        argv = _argv(svc)
        assert argv and argv[0] in subcommands, f"{name}: `smdp {argv[:1]}` is not a sub-command of smdp"
        args = parse_smdp(argv)
        assert callable(getattr(args, "func", None)), f"{name}: smdp {argv[0]} sets no func"
        seen.add(argv[0])
    assert seen == {"serve", "solver-serve"}


def test_locust_commands_parse_with_the_locustfile_options(services):
    """Locust's own parser, with the project's locustfile loaded (its custom flags), in a subprocess:
    the locustfile patches grpc for gevent, which must not leak into this test process."""
    cases = {}
    env_names = set()
    for name, svc in services.items():
        if _entrypoint(svc) == ["locust"]:
            argv = _argv(svc)
            locustfile = _flag_value(argv, "-f")
            assert locustfile and locustfile.startswith(APP_DIR + "/"), f"{name}: -f {locustfile}"
            assert (ROOT / locustfile[len(APP_DIR) + 1:]).is_file(), f"{name}: {locustfile} not in the repository"
            local = ["-f", str(ROOT / locustfile[len(APP_DIR) + 1:])] + [a for a in argv if a not in ("-f", locustfile)]
            cases[name] = local
            env_names |= {k for k in _environment(svc) if k.startswith("LOCUST_")}
    assert set(cases) == {"locust-master", "locust-worker"}
    script = r"""
import json, sys
import loadtest.locustfile  # registers the custom arguments
from locust.argument_parser import get_parser
cases = json.loads(sys.argv[1])
parser = get_parser()
out = {"env_vars": sorted({a.env_var for a in parser._actions if getattr(a, "env_var", None)})}
for name, argv in cases.items():
    ns = parser.parse_args(argv)
    out[name] = {k: getattr(ns, k, None) for k in ("host", "master", "worker", "master_host", "master_port",
                                                     "model", "arrivals", "rate", "num_users")}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"Locust rejects the compose command:\n{proc.stderr[-3000:]}"
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    master, worker = parsed["locust-master"], parsed["locust-worker"]
    assert master["master"] and worker["worker"]
    assert worker["master_host"] == "locust-master"
    assert int(worker["master_port"]) == int(_flag_value(_argv(services["locust-master"]), "--master-bind-port") or 5557)
    assert master["model"] in ("emulated_gpu", "cpu_mlp") and _model_config(master["model"])
    assert not env_names - set(parsed["env_vars"]), f"unknown Locust settings: {env_names - set(parsed['env_vars'])}"
    sidecar_listen = _sidecar_config(services["sidecar"]).listen
    assert master["host"] == f"sidecar:{_port(sidecar_listen)}", "Locust must load the sidecar, not Triton"


def _tritonserver_flags() -> set[str]:
    from plugin.launcher.triton_server import TritonUnavailable, locate_triton

    try:
        dist = locate_triton()
    except TritonUnavailable as exc:
        pytest.skip(f"no runnable tritonserver to ask for its flags: {exc}")
    env = dict(os.environ, LD_LIBRARY_PATH=f"{dist.libs_path}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    proc = subprocess.run([str(dist.binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", proc.stdout + proc.stderr, re.M))
    assert "--model-repository" in flags, f"unexpected tritonserver --help output:\n{proc.stdout[-2000:]}"
    return flags


def _triton_commands(services, k8s) -> dict[str, list[str]]:
    out = {"compose": _argv(services["triton"])}
    for dep in _kind(k8s, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("nvcr.io/nvidia/tritonserver"):
                out[f"k8s {dep['metadata']['name']}"] = [*c.get("command", []), *c.get("args", [])]
    return out


def test_triton_flags_are_known_to_tritonserver(services, k8s):
    known = _tritonserver_flags()
    for where, argv in _triton_commands(services, k8s).items():
        assert argv[0] == "tritonserver", f"{where}: {argv[0]}"
        for arg in argv[1:]:
            assert arg.startswith("--"), f"{where}: positional {arg!r}"
            assert arg.split("=", 1)[0] in known, f"{where}: tritonserver has no flag {arg}"


def test_triton_loads_existing_models_from_the_read_only_mount(services, k8s):
    commands = _triton_commands(services, k8s)
    assert len(commands) == 2
    for where, argv in commands.items():
        assert _flag_value(argv, "--model-control-mode") == "explicit", where
        models = _flag_values(argv, "--load-model")
        assert set(models) == {"emulated_gpu", "cpu_mlp"}, where
        for model in models:
            assert re.search(rf'^\s*name\s*:\s*"{model}"', _model_config(model), re.M), f"{where}: {model}"
    triton = services["triton"]
    repo = _flag_value(_argv(triton), "--model-repository")
    mounts = {target: (host, ro) for host, target, ro in _volumes(triton)}
    assert repo in mounts, f"--model-repository {repo} is not a mount"
    host, read_only = mounts[repo]
    assert (ROOT / host).resolve() == ROOT / "model_repository" and read_only


def test_mounted_host_paths_exist(services):
    for name, svc in services.items():
        for host, target, _ in _volumes(svc):
            if host.startswith((".", "/")):
                assert (ROOT / host).exists(), f"{name}: mounts {host} -> {target}, which is not in the repository"


def test_named_volumes_are_declared_and_our_images_can_write_them(services):
    """A named volume must be declared at the top level, and one mounted into our (non-root) image
    must sit where the Dockerfile made a directory owned by the image's user: Docker seeds a new
    named volume with that directory's owner, so the container can write its output there."""
    declared = set((load_compose(COMPOSE).get("volumes") or {}))
    user = next(a for i, a in reversed(_dockerfile()) if i == "USER").split(":")[0]
    runs = " ".join(a for i, a in _dockerfile() if i == "RUN")
    for name, svc in services.items():
        for host, target, read_only in _volumes(svc):
            if host.startswith((".", "/")):
                continue
            assert host in declared, f"{name}: named volume {host} is not declared under volumes:"
            if _is_ours(svc) and not read_only:
                assert re.search(rf"mkdir (-p )?{re.escape(target)}\b", runs), f"{name}: {target} not made in the image"
                assert re.search(rf"chown {user}(:\d+)? {re.escape(target)}\b", runs), \
                    f"{name}: {target} is not owned by the image's user {user}"


def test_gpu_is_reserved_in_the_base_file_and_dropped_by_the_cpu_override():
    base, cpu = load_compose(COMPOSE), load_compose(COMPOSE_CPU)
    devices = base["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for name, svc in base["services"].items():
        if name != "triton":
            assert "devices" not in json.dumps(svc.get("deploy", {})), f"{name} asks for a device"
    # Compose merges some sequences instead of replacing them; only `!reset` removes for certain.
    assert isinstance(cpu["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"], _Reset)
    merged = merge_compose(base, cpu)
    reservations = merged["services"]["triton"]["deploy"]["resources"]["reservations"]
    assert not reservations.get("devices"), "the CPU override leaves a device reservation"
    # The override changes nothing else.
    assert set(cpu["services"]) == {"triton"} and set(cpu["services"]["triton"]) == {"deploy"}
    stripped = {k: v for k, v in merged["services"]["triton"].items() if k != "deploy"}
    assert stripped == {k: v for k, v in base["services"]["triton"].items() if k != "deploy"}


def test_start_order_waits_for_healthy_dependencies(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec.get("condition") == "service_healthy", f"{name} -> {dep}: {spec}"
    assert set(services["sidecar"]["depends_on"]) == {"triton", "solver"}
    assert "sidecar" in services["locust-master"]["depends_on"]
    assert "locust-master" in services["locust-worker"]["depends_on"]
    # No cycle: a topological order exists.
    order, pending = [], dict(services)
    while pending:
        ready = [n for n, s in pending.items() if set(s.get("depends_on", {})) <= set(order)]
        assert ready, f"depends_on cycle among {sorted(pending)}"
        order += ready
        for n in ready:
            del pending[n]


def test_published_and_exposed_ports_are_ports_the_service_listens_on(services, ports):
    for name, svc in services.items():
        declared = set()
        for p in svc.get("ports", []):
            declared.add(int(str(p).split(":")[-1].split("/")[0]) if not isinstance(p, dict) else int(p["target"]))
        declared |= {int(str(p).split("/")[0]) for p in svc.get("expose", [])}
        assert declared <= ports[name], f"{name}: declares {sorted(declared - ports[name])} but listens on {ports[name]}"


def test_sidecar_points_at_the_triton_and_solver_services(services, ports):
    config = _sidecar_config(services["sidecar"])
    assert _host(config.triton_url) == "triton" and _port(config.triton_url) == int(
        _flag_value(_argv(services["triton"]), "--grpc-port") or 8001)
    if config.listen_http:  # the HTTP listener relays everything but inference to Triton's HTTP port
        assert config.triton_http_url == f"triton:{int(_flag_value(_argv(services['triton']), '--http-port') or 8000)}"
    solver_args = parse_smdp(_argv(services["solver"]))
    assert config.solver_url == f"solver:{_port(solver_args.listen)}"
    assert _host(solver_args.listen) == "0.0.0.0", "the solver must accept connections from other containers"


def test_every_sidecar_listener_is_reachable_and_published(services):
    config = _sidecar_config(services["sidecar"])
    published = {int(str(p).split(":")[-1]) for p in services["sidecar"].get("ports", [])}
    for field, address in _listen_fields(config).items():
        assert _host(address) == "0.0.0.0", f"sidecar {field} = {address} is unreachable from other containers"
        assert _port(address) in published, f"sidecar {field} port {_port(address)} is not published"


def test_control_api_off_localhost_requires_a_token_from_the_environment(services):
    svc = services["sidecar"]
    config = _sidecar_config(svc)
    assert config.control_listen and _host(config.control_listen) not in ("127.0.0.1", "localhost", "::1")
    raw = _environment(svc).get("SMDP_SIDECAR_CONTROL_TOKEN", "")
    m = _INTERPOLATION.fullmatch(raw)
    assert m and ":?" in raw, f"the control token must come from a required variable, got {raw!r}"
    assert config.control_token, "the token does not reach the sidecar's configuration"
    assert "control_token" not in yaml.safe_load((ROOT / "deploy" / "sidecar.yaml").read_text())


def test_prometheus_scrapes_every_metrics_port(services, ports):
    prom = services["prometheus"]
    path = _host_path(prom, _flag_value(_argv(prom), "--config.file"))
    assert path is not None and path.is_file()
    config = yaml.safe_load(path.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    for target in targets:
        host, port = healthcheck.split_address(target)
        service = "prometheus" if host in ("localhost", "127.0.0.1") else host
        assert service in services, f"scrape target {target}: no service {host}"
        assert port in ports[service], f"scrape target {target}: {service} listens on {sorted(ports[service])}"
    metrics_port = int(_flag_value(_argv(services["triton"]), "--metrics-port") or 8002)
    assert f"triton:{metrics_port}" in targets
    sidecar_metrics = _sidecar_config(services["sidecar"]).metrics_listen
    assert sidecar_metrics and f"sidecar:{_port(sidecar_metrics)}" in targets


def test_healthchecks_probe_ports_that_exist(services, ports):
    for name, svc in services.items():
        test = svc["healthcheck"]["test"]
        if "/app/deploy/healthcheck.py" in test:
            assert _is_ours(svc)
            kind, target = test[test.index("/app/deploy/healthcheck.py") + 1:][:2]
            host, port = healthcheck.split_address(target) if kind != "http" else (None, None)
            if kind == "http":
                continue
            owner = name if host in ("127.0.0.1", "localhost") else host
            assert owner in services and port in ports[owner], f"{name}: health probe on {target}"
        else:
            urls = re.findall(r"https?://[^'\" ]+", " ".join(test))
            assert urls, f"{name}: health check names no URL: {test}"
            for url in urls:
                port = int(re.match(r"https?://[^:/]+:(\d+)", url).group(1))
                assert port in ports[name], f"{name}: health probe on {url}"
    triton_test = " ".join(services["triton"]["healthcheck"]["test"])
    assert "/v2/health/ready" in triton_test


def test_sidecar_health_probe_names_the_inference_service(services):
    from plugin.server import SERVICE
    from solver.service import SERVICE_NAME

    assert services["sidecar"]["healthcheck"]["test"][-1] == SERVICE
    assert services["solver"]["healthcheck"]["test"][-1] == SERVICE_NAME


# --------------------------------------------------------------------------------------------------
# Sidecar configuration files


def _check_sidecar_models(config, where: str, loaded: set[str]) -> None:
    from solver.model import BatchingModel, ServiceProfile

    for model, policy in config.models.items():
        assert model in loaded, f"{where}: model {model!r} is not loaded by Triton ({sorted(loaded)})"
        limit = _model_max_batch(model)
        if policy.max_batch is not None:
            assert policy.max_batch <= limit, f"{where}: {model} max_batch {policy.max_batch} > {limit}"
        if policy.profile is not None:
            assert not policy.profile.is_absolute(), f"{where}: use a path relative to {APP_DIR}"
            path = ROOT / policy.profile
            assert path.is_file(), f"{where}: {model} profile {policy.profile} is not in the image"
            if policy.rate_rps is not None:
                # Raises when the configured rate is at or above the profile's capacity B / tau(B).
                BatchingModel(rate=policy.rate_rps, max_batch=policy.max_batch or limit,
                              profile=ServiceProfile.from_csv(path), idle_power_w=policy.idle_power_w,
                              weight=policy.weight)


def test_compose_sidecar_config_validates(services):
    from plugin.config import load_config

    config = load_config(ROOT / "deploy" / "sidecar.yaml", environ={})
    loaded = set(_flag_values(_argv(services["triton"]), "--load-model"))
    _check_sidecar_models(config, "deploy/sidecar.yaml", loaded)
    assert config.models["emulated_gpu"].policy == "smdp"


def test_commented_native_data_plane_option_is_valid(tmp_path, k8s):
    """deploy/sidecar.yaml and the ConfigMap offer `data_plane: native` as a commented line: taking
    the comment away gives a configuration that loads and selects the native plane."""
    from plugin.config import load_config

    configmap = next(d for d in k8s if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "smdp-sidecar-config")
    texts = {"deploy/sidecar.yaml": (ROOT / "deploy" / "sidecar.yaml").read_text(),
             "deploy/k8s/sidecar-config.yaml": configmap["data"]["sidecar.yaml"]}
    for name, text in texts.items():
        lines = [line for line in text.splitlines() if re.match(r"\s*# data_plane: native\b", line)]
        assert len(lines) == 1, f"{name}: expected one commented `data_plane: native` line"
        on = tmp_path / "native.yaml"
        on.write_text(text.replace(lines[0], lines[0].replace("# data_plane", "data_plane", 1)))
        assert load_config(on, environ={}).data_plane == "native", name
        assert load_config(on, environ={}).mode == "merged", f"{name}: the native plane runs merged mode only"


def test_bad_sidecar_config_is_refused(tmp_path):
    """The validation the tests above rely on is real: an unknown key or a bad value fails."""
    from pydantic import ValidationError

    from plugin.config import load_config

    text = (ROOT / "deploy" / "sidecar.yaml").read_text()
    bad = tmp_path / "typo.yaml"
    bad.write_text(text.replace("max_queue:", "max_qeue:"))
    with pytest.raises(ValidationError, match="max_qeue"):
        load_config(bad, environ={})
    bad.write_text(text.replace("weight: 1.0e-4", "weight: -1"))
    with pytest.raises(ValidationError, match="weight"):
        load_config(bad, environ={})


# --------------------------------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def _stages() -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(base image, stage name or None, instructions after its FROM) for each build stage, in order."""
    stages: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for ins, args in _dockerfile():
        if ins == "FROM":
            words = args.split()
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), f"FROM {args}"
            stages.append((words[0], words[2] if len(words) == 3 else None, []))
        else:
            assert stages, f"{ins} before the first FROM"
            stages[-1][2].append((ins, args))
    return stages


def _dockerignore() -> list[str]:
    return [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _excluded(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` out of the build context (Docker's rule: the last pattern
    that matches the path or a folder above it decides; ``!`` brings a path back)."""
    from fnmatch import fnmatchcase

    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    out = False
    for pattern in _dockerignore():
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if any(fnmatchcase(p, pattern) for p in prefixes):
            out = not keep
    return out


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context():
    stages = _stages()
    copies = [(i, args) for i, (_, _, ins) in enumerate(stages) for kind, args in ins if kind == "COPY"]
    assert copies
    sources = set()
    for index, args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        origin = [p.split("=", 1)[1] for p in shlex.split(args) if p.startswith("--from=")]
        if origin:  # from an earlier build stage, not from the build context
            earlier = [name for _, name, _ in stages[:index]]
            assert origin[0] in earlier, f"COPY {args}: --from names no earlier stage ({earlier})"
            continue
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _excluded(src), f"COPY {src}: excluded by .dockerignore"
            sources.add(src)
    assert {"profiles", "model_repository", "pyproject.toml", "deploy/healthcheck.py"} <= sources
    for package in ("smdp", "solver", "plugin", "loadtest"):
        assert package in sources, f"package {package} is not copied"


def test_dockerfile_shape():
    stages = _stages()
    # Pinned to one Debian release: the final stage installs the gate's runtime libraries by name.
    assert [base for base, _, _ in stages] == ["python:3.11-slim-bookworm"] * 2
    ins = stages[-1][2]  # the image itself; the build stage's instructions do not reach it
    get = lambda name: [a for i, a in ins if i == name]  # noqa: E731
    assert get("WORKDIR") == [APP_DIR]
    user = get("USER")
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    installs = [a for a in get("RUN") if "pip install" in a]
    assert installs and all(".[loadtest]" in a and "triton" not in a for a in installs)
    assert json.loads(get("ENTRYPOINT")[-1]) == ["smdp"]
    health = get("HEALTHCHECK")[-1]
    assert "CMD" in health and "/app/deploy/healthcheck.py" in health and "grpc" in health


def test_dockerfile_exposes_every_port_our_services_listen_on(services, ports):
    exposed = {int(p) for a in (a for i, a in _dockerfile() if i == "EXPOSE") for p in a.split()}
    for name, svc in services.items():
        if _is_ours(svc):
            assert ports[name] <= exposed, f"{name} listens on {sorted(ports[name] - exposed)}, not EXPOSEd"


def test_dockerignore_keeps_what_the_build_needs():
    assert all(map(_excluded, [".git", ".venv", "out", "tests/test_gate.py", "native/build"]))
    kept = ["deploy", "profiles", "model_repository", "smdp", "solver", "plugin", "loadtest", "native",
            "tests/vectors/gate.json"]
    assert not any(map(_excluded, kept))


def _apt_installs(instructions: list[tuple[str, str]]) -> set[str]:
    """Package names of the ``apt-get install`` commands among a stage's RUN instructions."""
    packages = set()
    for kind, args in instructions:
        if kind != "RUN":
            continue
        for cmd in re.split(r"\s*(?:&&|;|\|\|)\s*", args):
            words = shlex.split(cmd)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


GATE_RUNTIME_PACKAGES = {"libgrpc++1.51", "libprotobuf32"}  # bookworm's gRPC C++ 1.51 and protobuf 3.21


def test_dockerfile_builds_the_native_gate_onto_path():
    """data_plane: native needs smdp-gate in the image: built in a stage with the packages
    native/install_deps.sh installs, copied to a directory on PATH (find_binary's last resort: the
    image has no native/build tree), with its runtime libraries beside it."""
    stages = _stages()
    assert len(stages) == 2, "expected a build stage for smdp-gate and the image"
    (_, build_name, build), (_, _, final) = stages
    deps = re.search(r'^pkgs="([^"]+)"', (ROOT / "native" / "install_deps.sh").read_text(), re.M)
    assert deps and set(deps.group(1).split()) <= _apt_installs(build), "the build stage lacks build dependencies"
    runs = " ".join(a for i, a in build if i == "RUN")
    assert "tritonclient[grpc]" in runs, "native/gen_descriptors.py needs tritonclient in the build stage"
    assert re.search(r"make -C native\b[^&]*\bPYTHON=python\b[^&]*\ball\b", runs)
    assert re.search(r"make -C native\b[^&]*\btest\b", runs), "the gate's unit tests should gate the build"
    workdir = [a for i, a in build if i == "WORKDIR"][-1]
    copied = [shlex.split(a) for i, a in final if i == "COPY" and a.startswith(f"--from={build_name} ")]
    assert [c[1:] for c in copied] == [[f"{workdir}/native/build/smdp-gate", "/usr/local/bin/smdp-gate"]]
    path = [a for i, a in final if i == "ENV" and a.startswith("PATH")]
    assert not path, "the image keeps the base image's PATH (with /usr/local/bin)"
    assert _apt_installs(final) == GATE_RUNTIME_PACKAGES, "the image installs only the gate's runtime libraries"
    assert not any(p.endswith("-dev") or p in ("g++", "make") for p in _apt_installs(final))
    # installed before USER drops root
    user_at = max(n for n, (i, _) in enumerate(final) if i == "USER")
    assert all(n < user_at for n, (i, a) in enumerate(final) if i == "RUN" and "apt-get" in a)


@pytest.mark.skipif(not shutil.which("apt-cache") or "bookworm" not in (
    Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""),
    reason="needs Debian bookworm's apt-cache to look the package names up")
def test_gate_runtime_packages_exist_in_bookworm():
    for package in sorted(GATE_RUNTIME_PACKAGES):
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True)
        assert out.returncode == 0 and f"Package: {package}" in out.stdout, f"bookworm has no package {package}"


# --------------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests_parse_and_kustomization_lists_them(k8s):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = sorted(d["kind"] for d in k8s)
    assert kinds.count("Deployment") == 2 and "ConfigMap" in kinds and "Secret" in kinds
    for doc in k8s:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), f"{doc['__file__']}: {doc.get('kind')}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests():
    proc = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert len(docs) == len(k8s_documents())
    assert all(d["metadata"].get("namespace") == "smdp" for d in docs if d["kind"] != "Namespace")


def _containers(dep: dict) -> list[dict]:
    return dep["spec"]["template"]["spec"]["containers"]


def test_k8s_containers_have_probes_and_resources(k8s):
    for dep in _kind(k8s, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            where = f"{dep['metadata']['name']}/{c['name']}"
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{where}: probes"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: {kind}"
        for c in spec.get("initContainers", []):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get("limits", {})), c["name"]


def _role(c: dict) -> str:
    if c["image"].startswith("nvcr.io/nvidia/tritonserver"):
        return "triton"
    argv = [*c.get("command", []), *c.get("args", [])]
    if c["image"].startswith(OUR_IMAGE) and argv and argv[0] in ("serve", "solver-serve"):
        return argv[0]
    return "other"


def _port_number(container: dict, ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert ref in named, f"{container['name']}: no port named {ref!r}"
    return named[ref]


def _k8s_sidecar_config(k8s: list[dict], dep: dict, container: dict, tmp: Path):
    """The SidecarConfig one pod's sidecar runs with: the mounted ConfigMap key, its env and flags."""
    from plugin.config import load_config

    args = parse_smdp([*container.get("command", []), *container.get("args", [])])
    mount_dir, key = os.path.split(args.config)
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_dir), None)
    assert mount, f"{container['name']}: --config {args.config} is not on a mount"
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm_name = volume["configMap"]["name"]
    cms = [d for d in _kind(k8s, "ConfigMap") if d["metadata"]["name"] == cm_name]
    assert cms and key in cms[0]["data"], f"ConfigMap {cm_name} with key {key} is missing"
    path = tmp / key
    path.write_text(cms[0]["data"][key])
    env = {e["name"]: "from-secret" for e in container.get("env", []) if "valueFrom" in e}
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return load_config(path, overrides=_flag_overrides(args), environ=env)


def test_k8s_pod_runs_triton_with_its_own_sidecar(k8s, tmp_path):
    pods = [d for d in _kind(k8s, "Deployment") if {_role(c) for c in _containers(d)} >= {"triton", "serve"}]
    assert len(pods) == 1
    dep = pods[0]
    triton = next(c for c in _containers(dep) if _role(c) == "triton")
    sidecar = next(c for c in _containers(dep) if _role(c) == "serve")
    config = _k8s_sidecar_config(k8s, dep, sidecar, tmp_path)
    grpc_port = next(p["containerPort"] for p in triton["ports"] if p["containerPort"] == 8001)
    assert config.triton_url == f"127.0.0.1:{grpc_port}", "the sidecar must talk to its own pod's Triton"
    if config.listen_http:
        http_port = next(p["containerPort"] for p in triton["ports"] if p["containerPort"] == 8000)
        assert config.triton_http_url == f"127.0.0.1:{http_port}", "HTTP relays go to its own pod's Triton"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert triton[probe]["httpGet"]["path"].startswith("/v2/health/")
        assert _port_number(triton, triton[probe]["httpGet"]["port"]) == 8000
        assert _port_number(sidecar, sidecar[probe]["grpc"]["port"]) == _port(config.listen)
    sidecar_ports = {p["containerPort"] for p in sidecar["ports"]}
    for field, address in _listen_fields(config).items():
        assert _host(address) == "0.0.0.0" and _port(address) in sidecar_ports, f"sidecar {field} = {address}"
    # The Triton container reads the repository the init container fills.
    repo = _flag_value([*triton.get("command", []), *triton.get("args", [])], "--model-repository")
    assert any(m["mountPath"] == repo for m in triton["volumeMounts"])
    loaded = set(_flag_values([*triton.get("command", []), *triton.get("args", [])], "--load-model"))
    _check_sidecar_models(config, "ConfigMap smdp-sidecar-config", loaded)
    assert config.models == _compose_models(), "the ConfigMap's models differ from deploy/sidecar.yaml"


def _compose_models():
    from plugin.config import load_config

    return load_config(ROOT / "deploy" / "sidecar.yaml", environ={}).models


def test_k8s_control_token_comes_from_the_secret(k8s, tmp_path):
    secrets = {d["metadata"]["name"]: d for d in _kind(k8s, "Secret")}
    for dep in _kind(k8s, "Deployment"):
        for c in _containers(dep):
            if _role(c) != "serve":
                continue
            config = _k8s_sidecar_config(k8s, dep, c, tmp_path)
            assert config.control_listen and _host(config.control_listen) == "0.0.0.0"
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["SMDP_SIDECAR_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]].get("stringData", {})
            assert config.control_token


def test_k8s_solver_is_shared_and_reachable(k8s, tmp_path):
    solver_deps = [d for d in _kind(k8s, "Deployment") if any(_role(c) == "solver-serve" for c in _containers(d))]
    assert len(solver_deps) == 1
    dep = solver_deps[0]
    c = next(c for c in _containers(dep) if _role(c) == "solver-serve")
    args = parse_smdp([*c.get("command", []), *c.get("args", [])])
    for probe in ("readinessProbe", "livenessProbe"):
        assert _port_number(c, c[probe]["grpc"]["port"]) == _port(args.listen)
    services = {s["metadata"]["name"]: s for s in _kind(k8s, "Service")}
    # Every sidecar's solver_url names the solver Service on a port that reaches the solver's listen port.
    for pod in _kind(k8s, "Deployment"):
        for sc in _containers(pod):
            if _role(sc) != "serve":
                continue
            url = _k8s_sidecar_config(k8s, pod, sc, tmp_path).solver_url
            svc = services[_host(url)]
            assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
            port = next(p for p in svc["spec"]["ports"] if p["port"] == _port(url))
            assert _port_number(c, port.get("targetPort", port["port"])) == _port(args.listen)


def test_k8s_services_select_pods_and_never_expose_triton(k8s):
    deployments = _kind(k8s, "Deployment")
    for svc in _kind(k8s, "Service"):
        name = svc["metadata"]["name"]
        selector = svc["spec"]["selector"]
        matched = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matched, f"Service {name} selects no pod"
        for dep in matched:
            containers = _containers(dep)
            for p in svc["spec"]["ports"]:
                ref = p.get("targetPort", p["port"])
                owners = [c for c in containers
                          if any(ref in (q["containerPort"], q.get("name")) for q in c.get("ports", []))]
                assert len(owners) == 1, f"Service {name} port {p}: no single container owns it"
                assert _role(owners[0]) != "triton", f"Service {name} exposes Triton's port {ref}: use the sidecar's"


def test_k8s_selectors_match_their_templates_and_port_names_are_unique(k8s):
    for dep in _kind(k8s, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        names = [p["name"] for c in _containers(dep) for p in c.get("ports", []) if "name" in p]
        assert len(names) == len(set(names)), f"{dep['metadata']['name']}: duplicate port names {names}"
        assert all(len(n) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", n) for n in names), names
        volumes = {v["name"] for v in dep["spec"]["template"]["spec"].get("volumes", [])}
        for c in [*_containers(dep), *dep["spec"]["template"]["spec"].get("initContainers", [])]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"


def test_k8s_init_container_copies_the_repository_the_image_contains(k8s):
    dep = next(d for d in _kind(k8s, "Deployment") if any(_role(c) == "triton" for c in _containers(d)))
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    src = init["command"][-2]
    assert src.startswith(APP_DIR + "/") and (ROOT / src[len(APP_DIR) + 1:].rstrip("/.")).is_dir()
    copied = [a for i, a in _dockerfile() if i == "COPY" and a.split()[0] == "model_repository"]
    assert copied, "the image does not contain model_repository/"


# --------------------------------------------------------------------------------------------------
# The operator's guide


def test_operations_doc_lists_every_config_field():
    from plugin.config import ModelPolicyConfig, SidecarConfig

    text = DOC.read_text()
    for model in (SidecarConfig, ModelPolicyConfig):
        for name in model.model_fields:
            assert f"`{name}`" in text, f"docs/operations.md does not mention {model.__name__}.{name}"
    assert config_doc.current_block(text) == config_doc.block(), (
        "the sidecar configuration tables in docs/operations.md are stale: run python deploy/config_doc.py --write")


def _doc_commands() -> list[list[str]]:
    """`smdp ...` command lines inside the guide's fenced code blocks, continuation lines joined."""
    blocks, current, lang = [], None, ""
    for line in DOC.read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang in ("bash", "sh"):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unclosed code fence in docs/operations.md"
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().lstrip("$ ")
            for cmd in re.split(r"\s*(?:&&|;|\|)\s*", line):
                words = cmd.split()
                while words and ("=" in words[0] or words[0] in ("exec", "--")):
                    words = words[1:]
                if words and words[0] in ("smdp", ".venv/bin/smdp"):
                    out.append(shlex.split(" ".join(words[1:])))
    return out


def test_operations_doc_commands_parse():
    commands = _doc_commands()
    assert len(commands) >= 8, "expected the guide to show smdp commands"
    for argv in commands:
        if any("$" in a or "<" in a for a in argv):
            argv = [re.sub(r"\$\{?\w+\}?|<[^>]+>", "1", a) for a in argv]
        parse_smdp(argv)


def test_operations_doc_covers_the_required_topics():
    text = DOC.read_text()
    for needle in ("make demo", "make test", "InferenceServerClient", "seconds of mean latency per watt",
                   "smdp ctl", "--headless", "docker compose", "kubectl apply -k deploy/k8s",
                   "SMDP_SIDECAR_", "smdp solve", "power_modelled"):
        assert needle in text, f"docs/operations.md does not cover {needle!r}"


# --------------------------------------------------------------------------------------------------
# The health probe script (pure logic against real local servers)


@pytest.fixture
def grpc_health_server():
    import grpc
    from concurrent import futures
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("svc.Up", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("svc.Down", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port
    server.stop(0)


def test_healthcheck_grpc(grpc_health_server, capsys):
    addr = f"127.0.0.1:{grpc_health_server}"
    assert healthcheck.main(["grpc", addr]) == 0
    assert healthcheck.main(["grpc", addr, "svc.Up"]) == 0
    assert healthcheck.main(["grpc", addr, "svc.Down"]) == 1
    assert healthcheck.main(["grpc", addr, "svc.Unknown", "--timeout", "2"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_grpc_and_tcp_on_a_closed_port():
    port = _free_port()
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert healthcheck.main(["tcp", f"127.0.0.1:{port}", "--timeout", "1"]) == 1


def test_healthcheck_http_and_tcp():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/ok"]) == 0
        assert healthcheck.main(["http", f"http://127.0.0.1:{port}/v2/health/ready"]) == 1
        assert healthcheck.main(["tcp", f"127.0.0.1:{port}"]) == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("argv", [[], ["grpc"], ["udp", "x:1"], ["tcp", "nohost"], ["tcp", "h:0"],
                                  ["tcp", "h:99999"], ["http", "ftp://x"], ["tcp", "h:1", "--timeout", "0"],
                                  ["tcp", "h:1", "--timeout"]])
def test_healthcheck_bad_arguments_read_as_unhealthy(argv, capsys):
    assert healthcheck.main(argv) == 1
    assert capsys.readouterr().err
