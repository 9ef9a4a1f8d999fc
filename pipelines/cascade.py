"""A cascade (Ho et al. 2022): a text-to-image base pipeline, then one or more super-resolution stages, each
upscaling the previous stage's images under the same prompt and negative prompt.

    cascade = CascadePipeline.from_pretrained("runs/cascade")
    images = cascade("a red circle at the top left", noise_level=[100], generator=torch.Generator().manual_seed(0)).images

A cascade is saved as one folder: ``cascade.json`` (the stages, in order, and each super-resolution stage's
sampling defaults), ``base/`` (an `LDMPipeline` folder) and ``stage_1/``, ``stage_2/``, ... (each a
`SuperResolutionPipeline` folder, which diffusers' ``StableDiffusionUpscalePipeline`` also loads when latent).
"""

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.files import replace_dir, usual_modes
from pipelines.ldm_pipeline import LDMPipeline, _is_int
from pipelines.sr_pipeline import SuperResolutionPipeline

CASCADE_FILE = "cascade.json"


@dataclass
class CascadeOutput:
    images: list  # the last stage's images (or array/tensor, by output_type)
    intermediates: list | None = None  # with return_intermediates: each earlier stage's images as PIL


def _per_stage(name: str, value, count: int, defaults: list) -> list:
    """A per-stage setting: one value for every stage, a list with one per stage, or None for the defaults."""
    if value is None:
        return list(defaults)
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} needs one value per stage ({count}), got {len(value)}: {list(value)!r}")
        return list(value)
    return [value] * count


def _to_pil(images: torch.Tensor) -> list:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))


