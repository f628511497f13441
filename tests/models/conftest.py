"""The authors' checkpoint layout and golden outputs (tests/reference/fishnet/)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

# A copy of the project's proof data (../shared/reference/fishnet/), so a clone anywhere can run the tests.
REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "fishnet"
OFFICIAL = ("fishnet99", "fishnet150", "fishnet201")


def official_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every entry of the authors' state dict, in their order."""
    path = REFERENCE / f"{name}_official_keys.tsv"
    if not path.is_file():
        pytest.fail(f"reference data missing: {path}")
    rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:]]
    return [(key, () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))) for key, shape in rows]


def official_random_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Weights made by the reference README's recipe, keyed like the released checkpoints."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in official_layout(name):
        if key.endswith("num_batches_tracked"):
            value = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) == 4:
            value = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
        else:
            value = 0.1 * torch.randn(shape, generator=g)
        state[key] = value
    return state


def golden_input() -> torch.Tensor:
    return torch.randn((2, 3, 224, 224), generator=torch.Generator().manual_seed(1234))


def golden_logits(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(REFERENCE / f"{name}_seed0_input1234_224x224_logits.npy"))
