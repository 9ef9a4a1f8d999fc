"""Typed config: presets and key=value overrides, with clear errors for bad keys and values."""

import pytest

from autoencoder.config import AutoencoderConfig
from ldm.engine.config import load_config, save_config
from ldm.trainer.config import LDMConfig


def test_preset_and_overrides(tmp_path):
    cfg = load_config(LDMConfig, "configs/ldm/shapes.yaml",
                      ["train.max_steps=7", "name=x", "sample.seeds=[5, 6]", "diffusion.snr_gamma=5"])
    assert cfg.train.max_steps == 7 and cfg.name == "x" and cfg.sample.seeds == [5, 6]
    assert cfg.diffusion.snr_gamma == 5.0 and cfg.data.dataset == "shapes"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(LDMConfig, tmp_path / "c.yaml") == cfg


def test_every_preset_loads():
    from pathlib import Path

    for preset in Path("configs/autoencoder").glob("*.yaml"):
        load_config(AutoencoderConfig, preset)
    presets = sorted(Path("configs/ldm").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"shapes", "digits", "tiny", "folder-256", "sd15-finetune-512"}
    for preset in presets:
        text = preset.read_text()
        assert text.startswith("#"), f"{preset} should say what it is for and what hardware it was sized for"
        load_config(LDMConfig, preset)


def test_accelerate_configs_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted(Path("configs/accelerate").glob("*.yaml")):
        assert path.read_text().startswith("#"), f"{path} should say when to pick it"
        kinds[path.stem] = str(load_config_from_file(str(path)).distributed_type)
    assert kinds == {"cpu_2proc": "DistributedType.MULTI_GPU", "ddp": "DistributedType.MULTI_GPU",
                     "fsdp": "DistributedType.FSDP",
                     "fsdp_cpu_2proc": "DistributedType.FSDP"}


def test_what_each_strategy_refuses_says_why():
    from autoencoder.config import check_config as check_autoencoder
    from ldm.trainer.config import check_config

    # DeepSpeed is refused by both trainers, the diffusion trainer pointing at FSDP; the autoencoder trainer shards
    # nothing.
    with pytest.raises(ValueError, match="DeepSpeed is not supported: its checkpoints are pickles.*use FSDP"):
        check_config(LDMConfig(), 2, "deepspeed")
    for strategy in ("fsdp", "deepspeed"):
        with pytest.raises(ValueError, match=f"{strategy} strategy is not supported.*use DDP"):
            check_autoencoder(AutoencoderConfig(), 1, strategy)
    check_config(LDMConfig(), 2, "fsdp")
    check_config(LDMConfig(), 2, "multi_gpu")
    with pytest.raises(ValueError, match="train.mixed_precision='fp16'.*sharded gradient scaler"):
        check_config(load_config(LDMConfig, None, ["train.mixed_precision=fp16"]), 2, "fsdp")
    with pytest.raises(ValueError, match="train.optimizer='adamw8bit'.*use 'adamw'"):
        check_config(load_config(LDMConfig, None, ["train.optimizer=adamw8bit"]), 2, "fsdp")