class CascadePipeline:
    """``base`` (text -> low-resolution images) followed by ``stages`` (super-resolution), sampled with one
    generator (or one generator per image) for the whole chain."""

    def __init__(self, base: LDMPipeline, stages: list[SuperResolutionPipeline], stage_defaults: list[dict] | None = None):
        if not stages:
            raise ValueError("a cascade needs at least one super-resolution stage")
        for i, s in enumerate(stages, 1):
            if not isinstance(s, SuperResolutionPipeline):
                raise ValueError(f"stage {i} must be a SuperResolutionPipeline, got {type(s).__name__}")
        self.base, self.stages = base, list(stages)
        defaults = stage_defaults or [{} for _ in stages]
        if len(defaults) != len(stages):
            raise ValueError(f"stage_defaults needs one dict per stage ({len(stages)}), got {len(defaults)}")
        self.stage_defaults = [{"noise_level": 20, "num_inference_steps": 50, "guidance_scale": 1.0, **d}
                               for d in defaults]

    # ------------------------------------------------------------------ folders
    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "CascadePipeline":
        root = Path(path)
        index = root / CASCADE_FILE
        if not index.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a cascade folder (no {CASCADE_FILE})")
        spec = json.loads(index.read_text())
        base = LDMPipeline.from_pretrained(root / spec["base"], **kwargs)
        stages = [SuperResolutionPipeline.from_pretrained(root / s["folder"], **kwargs) for s in spec["stages"]]
        return cls(base, stages, [{k: v for k, v in s.items() if k != "folder"} for s in spec["stages"]])

    @classmethod
    def from_stages(cls, base_path, stage_paths: list, stage_defaults: list[dict] | None = None) -> "CascadePipeline":
        """A cascade of separately trained pipeline folders (a base, then super-resolution stages)."""
        if not (Path(base_path) / "model_index.json").is_file():
            raise FileNotFoundError(f"{str(base_path)!r} is not a pipeline folder (no model_index.json)")
        for p in stage_paths:
            if not (Path(p) / "low_res_scheduler").is_dir():
                raise ValueError(f"{str(p)!r} is not a super-resolution pipeline folder (no low_res_scheduler/); "
                                 f"train one with stage=super_resolution")
        return cls(LDMPipeline.from_pretrained(base_path),
                   [SuperResolutionPipeline.from_pretrained(p) for p in stage_paths], stage_defaults)

    def save_pretrained(self, save_directory) -> None:
        """Write every stage into one folder, beside the target, and swap it in when complete."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            self.base.save_pretrained(tmp / "base")
            spec = {"base": "base", "stages": []}
            for i, (stage, d) in enumerate(zip(self.stages, self.stage_defaults), 1):
                stage.save_pretrained(tmp / f"stage_{i}")
                spec["stages"].append({"folder": f"stage_{i}", **d})
            (tmp / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
            usual_modes(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def to(self, device):
        self.base.to(device)
        for s in self.stages:
            s.to(device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        for p in (self.base, *self.stages):
            p.set_progress_bar_config(**kwargs)

    # ------------------------------------------------------------------ sampling
    def upscale(self, images, prompts: list[str], negative_prompts: list[str] | None = None, generator=None,
                noise_level=None, num_inference_steps=None, guidance_scale=None, output_type: str = "pil",
                return_intermediates: bool = False, guidance_rescale: float = 0.0) -> CascadeOutput:
        """Run the super-resolution stages on ``images`` (one per prompt; PIL, arrays, or a tensor in [0, 1]).
        ``noise_level``, ``num_inference_steps``, ``guidance_scale``: one value for every stage, a list with
        one per stage, or None for the values saved with the cascade."""
        n = len(self.stages)
        levels = _per_stage("noise_level", noise_level, n, [d["noise_level"] for d in self.stage_defaults])
        steps = _per_stage("num_inference_steps", num_inference_steps, n,
                           [d["num_inference_steps"] for d in self.stage_defaults])
        scales = _per_stage("guidance_scale", guidance_scale, n, [d["guidance_scale"] for d in self.stage_defaults])
        intermediates = []
        for i, stage in enumerate(self.stages):
            last = i == n - 1
            out = stage(prompts, image=images, negative_prompt=negative_prompts, generator=generator,
                        noise_level=levels[i], num_inference_steps=steps[i], guidance_scale=scales[i],
                        guidance_rescale=guidance_rescale, output_type=output_type if last else "pt").images
            if not last:
                if return_intermediates:
                    intermediates.append(_to_pil(out))
                images = out
        return CascadeOutput(out, intermediates if return_intermediates else None)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5, noise_level=None,
                 num_images_per_prompt: int = 1, generator=None, output_type: str = "pil",
                 return_intermediates: bool = False, guidance_rescale: float = 0.0, stage_num_inference_steps=None,
                 stage_guidance_scale=None, cross_attention_kwargs=None) -> CascadeOutput:
        """``num_inference_steps``, ``guidance_scale``, ``cross_attention_kwargs`` (e.g. a LoRA scale) are the
        base's; ``noise_level`` (the augmentation level at sampling), ``stage_num_inference_steps`` and
        ``stage_guidance_scale`` the super-resolution stages' (one value, or one per stage; None: the saved
        defaults). The prompt and negative prompt go to every stage; a generator list holds one generator per
        final image, each used by every stage for its image."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not (_is_int(num_images_per_prompt) and num_images_per_prompt > 0):
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        low = self.base(prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                        generator=generator, output_type="pt", guidance_rescale=guidance_rescale,
                        cross_attention_kwargs=cross_attention_kwargs).images
        k = num_images_per_prompt
        expand = (lambda xs: [x for x in xs for _ in range(k)])  # noqa: E731  (the base's order: a prompt's images adjacent)
        negatives = None
        if negative_prompt is not None:
            negatives = expand([negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt)
        out = self.upscale(low, expand(list(prompts)), negatives, generator=generator, noise_level=noise_level,
                           num_inference_steps=stage_num_inference_steps, guidance_scale=stage_guidance_scale,
                           output_type=output_type, return_intermediates=return_intermediates,
                           guidance_rescale=guidance_rescale)
        if return_intermediates:
            out.intermediates = [_to_pil(low), *out.intermediates]
        return out
