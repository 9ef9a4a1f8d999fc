"""The interface every fine-tuning method has.

A method (``finetune.method``; `ldm.methods.registry.METHODS` names them) decides what trains and what a run of it
leaves behind, in four steps the trainer calls in order: ``check`` its settings with the rest of the config,
``check_captions`` of the training data, ``trainable`` (freeze what stays, add what is new, return the
optimizer's parameter groups) and ``export``. The trainer never asks which method it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ldm.diffusion.schedulers import sampling_scheduler
from ldm.engine.config import Checker
from pipelines.files import atomic_save_dir

logger = logging.getLogger(__name__)

SAMPLING_FILE = "sampling.json"  # beside an export: the settings its run sampled and validated with


def write_sampling(folder, cfg, prompts=()) -> None:
    """Write ``SAMPLING_FILE`` into ``folder``: the run's ``sample.`` settings and training size, which
    `ldm.generate` and the page take as their defaults for what the folder holds, and ``prompts``, its sample
    grid's (the page's first prompt)."""
    import json

    settings = {"scheduler": cfg.sample.scheduler, "num_inference_steps": cfg.sample.num_inference_steps,
                "guidance_scale": cfg.sample.guidance_scale, "height": cfg.data.resolution, "width": cfg.data.resolution,
                **({"prompts": list(prompts)} if prompts else {})}
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def read_sampling(folder) -> dict:
    """The settings ``write_sampling`` wrote in ``folder`` (a file's folder for a file), or {}."""
    import json

    folder = Path(folder)
    path = (folder if folder.is_dir() else folder.parent) / SAMPLING_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e.msg}); remove it to sample with the command's own defaults") from None
    return data if isinstance(data, dict) else {}


@dataclass
class ExportJob:
    """What a method exports from: the run's config and stage, its components and the unwrapped networks (with
    the EMA weights in place when EMA is on), and the run folder to write into."""

    cfg: object  # LDMConfig
    stage: object  # the run's stage: makes the pipeline and prepares it for saving
    comp: object  # Components
    unet: object
    text_encoder: object
    run_dir: Path
    metadata: dict = field(default_factory=dict)  # the run's kohya-ss ``ss_*`` entries for shared files
    prompts: list = field(default_factory=list)  # the sample grid's, recorded beside what is exported

    def save_pipeline(self, folder: str = "pipeline") -> dict[str, Path]:
        """The stage's pipeline of the trained networks, sampling with ``sample.scheduler``, as ``<run>/<folder>``."""
        cfg, comp = self.cfg, self.comp
        pipe = self.stage.for_export(self.stage.pipeline(comp, self.unet.eval(), self.text_encoder.eval(),
                                                         sampling_scheduler(comp.scheduler, cfg.sample.scheduler)))
        size = sum(p.numel() * p.element_size() for m in pipe.components.values()
                   if hasattr(m, "parameters") for p in m.parameters())
        logger.info("exporting the pipeline (%.0f MB of weights) to %s", size / 2**20, self.run_dir / folder)
        t0 = time.time()
        atomic_save_dir(lambda d: (pipe.save_pretrained(d, safe_serialization=True), write_sampling(d, cfg, self.prompts)),
                        self.run_dir / folder)
        logger.info("exported in %.1f s", time.time() - t0)
        return {"pipeline": self.run_dir / folder}


class Method:
    """A fine-tuning method. The checks pass by default; ``trainable`` and ``export`` are each method's own."""

    families = ("sd",)  # the model families (`pipelines.families`) it trains

    def check(self, c: Checker) -> None:
        """Reject settings the method cannot train with (``c`` names the key, the value and what is valid)."""

    def check_captions(self, cfg, captions: list[str]) -> None:
        """Reject training captions the method would learn nothing from."""

    def trainable(self, cfg, comp) -> list[dict]:
        """Freeze what stays, add what is new, and return the optimizer's parameter groups; set
        ``comp.train_text_encoder`` to whether the text encoder runs with gradients in training."""
        raise NotImplementedError

    def export(self, job: ExportJob) -> dict[str, Path]:
        """Write what the run made into ``job.run_dir``; return {what: path}."""
        raise NotImplementedError
