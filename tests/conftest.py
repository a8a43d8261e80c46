import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from train_case import TEXT

settings.register_profile("ci", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- training tests (test_train*.py; helpers in train_case.py) ------------------------------



@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A small corpus of code: the tiny model learns it within a few steps."""
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """One tokenised-corpus cache for the whole session, never the user's ~/.cache; shared
    with subprocesses through the environment."""
    cache = tmp_path_factory.getbasetemp() / "fgpt-cache"
    before = os.environ.get("FGPT_CACHE")
    os.environ["FGPT_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("FGPT_CACHE", None)
    else:
        os.environ["FGPT_CACHE"] = before
