import os

import pytest
import torch


# nothing in the tests may reach a hub: fail fast instead of waiting on a network that is not there
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# two threads on a shared 2-core machine spend their time waiting for each other (measured: 74 s against 12 s for
# the pipeline tests under load); one thread is never much slower on these tiny models
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion saved as a diffusers folder (loads like a Hub model)."""
    from inversion_dpo.tiny import save_tiny_sd

    return save_tiny_sd(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_pairs_parquet(tmp_path_factory):
    """Eight Pick-a-Pic-schema rows, two of them ties."""
    from inversion_dpo.tiny import save_tiny_pairs

    return save_tiny_pairs(str(tmp_path_factory.mktemp("data") / "train.parquet"), num_rows=8, tie_every=4)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion XL saved as a diffusers folder (loads like a Hub model)."""
    from inversion_dpo.tiny import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))
