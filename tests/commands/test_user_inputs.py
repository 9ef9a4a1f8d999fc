"""What users hand the commands and the page: image-to-image and inpainting inputs read as training reads them (a
16-bit grey PNG keeps its grey where a plain convert("RGB") made it white, a transparent PNG shows white where it is
transparent, not the colour hidden under the alpha, a 16-bit mask keeps its level); the page never replaces an
image it saved, and will not serve beyond this machine without a login, which is checked"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ldm.app import editor_image_and_mask
from ldm.generate import from_image
from pipelines import LDMPipeline


def test_sixteen_bit_grey_and_transparent_inputs_read_as_training_reads_them(tmp_path, monkeypatch):
    grey = tmp_path / "grey16.png"
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(grey)
    hidden = np.zeros((16, 16, 4), np.uint8)
    hidden[..., 0] = 255  # red, fully transparent
    clear = tmp_path / "clear.png"
    Image.fromarray(hidden, "RGBA").save(clear)
    mask = tmp_path / "mask16.png"
    Image.fromarray(np.full((16, 16), 65535 // 2, np.uint16)).save(mask)
    monkeypatch.setattr(LDMPipeline, "from_pipe", classmethod(lambda cls, pipe, **kw: pipe))
    pipe = SimpleNamespace()
    _, extra = from_image(pipe, SimpleNamespace(image=str(grey), mask=str(mask), strength=None))
    assert np.asarray(extra["image"]).mean() == 128  # mid-grey, not clipped to white
    assert abs(int(np.asarray(extra["mask_image"]).mean()) - 128) <= 1
    _, extra = from_image(pipe, SimpleNamespace(image=str(clear), mask=None, strength=None))
    assert (np.asarray(extra["image"]) == 255).all()  # white where transparent, not the red under it
    image, _ = editor_image_and_mask({"background": hidden, "layers": []})
    assert (np.asarray(image) == 255).all()


def test_the_page_never_replaces_an_image_it_saved(tmp_path):
    from ldm.app import save_with_settings

    path = tmp_path / "20261207-101010-0.png"
    first = save_with_settings(Image.new("RGB", (4, 4), "red"), path, {"prompt": "a", "seed": 0})
    second = save_with_settings(Image.new("RGB", (4, 4), "blue"), path, {"prompt": "b", "seed": 0})
    assert first == path and second == tmp_path / "20261207-101010-0-1.png"
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0) and Image.open(second).getpixel((0, 0)) == (0, 0, 255)


def test_the_page_refuses_to_serve_beyond_this_machine_without_a_login(tmp_path, capsys):
    import pytest

    from ldm.app import check_exposure, login, main

    with pytest.raises(SystemExit) as stop:
        main(["--host", "0.0.0.0", "--runs-dir", str(tmp_path)])
    assert stop.value.code == 2 and "--insecure-no-auth" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--auth", "user", "--runs-dir", str(tmp_path)])  # no colon: a message, not a traceback
    assert stop.value.code == 2 and "--auth must read user:password" in capsys.readouterr().err
    secret = tmp_path / "login"
    secret.write_text("ann:s3cret:with:colons\n")
    assert login(None, str(secret), None) == ("ann", "s3cret:with:colons")
    assert login(None, None, "bob:pw") == ("bob", "pw") and login(None, None, None) is None
    check_exposure("0.0.0.0", ("ann", "pw"), False)
    check_exposure("0.0.0.0", None, True)  # the user says the network in front authenticates
    check_exposure("127.0.0.1", None, False)


def test_bad_outputs_pickled_adapters_cut_prompts_and_damaged_files_are_said_in_one_line(tmp_path, caplog):
    import logging

    import pytest
    from transformers import CLIPTokenizer

    from ldm.engine.errors import user_errors
    from ldm.generate import add_embedding, add_lora, check_out
    from pipelines.architectures import write_tokenizer
    from pipelines.ldm_pipeline import warn_truncated

    with pytest.raises(ValueError, match="must end in .png"):
        check_out(str(tmp_path / "grid.jpg"))
    check_out(str(tmp_path / "new" / "grid.png"))  # a folder to be made is fine
    for path, call in ((tmp_path / "adapter.bin", add_lora), (tmp_path / "word.pt", add_embedding)):
        path.write_bytes(b"\x80\x04 a pickle")
        with pytest.raises(ValueError, match="is a pickle, which could run code"):
            call(None, str(path))
    write_tokenizer(tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    with caplog.at_level(logging.WARNING):
        cut = warn_truncated(tokenizer, ["a cat " * 50 + "wearing a tiny red hat", "a dog"])
    assert cut[0].endswith("wearing a tiny red hat") and cut[1] == "" and "does not see" in caplog.text
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 16)
    with pytest.raises(SystemExit) as stop, user_errors():
        from safetensors.torch import load_file

        load_file(damaged)
    assert stop.value.code == 2


def test_commands_do_not_print_library_notices_that_do_not_concern_the_user():
    import subprocess
    import sys

    for command in (["-m", "ldm.generate", "--help"], ["train_ldm.py", "--help"]):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                              cwd=str(Path(__file__).resolve().parents[2]))
        assert done.returncode == 0 and "torchvision" not in done.stderr, done.stderr


def test_a_stop_message_is_true_and_on_a_line_of_its_own(capsys):
    import pytest
    from tqdm.auto import tqdm

    from ldm.engine.errors import NonFinite, user_errors

    assert "came before the first one (train.checkpoint_every=10)" in str(NonFinite(5, None, 10))
    assert "train.checkpoint_every=0 writes none" in str(NonFinite(5, None, 0))
    assert "the last good checkpoint is runs/x/checkpoints/step-4" in str(NonFinite(5, "runs/x/checkpoints/step-4", 4))
    bar = tqdm(total=10, file=__import__("sys").stderr, dynamic_ncols=False, ncols=60)
    bar.update(3)
    with pytest.raises(SystemExit), user_errors():
        raise NonFinite(5, None, 10)
    bar.close()
    err = capsys.readouterr().err
    line = next(part for part in err.replace("\r", "\n").split("\n") if "nonfinite:" in part)
    assert line.startswith("nonfinite:")  # not glued to the bar's "it/s]"


def test_the_page_loads_pipelines_and_adapters_from_the_runs_folder_and_allowed_folders_only(tmp_path):
    import pytest

    from ldm.app import Drawer

    drawer = Drawer(tmp_path / "images", roots=(tmp_path / "runs", tmp_path / "models"))
    with pytest.raises(ValueError, match="the LoRA box takes adapters .*under .*runs.*'/etc/x.safetensors' is outside"):
        drawer.load(str(tmp_path / "runs" / "a" / "pipeline"), "/etc/x.safetensors", "ddpm")
    with pytest.raises(ValueError, match=r"is outside"):
        drawer.load(str(tmp_path / "runs" / "a" / "pipeline"), str(tmp_path / "runs" / ".." / "x"), "ddpm")
    with pytest.raises(ValueError, match=r"the pipeline box takes pipeline folders under .*'/home' is outside .*--allow-dir"):
        drawer.load("/home", None, "ddpm")
    with pytest.raises(ValueError, match=r"is outside"):
        drawer.load(str(tmp_path / "runs" / ".." / "elsewhere"), None, "ddpm")
    with pytest.raises(ValueError, match="is not a pipeline folder"):  # inside: goes on to the folder's own check
        drawer.load(str(tmp_path / "runs" / "a" / "pipeline"), str(tmp_path / "runs" / "a" / "lora"), "ddpm")
    with pytest.raises(ValueError, match="is not a pipeline folder"):  # an --allow-dir folder
        drawer.load(str(tmp_path / "models" / "sd"), None, "ddpm")


def test_the_page_refuses_uploads_over_its_limit(tmp_path):
    import socket

    import httpx

    from ldm.app import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve(tmp_path / "runs", tmp_path / "images", port=port, block=False, max_upload_mb=0.05)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        small = httpx.post(url, files={"files": ("a.png", b"x" * 10_000, "image/png")}, timeout=30)
        large = httpx.post(url, files={"files": ("b.png", b"x" * 200_000, "image/png")}, timeout=30)
    finally:
        app.close()
    assert small.status_code == 200 and large.status_code == 413


def test_library_messages_that_do_not_concern_the_user_are_dropped_where_they_are_logged(tmp_path, capsys):
    """diffusers' empty "kept in float32: []" on every cast and its "No LoRA keys" note for LoRA files without a
    text encoder (most of them) are dropped at their loggers, and only those messages; transformers' per-file
    bars are off; reading a local folder does not say "Downloading"."""
    import logging

    import torch
    from diffusers import UNet2DConditionModel
    from transformers.utils import logging as transformers_logging

    import pipelines  # noqa: F401  (installs the filters)
    from ldm.data.builtin import generate_shapes
    from ldm.data.sources import load_source

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = Seen()
    for name in ("diffusers.models.modeling_utils", "diffusers.loaders.lora_base"):
        logging.getLogger(name).addHandler(seen)
    try:
        unet = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=8,
                                    sample_size=8, layers_per_block=1, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        unet.to(torch.float32)  # diffusers warns here, with an empty list
        logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to CLIPTextModel found")
        logging.getLogger("diffusers.models.modeling_utils").warning("should be kept in float32: ['norm']")
    finally:
        for name in ("diffusers.models.modeling_utils", "diffusers.loaders.lora_base"):
            logging.getLogger(name).removeHandler(seen)
    assert seen.messages == ["should be kept in float32: ['norm']"]  # a real list still gets through
    assert not transformers_logging.is_progress_bar_enabled()
    capsys.readouterr()
    assert len(load_source(str(generate_shapes(tmp_path / "shapes", num_images=40, seed=0)),
                           cache_dir=str(tmp_path / "hf"))) == 40
    err = capsys.readouterr().err
    assert "Reading local files" in err and "Downloading" not in err


def test_an_image_input_that_cannot_be_read_names_its_flag_and_file(tmp_path, monkeypatch):
    import pytest

    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    monkeypatch.setattr(LDMPipeline, "from_pipe", classmethod(lambda cls, pipe, **kw: pipe))
    with pytest.raises(ValueError, match=r"--image '.*text.png' cannot be read as an image \(cannot identify"):
        from_image(SimpleNamespace(), SimpleNamespace(image=str(tmp_path / "text.png"), mask=None, strength=None))
    with pytest.raises(ValueError, match=r"--mask '.*nope.png' cannot be read as an image \(No such file"):
        from_image(SimpleNamespace(), SimpleNamespace(image=str(tmp_path / "ok.png"), mask=str(tmp_path / "nope.png"),
                                                      strength=None))


def test_generate_draws_with_the_settings_the_run_recorded_and_writes_them_into_each_png(tmp_path, capsys):
    """A folder's sampling.json (written at export) sets the scheduler, steps, guidance and size unless the command
    line gives them; every PNG carries what it was drawn with; --help shows the defaults."""
    import json

    import pytest
    from tiny_models import sd_folder, tiny_vae

    from ldm.generate import main

    folder = sd_folder(tmp_path / "sd", tiny_vae(tmp_path / "vae"), ["a red circle"])
    (folder / "sampling.json").write_text(json.dumps({"scheduler": "ddim", "num_inference_steps": 2,
                                                      "guidance_scale": 7.5, "height": 16, "width": 24}))
    main(["--pipeline", str(folder), "--num-images", "1", "--out", str(tmp_path / "a.png"), "a red circle"])
    image = Image.open(tmp_path / "a-0.png")
    settings = json.loads(image.text["settings"])
    assert image.size == (24, 16) and "guidance_scale: 7.5" in image.text["parameters"]
    assert {k: settings[k] for k in ("scheduler", "num_inference_steps", "guidance_scale", "seed")} == {
        "scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 0}
    main(["--pipeline", str(folder), "--num-images", "1", "--guidance-scale", "2", "--width", "16",
          "--out", str(tmp_path / "b.png"), "a red circle"])  # the command line wins
    image = Image.open(tmp_path / "b-0.png")
    assert image.size == (16, 16) and json.loads(image.text["settings"])["guidance_scale"] == 2.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 4)" in shown and "the run's, from sampling.json" in shown and "(default: samples.png)" in shown


def test_the_page_takes_its_settings_from_the_selected_pipeline(tmp_path):
    import json

    from ldm.app import PAGE_DEFAULTS, pipeline_defaults

    (tmp_path / "photo").mkdir()
    (tmp_path / "photo" / "sampling.json").write_text(json.dumps({"scheduler": "ddim", "num_inference_steps": 40,
                                                                  "guidance_scale": 7.5, "height": 64, "width": 64,
                                                                  "prompts": ["a ginger cat", "a rocket"]}))
    (tmp_path / "photo" / "sampling.json").write_text(json.dumps({"scheduler": "ddim", "num_inference_steps": 40,
                                                                  "guidance_scale": 7.5, "height": 64, "width": 96,
                                                                  "prompts": ["a ginger cat", "a rocket"]}))
    assert pipeline_defaults(str(tmp_path / "photo")) == {"steps": 40, "guidance": 7.5, "scheduler": "ddim", "width": 96,
                                                          "height": 64, "prompt": "a ginger cat"}
    assert pipeline_defaults(str(tmp_path / "elsewhere")) == PAGE_DEFAULTS == pipeline_defaults(None)
