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


def test_a_folder_naming_its_own_code_or_holding_only_pickles_is_refused_before_any_library_reads_it(folder, tmp_path):
    """diffusers answers a component class of the folder's own with "pass trust_remote_code=True", and a folder of
    .bin weights with "no file named ...safetensors" (or, without use_safetensors, unpickles it): both are refused
    here first, saying why."""
    import json
    import shutil

    code = tmp_path / "code"
    shutil.copytree(folder, code)
    index = json.loads((code / "model_index.json").read_text())
    (code / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_module", "Evil"]}))
    (code / "unet" / "evil_module.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(ValueError, match=r"names code of its own for 'unet' \(evil_module.Evil\); .*never run"):
        LDMPipeline.from_pretrained(code)
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ValueError, match=r"unet holds its weights only as pickles \(diffusion_pytorch_model.bin\)"):
        LDMPipeline.from_pretrained(pickled)


def test_damaged_files_and_unreadable_inputs_are_one_line_errors_naming_them(folder, tmp_path, capsys):
    """A damaged adapter, embedding or single file names itself and what it was given as; a pickle's refusal does
    not pass on torch's advice to unpickle it fully; an image PIL cannot read, a decompression bomb and a model
    the Hub cannot give are one line with exit status 2."""
    import pickle

    from PIL import Image

    from ldm.engine.errors import user_errors
    from ldm.generate import add_embedding, add_lora
    from pipelines.pickles import read_pickle_checkpoint
    from pipelines.single_file import from_single_file

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    pipe = LDMPipeline.from_pretrained(folder)
    for call, what in ((lambda: add_lora(pipe, str(damaged)), "--lora"), (lambda: add_embedding(pipe, str(damaged)), "--embedding"),
                       (lambda: from_single_file(damaged), "the single file")):
        with pytest.raises(ValueError, match=rf"{what} '.*damaged.safetensors' is not a readable safetensors file"):
            call()

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(ValueError, match="asks to build more than tensors") as refused:
        read_pickle_checkpoint(tmp_path / "evil.ckpt")
    assert "weights_only" not in str(refused.value) and "will likely succeed" not in str(refused.value)
    assert "ran" not in capsys.readouterr().out

    (tmp_path / "text.png").write_text("not an image")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    from ldm.data.images import open_image

    for call in (lambda: open_image(tmp_path / "text.png"), lambda: open_image(tmp_path / "bomb.png"),
                 lambda: LDMPipeline.from_pretrained("hf://nobody-here/no-model")):
        with pytest.raises(SystemExit) as stop, user_errors():
            call()
        assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "hf://nobody-here/no-model: not in this machine's Hugging Face cache" in err
