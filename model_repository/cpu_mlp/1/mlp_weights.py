"""The cpu_mlp model's weights and forward pass, in numpy only.

Weights are generated from a seed rather than stored, so the repository carries no binary blob and
anyone (a test, a benchmark) can rebuild exactly the network Triton runs from the two config
parameters ``layer_sizes`` and ``seed``.
"""

from __future__ import annotations

import numpy as np


def parse_layer_sizes(text: str) -> tuple[int, ...]:
    """``"256,512,512,16"`` -> (256, 512, 512, 16); at least an input and an output width."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"layer_sizes must be comma-separated integers, got {text!r}") from None
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"layer_sizes needs at least two widths >= 1, got {text!r}")
    return sizes


def make_weights(layer_sizes: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """He-initialised float32 (W, bias) per layer; W has shape (fan_in, fan_out)."""
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        bias = rng.uniform(-0.1, 0.1, size=fan_out)
        layers.append((w.astype(np.float32), bias.astype(np.float32)))
    return layers


def forward(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """One matmul per layer for the whole batch (this is what makes batching pay on a CPU)."""
    h = np.asarray(x, dtype=np.float32)
    for i, (w, bias) in enumerate(layers):
        h = h @ w + bias
        if i < len(layers) - 1:
            np.maximum(h, 0.0, out=h)
    return h
