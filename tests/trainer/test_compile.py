"""train.compile=true: the U-Net is compiled in place, so checkpoints and exports keep their names and a
compiled run's checkpoint resumes in an eager run. Slow on CPU (about 2 minutes of compilation)."""

import pytest
from safetensors.torch import load_file

from ldm.data.builtin import generate_shapes
from ldm.engine.config import load_config
from ldm.trainer.config import LDMConfig
from ldm.trainer.train import train

pytestmark = pytest.mark.slow


def test_compiled_run_exports_and_resumes_eagerly(tmp_path):
    data = generate_shapes(tmp_path / "shapes", num_images=48, seed=0)
    common = [f"output_dir={tmp_path}", f"data.dataset={data}", f"data.cache_dir={tmp_path / 'cache'}",
              "train.max_steps=4", "train.checkpoint_every=2", "sample.seeds=[0]", "sample.num_inference_steps=2",
              "train.tensorboard=false"]
    compiled = load_config(LDMConfig, "configs/ldm/tiny.yaml", ["name=compiled", "train.compile=true", *common])
    train(compiled)
    weights = load_file(compiled.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("_orig_mod" in k for k in weights)
    eager = load_config(LDMConfig, "configs/ldm/tiny.yaml",
                        ["name=eager", *common, f"train.resume={compiled.run_dir / 'checkpoints' / 'step-2'}"])
    train(eager)
    other = load_file(eager.run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights.keys() == other.keys()
    assert max((weights[k] - other[k]).abs().max().item() for k in weights) < 1e-3
