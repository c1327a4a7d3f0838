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


# Tests that the test command's workers share out one by one (``--dist loadfile`` keeps every other
# file's tests, and each notebook's cells, together on one worker, in order): each of these runs
# on its own, and together they are too long for one worker (the solved copies: 11 notebooks).
SPREAD = ("tests/test_solved_notebooks.py::", "tests/test_split.py::test_every_num_splits_from_1_to_128[")


def spread_scope(nodeid: str, file_scope) -> str:
    """The scheduling unit of a test: itself when it is in ``SPREAD``, else ``file_scope(nodeid)``."""
    return nodeid if nodeid.startswith(SPREAD) else file_scope(nodeid)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's file scheduler, with the tests of ``SPREAD`` each a unit of its own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SpreadFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return spread_scope(nodeid, super()._split_scope)

    return SpreadFileScheduling(config, log)
