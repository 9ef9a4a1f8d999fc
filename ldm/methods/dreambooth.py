"""DreamBooth (Ruiz et al. 2023): teach a subject from a few images under a rare-token prompt, while a
prior-preservation loss on images of its class, drawn by the base model itself, keeps the class intact.

Class images are generated once into ``dreambooth.class_data`` (an image folder with metadata.jsonl,
like any dataset here) and reused by later runs; only missing ones are drawn.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipelines.files import atomic_save

logger = logging.getLogger(__name__)

def count_class_images(folder: Path, prompts: list[str]) -> int:
    """Images in ``folder``'s metadata.jsonl captioned with one of ``prompts`` (and present on disk)."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return 0
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return sum(1 for r in rows if r.get("text") in prompts and (folder / r["file_name"]).is_file())


@torch.no_grad()
def ensure_class_images(pipe_factory, folder: str | Path, prompts: list[str], num_images: int, *, seed: int,
                        num_inference_steps: int, guidance_scale: float, accelerator, batch_size: int = 8) -> Path:
    """Make sure ``folder`` holds ``num_images`` images of ``prompts`` (image i of prompts[i % n]), drawing
    the missing ones with the pipeline ``pipe_factory()`` returns (main process; seeds seed+i, so a top-up
    is deterministic). New files take numbers no other image in the folder uses."""
    folder = Path(folder)
    if isinstance(prompts, str):
        prompts = [prompts]
    if accelerator.is_main_process:
        have = count_class_images(folder, prompts)
        if have >= num_images:
            logger.info("reusing %d class images of %s in %s", have, prompts, folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            pipe = pipe_factory()
            pipe.set_progress_bar_config(disable=True)
            meta = folder / "metadata.jsonl"
            rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()] \
                if meta.is_file() else []
            from tqdm.auto import tqdm

            taken = {r["file_name"] for r in rows}
            numbers = (k for k in range(len(taken) + num_images + 1) if f"class-{k:05d}.png" not in taken)
            for start in tqdm(range(have, num_images, batch_size), desc="class images"):
                ids = list(range(start, min(start + batch_size, num_images)))
                gens = [torch.Generator().manual_seed(seed + i) for i in ids]
                texts = [prompts[i % len(prompts)] for i in ids]
                images = pipe(texts, generator=gens, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale).images
                for text, image in zip(texts, images):
                    # A free number: the folder may be shared with other prompts' images.
                    name = f"class-{next(numbers):05d}.png"
                    atomic_save(lambda p, im=image: im.save(p, format="PNG"), folder / name)
                    rows.append({"file_name": name, "text": text})
                # metadata last: an interrupted run leaves only images it has listed
                atomic_save(lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)), meta)
            logger.info("drew %d class images of %s into %s", num_images - have, prompts, folder)
    accelerator.wait_for_everyone()
    return folder
