"""A path a user names is a folder here, and what it holds is loaded whole: a folder that does not exist is not
asked of the Hugging Face Hub (only ``hf://`` names are), and a pipeline folder with a weight tensor missing (or one
its model has no place for) is refused naming it, where it used to load with that layer at random."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.generate import load_pipeline
from pipelines import LDMPipeline
from pipelines.local import resolve


@pytest.fixture
def folder(tmp_path):
    from tiny_models import sd_folder, tiny_vae

    return sd_folder(tmp_path / "sd", tiny_vae(tmp_path / "vae"), ["a red circle", "a blue square"])


def test_a_folder_that_is_not_here_is_not_asked_of_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    for name in ("snapshot_download", "hf_hub_download", "model_info"):
        monkeypatch.setattr(huggingface_hub, name, no_hub)
    for call in (lambda: LDMPipeline.from_pretrained("runs/no-such-run"), lambda: load_pipeline("runs/no-such-run")):
        with pytest.raises(FileNotFoundError, match=r"'runs/no-such-run' is not a folder here .*hf://"):
            call()
    assert resolve("hf://org/model") == ("org/model", False)  # asked for by name only


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_a_folder_missing_a_weight_or_holding_a_stranger_is_refused_naming_it(folder, change):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[3]
    if change == "drop":
        del state[key]
    else:
        state["down_blocks.9.made_up.weight"] = torch.zeros(2)
    save_file(state, str(path))
    named = key if change == "drop" else "down_blocks.9.made_up.weight"
    with pytest.raises(ValueError, match=rf"unet does not hold the weights its model needs .*{named}"):
        LDMPipeline.from_pretrained(folder)


def test_a_whole_folder_loads(folder):
    assert LDMPipeline.from_pretrained(folder).unet is not None
