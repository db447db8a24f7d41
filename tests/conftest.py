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
) -> ModelBundle:
    config = ModelConfig(input_size, hidden_size, num_layers, input_size)
    return ModelBundle(init_random_model(config, seed), config, version, normalization)


@pytest.fixture
def bundle() -> ModelBundle:
    return make_bundle()
