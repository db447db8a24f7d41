"""Shared fixtures. Broker fixtures live in tests/integration/conftest.py."""

from __future__ import annotations

import pytest
import torch

from streamer.model import ModelBundle, ModelConfig, Normalization, init_random_model

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def make_bundle(
    input_size: int = 3,
    hidden_size: int = 16,
    num_layers: int = 2,
    seed: int = 0,
    normalization: Normalization | None = None,
    version: str = "test-1",
    time_features: tuple[str, ...] = (),
    device_norm_alpha: float | None = None,
) -> ModelBundle:
    """A random model for readings of ``input_size`` values (plus 2 inputs per time feature)."""
    config = ModelConfig(
        input_size + 2 * len(time_features), hidden_size, num_layers, input_size, time_features, device_norm_alpha
    )
    return ModelBundle(init_random_model(config, seed), config, version, normalization)


@pytest.fixture
def bundle() -> ModelBundle:
    return make_bundle()


def written_as_the_loop_goes_on(partitions) -> None:
    """The checkpoints due (a PartitionManager's), written one after another beside the run
    loop's next turns: here at once."""
    partitions.settle_writes()
    while partitions.pump():
        partitions.settle_writes()
