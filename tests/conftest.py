import pytest
from hypothesis import settings

# flashkv_edu.runtime alone decides where kernels run (interpreter without a GPU, compiled with
# one): the tests use exactly the choice a learner's notebook gets. It is imported here, before
# any test module imports transformers (which imports Triton), as a user's script would.
import flashkv_edu  # noqa: F401

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
