"""A stop signal in each phase of a run. The first stops training within the step it arrives in and cuts caching,
validation and sampling short at their next row or batch; once a step was trained it leaves a checkpoint and
nothing after it (no grid, scoring or export). A second stops at once. Signals within `SAME_REQUEST_S` of each
other are one request (Ctrl-C under `accelerate launch` reaches the trainer as SIGINT and SIGTERM together)."""

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

import ldm.trainer.data as trainer_data
import ldm.trainer.train as trainer
from ldm.engine.checkpoint import list_checkpoints
from ldm.engine.engine import Engine
from ldm.engine.errors import SAME_REQUEST_S, Preempted, StopAsked, user_errors
from ldm.engine.records import read_metrics
from ldm.trainer.train import train
from pipelines import LDMPipeline

GRID = "sample.prompts=[a red circle at the top left,a blue square at the bottom right,a green triangle at the top right]"


def _send(*names: str, gap: float = 0.0) -> None:
    for i, name in enumerate(names):
        if i:
            time.sleep(gap)
        os.kill(os.getpid(), getattr(signal, name))


def _signal_on_encode(monkeypatch, *names: str, gap: float = 0.0) -> list:
    """Send ``names`` to this process during the first batch the latent cache encodes; the batches encoded."""
    calls, real = [], trainer_data.latent_cache

    def latent_cache(encoding, *args, **kwargs):
        def encode(pixels):
            calls.append(len(pixels))
            if len(calls) == 1:
                _send(*names, gap=gap)
            return encoding.encode(pixels)

        return real(dataclasses.replace(encoding, encode=encode), *args, **kwargs)

    monkeypatch.setattr(trainer_data, "latent_cache", latent_cache)
    return calls


def _no_half_built_cache(cfg) -> bool:
    return not [p for p in Path(cfg.data.cache_dir).rglob("*") if p.name.endswith(".building")]


@pytest.mark.parametrize("names", [("SIGTERM",), ("SIGINT", "SIGTERM")])
def test_a_stop_while_caching_ends_the_run_there_with_no_run_folder_or_half_built_cache(names, tiny_cfg, monkeypatch):
    calls = _signal_on_encode(monkeypatch, *names)  # two at once: one request, as under accelerate launch
    cfg = tiny_cfg("name=cut")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopAsked, match=f"stopped by {names[0]} while caching latents, before any training step"):
        train(cfg)
    assert len(calls) == 1  # the next batch was not encoded
    assert not cfg.run_dir.exists() and _no_half_built_cache(cfg)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are put back


def test_a_second_signal_stops_at_once(tiny_cfg, monkeypatch):
    calls = _signal_on_encode(monkeypatch, "SIGTERM", "SIGINT", gap=SAME_REQUEST_S + 0.2)
    cfg = tiny_cfg("name=hard")
    with pytest.raises(KeyboardInterrupt, match="second stop signal .SIGINT"):
        train(cfg)
    assert len(calls) == 1 and _no_half_built_cache(cfg)
    with pytest.raises(SystemExit) as stopped:  # the command line's exit status for it
        with user_errors():
            raise KeyboardInterrupt("a second stop signal (SIGINT)")
    assert stopped.value.code == 130


def test_a_stop_during_a_step_checkpoints_that_step_and_exports_nothing(tiny_cfg, monkeypatch):
    real = Engine._optimize

    def optimize(self, step, terms):
        real(self, step, terms)
        if step == 2:  # the third step
            _send("SIGTERM")

    monkeypatch.setattr(Engine, "_optimize", optimize)
    cfg = tiny_cfg("name=step", "train.max_steps=10", "train.checkpoint_every=0")
    with pytest.raises(Preempted, match="SIGTERM after step 3"):
        train(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir / "checkpoints")] == ["step-3"]
    assert not (cfg.run_dir / "pipeline").exists() and not list((cfg.run_dir / "samples").glob("*.png"))


def _signal_on_pipeline_call(monkeypatch) -> list:
    """SIGTERM during the first image batch a pipeline draws; the batches drawn."""
    calls, real = [], LDMPipeline.__call__

    def call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            _send("SIGTERM")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LDMPipeline, "__call__", call)
    return calls


def test_a_stop_during_validation_cuts_the_grid_short_and_checkpoints_with_no_grid_or_export(tiny_cfg, monkeypatch):
    calls = _signal_on_pipeline_call(monkeypatch)
    cfg = tiny_cfg("name=val", "train.max_steps=6", "train.validate_every=2", "train.checkpoint_every=0", GRID)
    with pytest.raises(Preempted, match="SIGTERM after step 2"):
        train(cfg)
    assert len(calls) == 1  # one row of three: no more rows, no scoring
    assert [p.name for p in list_checkpoints(cfg.run_dir / "checkpoints")] == ["step-2"]
    assert not (cfg.run_dir / "samples" / "step-2.png").exists() and not (cfg.run_dir / "pipeline").exists()
    assert read_metrics(cfg.run_dir / "metrics.jsonl")[-1]["preempted"] == "SIGTERM"


def test_a_stop_during_the_final_grid_checkpoints_the_last_step_and_a_resume_finishes_the_run(tiny_cfg, monkeypatch):
    calls = _signal_on_pipeline_call(monkeypatch)
    cfg = tiny_cfg("name=end", "train.max_steps=3", "train.validate_every=0", "train.checkpoint_every=0", GRID)
    with pytest.raises(Preempted, match="SIGTERM after step 3"):
        train(cfg)
    assert len(calls) == 1 and not (cfg.run_dir / "pipeline").exists()
    assert [p.name for p in list_checkpoints(cfg.run_dir / "checkpoints")] == ["step-3"]
    monkeypatch.undo()
    summary = train(tiny_cfg("name=end", "train.max_steps=3", "train.validate_every=0", "train.checkpoint_every=0",
                             GRID, "train.resume=latest"))
    assert summary["steps"] == 3 and (cfg.run_dir / "pipeline" / "model_index.json").is_file()
    assert (cfg.run_dir / "samples" / "step-3.png").is_file()


def test_a_stop_during_the_export_lets_the_export_finish(tiny_cfg, monkeypatch, caplog, capfd):
    real = trainer.method_for

    class Signalling:
        def __init__(self, method):
            self.method = method

        def __getattr__(self, name):
            return getattr(self.method, name)

        def export(self, job):
            _send("SIGTERM")
            return self.method.export(job)

    monkeypatch.setattr(trainer, "method_for", lambda cfg: Signalling(real(cfg)))
    cfg = tiny_cfg("name=export", "train.max_steps=2", GRID)
    with caplog.at_level("INFO", logger="ldm.methods.base"):
        assert train(cfg)["steps"] == 2
    assert (cfg.run_dir / "pipeline" / "model_index.json").is_file()
    assert "exporting the pipeline (" in caplog.text and "exported in" in caplog.text  # the export is not silent
    assert "sample grid:" in capfd.readouterr().err  # nor is the final grid: a bar over its rows


def test_a_stop_while_sampling_for_scores_cuts_it_short(tiny_cfg):
    from ldm.engine.errors import stop_signals
    from ldm.eval.scoring import generate

    class Pipe:
        calls = 0

        def set_progress_bar_config(self, **kwargs):
            pass

        def __call__(self, prompts, **kwargs):
            Pipe.calls += 1
            _send("SIGTERM")
            return type("Out", (), {"images": [None] * len(prompts)})()

    with stop_signals(), pytest.raises(StopAsked, match="while sampling"):
        generate(Pipe(), ["a"] * 8, list(range(8)), batch_size=2)
    assert Pipe.calls == 1