def test_a_launch_asking_for_fsdp_or_deepspeed_is_named_so_where_accelerate_falls_back_to_ddp(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from ldm.engine.engine import strategy_name

    on_cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert strategy_name(on_cpu) == "multi_cpu"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert strategy_name(on_cpu) == "deepspeed"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert strategy_name(on_cpu) == "fsdp"


@pytest.mark.parametrize("env, message", [
    ({"FSDP_VERSION": "1"}, "fsdp_version: 1 is not supported.*set fsdp_version: 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true is not supported"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "pass train.gradient_checkpointing=true"),
])
def test_fsdp_launch_settings_the_trainer_cannot_honour_are_refused(monkeypatch, env, message):
    from ldm.engine.sharding import launch_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        launch_settings()
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    for key in env:
        monkeypatch.delenv(key)
    assert launch_settings() == {"reshard_after_forward": False}


@pytest.mark.parametrize("override, message", [
    (["train.max_step=3"], "unknown config key"),
    (["train.max_steps=abc"], "train.max_steps"),
    (["train.max_steps=true"], "train.max_steps"),
    (["data.center_crop=3"], "data.center_crop"),
    (["max_steps"], "key=value"),
    (["diffusion.beta_schedule=cosine"], r"diffusion\.beta_schedule='cosine' is not one of \['linear'"),
    (["sample.scheduler=euler"], r"sample\.scheduler='euler' is not one of \['ddpm', 'ddim', 'dpm\+\+'\]"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
])
def test_bad_overrides_raise(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(LDMConfig, None, override)


def test_missing_preset_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(LDMConfig, "nope.yaml")


def test_overrides_are_read_by_their_field_type():
    cfg = load_config(LDMConfig, None, ["train.mixed_precision=no", "train.learning_rate=1e-5", "name=123",
                                        "train.ema_decay=1e-4", "train.resume=null", "model.pretrained=/x/y",
                                        "sample.prompts=[a b, c d]", "train.keep_last=null"])
    assert cfg.train.mixed_precision == "no"  # YAML alone would read `no` as false
    assert cfg.train.learning_rate == 1e-5 and cfg.train.ema_decay == 1e-4  # YAML 1.1 reads 1e-5 as text
    assert cfg.name == "123" and cfg.train.resume is None and cfg.model.pretrained == "/x/y"
    assert cfg.sample.prompts == ["a b", "c d"] and cfg.train.keep_last is None


def test_config_differences_leave_out_run_length_and_read_new_keys_as_defaults():
    import dataclasses

    from ldm.engine.config import config_differences

    defaults = dataclasses.asdict(LDMConfig())
    old = dataclasses.asdict(LDMConfig())
    del old["data"]["max_bad_fraction"]  # a config written before the setting existed
    new = dataclasses.asdict(load_config(LDMConfig, None, ["train.max_steps=9", "train.log_every=3"]))
    assert config_differences(old, new, defaults, LDMConfig.RUN_SETTINGS) == []
    changed = dataclasses.asdict(load_config(LDMConfig, None, ["data.max_bad_fraction=0.5", "train.seed=3"]))
    assert config_differences(old, changed, defaults, LDMConfig.RUN_SETTINGS) == [
        "data.max_bad_fraction: 0.01 -> 0.5", "train.seed: 0 -> 3"]


def test_both_trainers_extend_the_engine_settings():
    import dataclasses

    from autoencoder.config import AETrainConfig
    from ldm.engine.config import EngineSettings, RunConfig
    from ldm.trainer.config import TrainConfig

    engine_keys = {f.name for f in dataclasses.fields(EngineSettings)}
    for config, train in ((LDMConfig, TrainConfig), (AutoencoderConfig, AETrainConfig)):
        assert issubclass(config, RunConfig) and issubclass(train, EngineSettings)
        assert engine_keys <= {f.name for f in dataclasses.fields(train)}
        assert set(RunConfig.RUN_SETTINGS) <= set(config.RUN_SETTINGS)
    # the autoencoder keeps its own defaults and has no setting it would not use
    assert AETrainConfig().batch_size == 32 and TrainConfig().batch_size == 64
    assert not hasattr(AETrainConfig(), "validate_every")
    assert "export_dir" in AutoencoderConfig.RUN_SETTINGS and "export_dir" not in LDMConfig.RUN_SETTINGS


def test_a_warm_up_of_half_the_run_or_more_is_warned_about(caplog):
    from ldm.engine.config import load_config
    from ldm.trainer.config import LDMConfig, check_config

    with caplog.at_level("WARNING", logger="ldm.engine.config"):
        check_config(load_config(LDMConfig, "configs/ldm/tiny.yaml", ["train.max_steps=200", "train.warmup_steps=1000"]))
    assert "train.warmup_steps=1000 against train.max_steps=200: the learning rate never reaches " \
           "train.learning_rate: it gets to 20% of it" in caplog.text and "(e.g. 10)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.engine.config"):
        check_config(load_config(LDMConfig, "configs/ldm/tiny.yaml", ["train.max_steps=200", "train.warmup_steps=120"]))
    assert "reaches train.learning_rate only at step 120" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.engine.config"):
        check_config(load_config(LDMConfig, "configs/ldm/tiny.yaml", ["train.max_steps=200", "train.warmup_steps=10"]))
    assert "warmup" not in caplog.text


def test_bf16_on_a_cpu_without_bf16_hardware_is_warned_about(caplog, monkeypatch):
    import torch

    from ldm.engine.accelerator import warn_if_slow_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="ldm.engine.accelerator"):
        assert warn_if_slow_bf16("bf16", "cpu")
        assert not warn_if_slow_bf16("no", "cpu") and not warn_if_slow_bf16("bf16", "cuda")
    assert "train.mixed_precision=bf16 on a CPU without bf16 hardware" in caplog.text
    assert "set train.mixed_precision=no" in caplog.text
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert not warn_if_slow_bf16("bf16", "cpu")


def test_more_data_workers_than_cores_is_warned_about(caplog, monkeypatch):
    import os

    from ldm.engine.accelerator import warn_if_workers_exceed_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level("WARNING", logger="ldm.engine.accelerator"):
        assert warn_if_workers_exceed_cores(8) and not warn_if_workers_exceed_cores(1)
        assert warn_if_workers_exceed_cores(1, num_processes=2)  # one core each: the worker takes it
    assert "train.num_workers=8 data-loading workers per process, on 2 core(s) per process" in caplog.text
    assert "use at most 1" in caplog.text


def test_a_missing_vae_folder_names_the_choices():
    import pytest

    from ldm.models.vae import resolve_vae_path

    with pytest.raises(FileNotFoundError, match=r"model.vae: no AutoencoderKL folder .*'/path/to/vae'; "
                                                r"model.vae=builtin is the VAE shipped for 32 px data"):
        resolve_vae_path("/path/to/vae")
    assert (resolve_vae_path("builtin") / "config.json").is_file()
