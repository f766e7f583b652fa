"""``smdp serve`` runs gRPC with the project's GRPC_EXPERIMENTS (smdp/__init__.py says why).

gRPC reads the setting once, when ``grpc`` is first imported; building the ``smdp`` parser imports
sub-command modules that import gRPC, so the setting must be in the environment before that. This
records the environment at the moment ``grpc`` is first imported, in a fresh interpreter.
"""

import ast
import os
import subprocess
import sys

from smdp import GRPC_EXPERIMENTS

SCRIPT = r"""
import importlib.abc
import ast
import os
import sys

seen = []


class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return None


sys.meta_path.insert(0, Watch())
import smdp.cli

try:
    smdp.cli.main([{command!r}, "--help"])
except SystemExit:
    pass
print("GRPC_IMPORTED_WITH", repr(seen[0] if seen else "never"))
"""


def _setting_when_grpc_starts(command: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(command=command)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("GRPC_IMPORTED_WITH")][-1]
    return ast.literal_eval(line.split(" ", 1)[1])


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}, **extra}


def test_smdp_serve_sets_the_experiments_before_grpc_starts():
    assert _setting_when_grpc_starts("serve", _env()) == GRPC_EXPERIMENTS


def test_an_operators_own_setting_is_left_as_it_is():
    assert _setting_when_grpc_starts("serve", _env(GRPC_EXPERIMENTS="")) == ""


def test_other_commands_keep_grpcs_defaults():
    assert _setting_when_grpc_starts("triton", _env()) in (None, "never")
