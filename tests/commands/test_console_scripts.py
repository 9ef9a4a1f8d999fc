"""The console scripts of pyproject.toml name functions that exist, and the trainer's exits 0 when a run ends (a
console script passes what its function returns to sys.exit, where anything but None or 0 is a failure)."""

import importlib
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_console_script_names_a_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"ldm-train", "ldm-generate", "ldm-evaluate", "ldm-export", "ldm-app"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_trainer_command_returns_nothing_for_sys_exit(tmp_path, tiny_vae_dir, data_dir, one_thread):
    from ldm.trainer.train import main

    assert main(["--config", str(ROOT / "configs/ldm/tiny.yaml"), f"output_dir={tmp_path}", "train.max_steps=2",
                 f"model.vae={tiny_vae_dir}", f"data.dataset={data_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                 "sample.seeds=[0]", "sample.num_inference_steps=2", "train.tensorboard=false"]) is None
    assert (tmp_path / "tiny" / "pipeline" / "model_index.json").is_file()
