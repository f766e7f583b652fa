"""Private Tritons for integration tests: the emulated GPU slowed down, optionally without Triton's batcher.

Not a test module: the integration tests import it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1] / "model_repository"
_TIME_SCALE = 'key: "time_scale", value: { string_value: "1" }'


def _without_block(text: str, name: str) -> str:
    """``text`` with the ``name { ... }`` block removed (braces balanced)."""
    start = text.index(f"{name} {{")
    depth, end = 0, start
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0 and text[end] == "}":
            break
    return text[:start] + text[end + 1:]


@contextmanager
def slowed_emulated_gpu(tmp: Path, scale: float, *, dynamic_batching: bool = True) -> Iterator["EmbeddedTriton"]:  # noqa: F821
    """A started Triton serving ``emulated_gpu`` from ``tmp/repo`` with service times x ``scale``; stopped on exit.

    ``dynamic_batching=False`` removes Triton's batcher from the model (the gate forms the batches).
    """
    from plugin.launcher.triton_server import EmbeddedTriton, TritonConfig

    repo = tmp / "repo"
    shutil.copytree(REPO / "emulated_gpu", repo / "emulated_gpu")
    cfg = repo / "emulated_gpu" / "config.pbtxt"
    text = cfg.read_text()
    assert _TIME_SCALE in text
    text = text.replace(_TIME_SCALE, f'key: "time_scale", value: {{ string_value: "{scale}" }}')
    if not dynamic_batching:
        text = _without_block(text, "dynamic_batching")
    cfg.write_text(text)
    server = EmbeddedTriton(TritonConfig(repository=repo, models=("emulated_gpu",)))
    server.start()
    try:
        yield server
    finally:
        server.stop()
