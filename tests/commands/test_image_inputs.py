"""Image-to-image and inpainting inputs (the command line and the web page) read files as training reads them:
a 16-bit grey PNG keeps its grey (a plain convert("RGB") made it white), a transparent PNG shows white where it is
transparent (not the colour hidden under the alpha), and a 16-bit mask keeps its level."""

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
