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


def random_lora(model_dir, folder, scale=0.5):
    """A LoRA for the SD model at ``model_dir`` with random up-projections (std ``scale``), so that it changes the
    model's images, saved as diffusers saves one; returns ``folder``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig

    from train_inversion_dpo import LORA_TARGET_MODULES, lora_state_dict_of

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=lora_state_dict_of(unet))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion saved as a diffusers folder (loads like a Hub model)."""
    from tests.tiny import save_tiny_sd

    return save_tiny_sd(str(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_pairs_parquet(tmp_path_factory):
    """Eight Pick-a-Pic-schema rows, two of them ties."""
    from tests.tiny import save_tiny_pairs

    return save_tiny_pairs(str(tmp_path_factory.mktemp("data") / "train.parquet"), num_rows=8, tie_every=4)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion XL saved as a diffusers folder (loads like a Hub model)."""
    from tests.tiny import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny randomly initialised Stable Diffusion 3 (three text encoders, SD3.5's second attention) saved as a
    diffusers folder (loads like a Hub model)."""
    from tests.tiny import save_tiny_sd3

    return save_tiny_sd3(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


@pytest.fixture(scope="session")
def shapes_pairs(tmp_path_factory):
    """A few pairs sampled from the committed shapes base (4 prompts x 3 samples, 4 DDIM steps), for the benchmarks."""
    from shapes import sampling
    from shapes.pairs import make_pairs

    pipe = sampling.load_pipeline(os.path.join(REPO, "models", "shapes-sd-tiny"))
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    assert make_pairs(pipe, 4, 3, str(path), seed=0, steps=4)["pairs"] > 0
    return path
