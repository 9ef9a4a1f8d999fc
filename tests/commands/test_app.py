"""The web page in a real browser: headless Chromium (Debian's package) driven by Playwright draws an image on the
Draw tab, inpaints part of it, and opens a run on the Runs tab; screenshots go to the test's folder. Skipped,
with the reason shown, where gradio, playwright or chromium is missing (`.ci/run` installs them)."""

import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the web page needs gradio (pip install -e '.[app]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

from ldm.app import editor_image_and_mask, find_pipelines, find_runs, png_parameters, serve  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    from ldm.data.builtin import generate_shapes
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig
    from ldm.trainer.train import train

    root = tmp_path_factory.mktemp("app")
    data = generate_shapes(root / "shapes", num_images=48, seed=0)
    cfg = load_config(LDMConfig, "configs/ldm/tiny.yaml", [
        f"output_dir={root / 'runs'}", f"data.dataset={data}", f"data.cache_dir={root / 'cache'}", "name=tiny",
        "train.max_steps=4", "train.validate_every=2", "train.log_every=1", "sample.seeds=[0]",
        "sample.num_inference_steps=2", "train.tensorboard=false"])
    train(cfg)
    return root / "runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_and_pipelines_are_found(runs_dir):
    assert find_runs(runs_dir) == ["tiny"]
    assert find_pipelines(runs_dir) == [str(runs_dir / "tiny" / "pipeline")]
    text = png_parameters({"prompt": "a red circle", "negative_prompt": "", "steps": 3, "seed": 0})
    assert text == "a red circle\nNegative prompt: \nsteps: 3, seed: 0"


def test_editor_value_gives_image_and_painted_mask():
    import numpy as np

    background = np.zeros((8, 8, 4), np.uint8)
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[2:4, 5:7, 3] = 255
    image, mask = editor_image_and_mask({"background": background, "layers": [layer], "composite": background})
    assert image.size == (8, 8) and image.mode == "RGB"
    assert np.array_equal(np.asarray(mask) > 0, layer[..., 3] > 0)
    assert editor_image_and_mask({"background": background, "layers": [], "composite": None})[1] is None


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_draw_inpaint_and_watch_a_run_in_chromium(runs_dir, tmp_path):
    from PIL import Image

    port = free_port()
    app = serve(runs_dir, tmp_path / "images", port=port, block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#generate")
            page.fill("#prompt textarea", "a red circle at the top left")
            page.fill("#steps input[type=number]", "3")
            page.press("#steps input[type=number]", "Enter")
            page.fill("#images input[type=number]", "2")
            page.press("#images input[type=number]", "Enter")
            page.click("#generate")
            # two images in the gallery, each loaded and not empty
            page.wait_for_function("(() => { const a = [...document.querySelectorAll('#gallery img')];"
                                   " return a.length >= 2 && a.every(i => i.complete && i.naturalWidth > 0); })()",
                                   timeout=120_000)
            assert "a red circle at the top left" in page.input_value("#settings textarea")
            page.screenshot(path=str(tmp_path / "draw.png"), full_page=True)
            drawn = sorted((tmp_path / "images").glob("*.png"))
            assert len(drawn) == 2 and "parameters" in Image.open(drawn[0]).text

            # inpainting: upload the first image, paint over its right half, draw again
            page.set_input_files("#editor input[type=file]", str(drawn[0]))
            page.check("#mode input[value=inpainting]")
            canvas = page.wait_for_selector("#editor canvas")
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.8, steps=8)
            page.mouse.up()
            page.click("#generate")
            page.wait_for_function("document.querySelector('#settings textarea').value.includes('inpainting')",
                                   timeout=120_000)
            assert len(list((tmp_path / "images").glob("*.png"))) == 4
            page.screenshot(path=str(tmp_path / "inpaint.png"), full_page=True)

            # a folder that is not a pipeline: a message on the page, no stack trace
            page.fill("#pipeline input", str(runs_dir / "no-such-run"))  # under the runs folder, not a pipeline
            page.press("#pipeline input", "Enter")
            page.check("#mode input[value=text-to-image]")
            page.click("#generate")
            page.get_by_text("is not a pipeline folder").first.wait_for(timeout=60_000)
            assert "Traceback" not in page.content()

            # runs: the tiny run's summary, its curves and a sample grid
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_function("document.querySelector('#summary') && "
                                   "document.querySelector('#summary').innerText.includes('tiny')", timeout=60_000)
            page.wait_for_selector("#curves img", timeout=60_000)
            page.wait_for_function("(() => { const i = document.querySelector('#grid img');"
                                   " return i && i.complete && i.naturalWidth > 0; })()", timeout=60_000)
            page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)
            # a run that moves on: the tab shows its new step without a reload
            with open(runs_dir / "tiny" / "metrics.jsonl", "a") as f:
                f.write('{"step": 7, "epoch": 0, "loss": 0.9}\n')
            page.wait_for_function("document.querySelector('#summary').innerText.includes('step 7')",
                                   timeout=30_000)
            browser.close()
    finally:
        app.close()


def test_the_draw_tab_draws_an_sdxl_folder(tmp_path, tiny_vae_dir):
    from tiny_models import sdxl_folder

    from ldm.app import Drawer

    xl = sdxl_folder(tmp_path / "xl", tiny_vae_dir, ["a red circle"])
    paths, text = Drawer(tmp_path / "out").draw(str(xl), None, 1.0, "text-to-image", "a red circle", "", 2, 5.0,
                                                "ddim", 0, 48, 32, 2, 0.6, None)  # width 48, height 32
    assert len(paths) == 2 and all(Path(p).is_file() for p in paths) and text.startswith("a red circle")
    assert Image.open(paths[0]).size == (48, 32) and "size: 48x32" in text
