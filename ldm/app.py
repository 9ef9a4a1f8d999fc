"""A local web page to draw with a model and watch training runs (Gradio).

    python -m ldm.app                        # http://127.0.0.1:7860, runs found under ./runs
    python -m ldm.app --runs-dir /data/runs --port 8000

- **Draw**: a pipeline folder (any run's ``pipeline/`` under the runs folder, or under a folder given with
  ``--allow-dir``: the page loads nothing from elsewhere), optionally a LoRA file (under the same folders) and
  scale; prompt, negative prompt, steps, guidance, scheduler, seed, width and height (the selected pipeline's own, with its steps, guidance, scheduler and
  first sample prompt, when its folder records them), number of images; text-to-image,
  image-to-image (upload) or inpainting (upload, then paint the region to draw anew). Every image is written as
  a PNG whose text chunk holds its settings (``parameters``, as AUTOMATIC1111 writes them), and the settings are
  shown beside the gallery.
- **Runs**: every run under the runs folder with its summary, its curves (loss, validation loss, scores) drawn
  from ``metrics.jsonl``, and its sample grids with a slider over the steps; while a run is going the page
  refreshes them every few seconds.

It binds to 127.0.0.1 and has no authentication. Another ``--host`` (``0.0.0.0``: every interface) needs a
login: ``--auth-file FILE`` (a file holding ``user:password``), the ``LDM_APP_AUTH`` environment variable, or
``--auth user:password`` (which other users of the machine can read in its process list); without one it is
refused unless ``--insecure-no-auth`` says that the network in front of it authenticates (a reverse proxy).
Anyone who can reach the page can read the runs folder and make the machine sample. Uploads are limited to
``--max-upload-mb`` (20).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ldm.engine.records import png_parameters

logger = logging.getLogger(__name__)

MODES = ("text-to-image", "image-to-image", "inpainting")
CURVE_KEYS = ("loss", "val_loss", "val_mse")
SCORE_SUFFIX = "_accuracy"
REFRESH_S = 5.0  # how often the Runs tab re-reads a run that is still going


# ---- what the page reads from disk ------------------------------------------------------------------------

def find_runs(runs_dir: Path) -> list[str]:
    """Names of the runs under ``runs_dir``: folders with a metrics.jsonl, newest first."""
    runs = [p.parent for p in Path(runs_dir).glob("*/metrics.jsonl")]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def find_pipelines(runs_dir: Path) -> list[str]:
    """Pipeline folders under ``runs_dir`` (a run's ``pipeline/``, or a cascade's or demo's folder)."""
    found = {str(p.parent) for p in Path(runs_dir).glob("*/pipeline/model_index.json")}
    found |= {str(p.parent) for p in Path(runs_dir).glob("*/model_index.json")}
    return sorted(found)


def read_rows(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a partly written last line (a run still going) is left out."""
    rows = []
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def summary(run: Path, rows: list[dict]) -> str:
    """Markdown: the run's state, its last numbers and its end-of-run summary when it has one."""
    if not rows:
        return f"**{run.name}**: no metrics yet"
    final = next((r for r in reversed(rows) if "final_loss" in r), None)
    steps = [r["step"] for r in rows if "step" in r]
    age = time.time() - (run / "metrics.jsonl").stat().st_mtime
    state = "finished" if final else ("running" if age < 120 else f"stopped (last write {age / 60:.0f} min ago)")
    lines = [f"**{run.name}**: {state}, step {max(steps) if steps else 0}"]
    shown = final or rows[-1]
    for key, value in shown.items():
        if isinstance(value, float):
            value = f"{value:.5g}"
        lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def curves_figure(rows: list[dict]):
    """A matplotlib figure: the loss terms and validation losses against step (log scale), and the built-in
    scores on a second axis when the run has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted({k for r in rows for k in r if k.endswith(SCORE_SUFFIX)})
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    for key in CURVE_KEYS:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "final_loss" not in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="o" if key != "loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_title("losses")
    if any(line.get_ydata().min() > 0 for line in ax.get_lines()):
        ax.set_yscale("log")
    ax.legend(loc="best", fontsize=8)
    if scores:
        ax2 = axes[0][1]
        for key in scores:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax2.plot(*zip(*pts), label=key.removesuffix(SCORE_SUFFIX), marker="o", markersize=3)
        ax2.set_ylim(0, 1.02)
        ax2.set_xlabel("step")
        ax2.set_title("built-in scores")
        ax2.legend(loc="best", fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def sample_grids(run: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's validation grids (``samples/step-N.png``), by step."""
    grids = []
    for p in (run / "samples").glob("step-*.png"):
        m = re.fullmatch(r"step-(\d+)\.png", p.name)
        if m:
            grids.append((int(m.group(1)), p))
    return sorted(grids)


# ---- drawing ------------------------------------------------------------------------------------------

def save_with_settings(image: Image.Image, path: Path, settings: dict) -> Path:
    """Save ``image`` with its settings in the PNG at ``path``, or at ``<stem>-1.png``, ``-2``... when that name is
    taken (two images drawn in the same second with the same seed): a saved image is never replaced. Returns the
    path written."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", png_parameters(settings))
    info.add_text("settings", json.dumps(settings))
    path.parent.mkdir(parents=True, exist_ok=True)
    target, n = path, 0
    while True:  # claim a free name first (O_EXCL: two drawings at once cannot claim the same one)
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            n += 1
            target = path.with_name(f"{path.stem}-{n}{path.suffix}")
    tmp = target.with_suffix(".tmp.png")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(target)
    return target


def editor_image_and_mask(value) -> tuple[Image.Image | None, Image.Image | None]:
    """The uploaded image (RGB) and the painted mask (L, white where painted) of an ImageEditor value."""
    if not value:
        return None, None
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        return None, None
    from ldm.data.images import to_rgb

    # as training reads images: transparency over white (not the colour under it), 16-bit greys scaled
    image = to_rgb(background if isinstance(background, Image.Image) else Image.fromarray(np.asarray(background)))
    mask = np.zeros(image.size[::-1], bool)
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[-1] == 4 and layer.shape[:2] == mask.shape:
            mask |= layer[..., 3] > 0
    return image, Image.fromarray(mask.astype(np.uint8) * 255, "L") if mask.any() else None


@dataclass
class DrawRequest:
    """What the Draw tab asks for, in the order of its inputs."""

    folder: str
    lora: str | None
    lora_scale: float
    mode: str
    prompt: str
    negative: str
    steps: int
    guidance: float
    scheduler: str
    seed: int
    width: int
    height: int
    num_images: int
    strength: float
    editor: object  # the ImageEditor's value

    def settings(self) -> dict:
        """What an image was drawn with, as its PNG records it."""
        out = {"prompt": self.prompt, "negative_prompt": self.negative or "", "mode": self.mode,
               "steps": int(self.steps), "guidance": float(self.guidance), "scheduler": self.scheduler,
               "pipeline": self.folder}
        if self.lora:
            out.update(lora=self.lora, lora_scale=float(self.lora_scale))
        return out


class Drawer:
    """Loads pipelines on demand (the last one stays loaded) and draws with them."""

    def __init__(self, out_dir: Path, roots: tuple[Path, ...] = ()):
        """``roots``: the folders the pipeline and LoRA boxes may load from (the runs folder and any
        ``--allow-dir``), checked by resolved path; none: any path."""
        self.out_dir, self.key, self.pipe = Path(out_dir), None, None
        self.roots = tuple(Path(r).resolve() for r in roots)

    def _inside_roots(self, path: str, box: str, what: str) -> None:
        if self.roots and not any(Path(path).resolve().is_relative_to(r) for r in self.roots):
            raise ValueError(f"the {box} box takes {what} under {', '.join(map(str, self.roots))}; {path!r} is "
                             f"outside (start the page with --allow-dir FOLDER to add a folder)")

    def load(self, folder: str, lora: str | None, scheduler: str):
        from ldm.generate import load_pipeline

        lora = (lora or "").strip() or None
        if lora:
            self._inside_roots(lora, "LoRA", "adapters (a run's lora/ folder or a file copied there)")
        folder = (folder or "").strip()
        if not folder:
            raise ValueError("choose a pipeline folder (a run's pipeline/)")
        self._inside_roots(folder, "pipeline", "pipeline folders")
        if not (Path(folder) / "model_index.json").is_file():
            raise ValueError(f"{folder!r} is not a pipeline folder (it has no model_index.json)")
        key = (folder, lora or None, scheduler)
        if key != self.key:
            self.pipe, self.key = None, None
            self.pipe = load_pipeline(folder, lora or None, scheduler)
            self.key = key
        return self.pipe

    def draw(self, *values) -> tuple[list, str]:
        """The Draw tab's button: ``values`` are its inputs (`DrawRequest`'s fields, in order). Returns the paths of
        the images written and their settings as text."""
        import torch

        request = DrawRequest(*values)
        if request.mode not in MODES:
            raise ValueError(f"mode {request.mode!r} is not one of {list(MODES)}")
        if not (request.prompt or "").strip():
            raise ValueError("write a prompt")
        pipe = self.load(request.folder, request.lora, request.scheduler)
        n, seed = int(request.num_images), int(request.seed)
        kwargs = {"num_inference_steps": int(request.steps), "guidance_scale": float(request.guidance),
                  "negative_prompt": request.negative or None,
                  "generator": [torch.Generator().manual_seed(seed + i) for i in range(n)]}
        if request.lora:
            kwargs["cross_attention_kwargs"] = {"scale": float(request.lora_scale)}
        settings = request.settings()
        run = self.for_mode(pipe, request, kwargs, settings)
        images = run([request.prompt] * n, **kwargs).images
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [str(save_with_settings(im, self.out_dir / f"{stamp}-{seed + i}.png", {**settings, "seed": seed + i}))
                 for i, im in enumerate(images)]
        return paths, png_parameters({**settings, "seed": f"{seed}..{seed + n - 1}"})

    @staticmethod
    def for_mode(pipe, request: DrawRequest, kwargs: dict, settings: dict):
        """The pipeline that draws in the request's mode; its inputs go into ``kwargs`` and ``settings``."""
        from pipelines import CascadePipeline, LDMImg2ImgPipeline, LDMInpaintPipeline

        if request.mode == "text-to-image":
            if not isinstance(pipe, CascadePipeline):
                kwargs["width"], kwargs["height"] = int(request.width), int(request.height)
                settings["size"] = f"{kwargs['width']}x{kwargs['height']}"
            return pipe
        if isinstance(pipe, CascadePipeline):
            raise ValueError(f"{request.mode} needs a text-to-image pipeline, not a cascade")
        image, mask = editor_image_and_mask(request.editor)
        if image is None:
            raise ValueError(f"{request.mode} needs an image: upload one in the editor")
        kwargs["image"], kwargs["strength"] = image, float(request.strength)
        settings.update(strength=float(request.strength), size=f"{image.width}x{image.height}")
        if request.mode == "inpainting":
            if mask is None:
                raise ValueError("inpainting needs a mask: paint over the region to draw anew")
            kwargs["mask_image"] = mask
            run = LDMInpaintPipeline.from_pipe(pipe)
        else:
            run = LDMImg2ImgPipeline.from_pipe(pipe)
        run.set_progress_bar_config(disable=True)
        return run


# ---- the page -------------------------------------------------------------------------------------------

def page_errors(fn):
    """``fn`` with its errors shown as a message on the page, never a stack trace."""
    import gradio as gr

    def wrapped(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
            logger.info("page error: %s", e)
            raise gr.Error(str(e)) from None
    return wrapped


def build_app(runs_dir: Path, out_dir: Path | None = None, allow_dirs: tuple[Path, ...] = ()):
    """The page: a Draw tab and a Runs tab over the runs under ``runs_dir``; drawn images go to ``out_dir``; the
    Draw tab loads pipelines and LoRAs from ``runs_dir`` and ``allow_dirs`` only."""
    import gradio as gr

    runs_dir = Path(runs_dir)
    drawer = Drawer(out_dir or runs_dir / "app-images", roots=(runs_dir, *map(Path, allow_dirs)))
    runs_dir = runs_dir.resolve()
    with gr.Blocks(title="latent diffusion") as app:
        gr.Markdown("# Latent diffusion: draw and watch runs")
        with gr.Tab("Draw", id="draw"):
            draw_tab(runs_dir, drawer)
        with gr.Tab("Runs", id="runs"):
            runs_tab(app, RunsView(runs_dir))
    return app


PAGE_DEFAULTS = {"steps": 30, "guidance": 1.5, "scheduler": "dpm++", "width": 32, "height": 32,
                 "prompt": "a red circle at the top left"}  # a folder without sampling.json


def pipeline_defaults(folder) -> dict:
    """The Draw tab's steps, guidance, scheduler, width, height and prompt for the pipeline ``folder``: what its run sampled and
    validated with (its sampling.json: `ldm.methods.base.write_sampling`), else `PAGE_DEFAULTS`."""
    from ldm.methods.base import read_sampling

    try:
        recorded = read_sampling(folder) if folder and Path(folder).exists() else {}
    except ValueError:
        recorded = {}
    return {"steps": recorded.get("num_inference_steps", PAGE_DEFAULTS["steps"]),
            "guidance": recorded.get("guidance_scale", PAGE_DEFAULTS["guidance"]),
            "scheduler": recorded.get("scheduler", PAGE_DEFAULTS["scheduler"]),
            "width": recorded.get("width", PAGE_DEFAULTS["width"]),
            "height": recorded.get("height", PAGE_DEFAULTS["height"]),
            "prompt": (recorded.get("prompts") or [PAGE_DEFAULTS["prompt"]])[0]}


def draw_tab(runs_dir: Path, drawer: Drawer) -> None:
    """The Draw tab: a pipeline, an optional LoRA, the prompt and settings, the image editor; the gallery."""
    import gradio as gr

    from ldm.diffusion.schedulers import SAMPLERS

    with gr.Row():
        with gr.Column(scale=1):
            pipelines = find_pipelines(runs_dir)
            folder = gr.Dropdown(pipelines, value=pipelines[0] if pipelines else None, allow_custom_value=True,
                                 label="pipeline folder", elem_id="pipeline")
            first = pipeline_defaults(pipelines[0] if pipelines else None)
            with gr.Row():
                lora = gr.Textbox(label="LoRA (folder or .safetensors, optional)", elem_id="lora")
                lora_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA scale")
            mode = gr.Radio(list(MODES), value=MODES[0], label="mode", elem_id="mode")
            prompt = gr.Textbox(label="prompt", value=first["prompt"], elem_id="prompt")
            negative = gr.Textbox(label="negative prompt", elem_id="negative")
            with gr.Row():
                steps = gr.Slider(1, 250, value=first["steps"], step=1, label="steps", elem_id="steps")
                guidance = gr.Slider(1, 15, value=first["guidance"], step=0.1, label="guidance", elem_id="guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SAMPLERS), value=first["scheduler"], label="scheduler")
                seed = gr.Number(value=0, precision=0, label="seed")
            with gr.Row():
                width = gr.Slider(8, 2048, value=first["width"], step=8, label="width (text-to-image)", elem_id="width")
                height = gr.Slider(8, 2048, value=first["height"], step=8, label="height (text-to-image)",
                                   elem_id="height")
                num_images = gr.Slider(1, 16, value=4, step=1, label="images", elem_id="images")
            strength = gr.Slider(0, 1, value=0.8, step=0.05, label="strength (image-to-image, inpainting)")
            editor = gr.ImageEditor(label="image (upload; for inpainting paint the region to redraw)",
                                    type="numpy", brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                    elem_id="editor")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="images", columns=4, elem_id="gallery", format="png")
            info = gr.Textbox(label="settings (also in each PNG's text chunk)", lines=4, elem_id="settings")
    inputs = [folder, lora, lora_scale, mode, prompt, negative, steps, guidance, scheduler, seed, width, height, num_images,
              strength, editor]  # in DrawRequest's order
    go.click(page_errors(drawer.draw), inputs, [gallery, info])
    folder.change(lambda f: tuple(pipeline_defaults(f).values()), [folder],
                  [steps, guidance, scheduler, width, height, prompt])


class RunsView:
    """What the Runs tab shows of a run: its summary, curves and sample grids, refreshed while it goes on."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir

    def show(self, name):
        """(summary, curves, the grid slider's range, the last grid) of run ``name``."""
        import gradio as gr

        if not name:
            return "no run selected", None, gr.update(), None
        path = self.runs_dir / name
        if not (path / "metrics.jsonl").is_file():
            raise ValueError(f"{name!r} is not a run under {self.runs_dir} (no metrics.jsonl)")
        rows = read_rows(path)
        grids = sample_grids(path)
        steps = [s for s, _ in grids]
        lo = steps[0] if steps else 0
        slider = gr.update(minimum=lo, maximum=max(steps[-1] if steps else 0, lo + 1),  # needs max > min
                           step=(steps[1] - steps[0]) if len(steps) > 1 else 1, value=steps[-1] if steps else 0)
        return summary(path, rows), curves_figure(rows), slider, str(grids[-1][1]) if grids else None

    def pick_grid(self, name, step):
        """The grid of the step nearest ``step``."""
        grids = sample_grids(self.runs_dir / name) if name else []
        if not grids:
            return None
        return str(min(grids, key=lambda g: abs(g[0] - step))[1])

    def tick(self, name):
        """`show` again while the run is going; nothing once it finished."""
        import gradio as gr

        path = self.runs_dir / (name or "")
        if not name or not (path / "metrics.jsonl").is_file():
            return gr.update(), gr.update(), gr.update(), gr.update()
        rows = read_rows(path)
        if any("final_loss" in r for r in rows) and time.time() - (path / "metrics.jsonl").stat().st_mtime > 60:
            return gr.update(), gr.update(), gr.update(), gr.update()  # finished: nothing moves
        return self.show(name)


def runs_tab(app, view: RunsView) -> None:
    """The Runs tab: a run, its summary and curves, and a slider over its sample grids."""
    import gradio as gr

    runs = find_runs(view.runs_dir)
    with gr.Row():
        run = gr.Dropdown(runs, value=runs[0] if runs else None, label="run", elem_id="run")
        refresh = gr.Button("Refresh list")
    about = gr.Markdown(elem_id="summary")
    plot = gr.Plot(label="curves", elem_id="curves")
    grid_step = gr.Slider(0, 1, value=0, step=1, label="sample grid at step", elem_id="grid-step")
    grid = gr.Image(label="samples", type="filepath", elem_id="grid")
    outputs = [about, plot, grid_step, grid]
    run.change(page_errors(view.show), [run], outputs)
    grid_step.release(page_errors(view.pick_grid), [run, grid_step], [grid])
    refresh.click(lambda: gr.update(choices=find_runs(view.runs_dir)), None, [run])
    gr.Timer(REFRESH_S).tick(page_errors(view.tick), [run], outputs)
    app.load(page_errors(view.show), [run], outputs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs", help="where runs (and their pipeline folders) are found")
    parser.add_argument("--out-dir", default=None, help="where drawn images go (default: <runs-dir>/app-images)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only (see the docstring)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", default=None, help="user:password required to open the page (visible in the "
                                                     "process list: prefer --auth-file or LDM_APP_AUTH)")
    parser.add_argument("--auth-file", default=None, help="a file holding user:password")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="serve a non-local --host without a login (only behind something that authenticates)")
    parser.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                        help="another folder the page may load pipelines and LoRAs from (besides --runs-dir); repeatable")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                        help="the largest file the page accepts (image-to-image and inpainting uploads)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request the page makes of itself
    try:
        auth = login(args.auth, args.auth_file, os.environ.get(AUTH_ENV))
        check_exposure(args.host, auth, args.insecure_no_auth)
    except ValueError as e:
        parser.error(str(e))
    if args.max_upload_mb <= 0:
        parser.error(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    serve(Path(args.runs_dir), Path(args.out_dir) if args.out_dir else None, args.host, args.port, auth,
          allow_dirs=tuple(Path(d) for d in args.allow_dir), max_upload_mb=args.max_upload_mb)


AUTH_ENV = "LDM_APP_AUTH"
MAX_UPLOAD_MB = 20.0  # a 4096 px PNG is well under it
LOOPBACK = ("localhost", "::1")


def login(auth: str | None, auth_file: str | None, env: str | None) -> tuple[str, str] | None:
    """(user, password) from ``--auth``, else the ``--auth-file``'s first line, else the environment variable;
    None without any. Each must read ``user:password`` with both parts."""
    if auth:
        source, text = "--auth", auth
    elif auth_file:
        lines = Path(auth_file).read_text(encoding="utf-8").strip().splitlines()
        source, text = "--auth-file", lines[0] if lines else ""
    elif env:
        source, text = AUTH_ENV, env
    else:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise ValueError(f"{source} must read user:password (both parts, split at the first colon); got "
                         f"{'an empty part' if sep else 'no colon'}")
    return user, password


def check_exposure(host: str, auth, insecure: bool) -> None:
    """Refuse a non-loopback ``host`` without a login, unless ``insecure`` (the network in front authenticates)."""
    local = host in LOOPBACK or host.startswith("127.")
    if not local and auth is None and not insecure:
        raise ValueError(f"--host {host} serves the page beyond this machine, where anyone who reaches it could load "
                         f"any folder as a model and make the machine sample: give a login (--auth-file, "
                         f"{AUTH_ENV}, or --auth), or pass --insecure-no-auth if the network in front authenticates")


def serve(runs_dir: Path, out_dir: Path | None = None, host: str = "127.0.0.1", port: int = 7860, auth=None,
          block: bool = True, allow_dirs: tuple[Path, ...] = (), max_upload_mb: float = MAX_UPLOAD_MB):
    """Build the page and serve it; the runs folder (sample grids) and the images folder are the only files it
    serves beyond Gradio's own; uploads larger than ``max_upload_mb`` are refused. ``block=False`` returns the
    running app (``app.close()`` stops it)."""
    out_dir = out_dir or Path(runs_dir) / "app-images"
    app = build_app(runs_dir, out_dir, allow_dirs)
    app.queue().launch(server_name=host, server_port=port, auth=auth, show_error=False, quiet=True,
                       allowed_paths=[str(Path(runs_dir).resolve()), str(Path(out_dir).resolve())],
                       max_file_size=int(max_upload_mb * 2 ** 20), prevent_thread_lock=True)
    if not block:
        return app
    print(f"serving on http://{host}:{port} (runs under {Path(runs_dir).resolve()}); Ctrl-C stops")
    app.block_thread()
    return app


if __name__ == "__main__":
    main()
