import os

import pytest
from hypothesis import settings

# Runs before the package is imported: tests use the same runtime choice as learners.
os.environ.setdefault("TRITON_INTERPRET", "1" if not os.environ.get("CUDA_VISIBLE_DEVICES") else "0")

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
