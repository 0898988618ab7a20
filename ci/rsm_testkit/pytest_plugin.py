"""pytest fixtures for every component: `tiny_models.path("sd35")` gives a checkpoint directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from .factory import TINY_MODELS, _load_builders, get_tiny_model


class TinyModels:
    def path(self, name: str) -> Path:
        return get_tiny_model(name)

    def names(self) -> list[str]:
        _load_builders()
        return sorted(TINY_MODELS)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    return TinyModels()
