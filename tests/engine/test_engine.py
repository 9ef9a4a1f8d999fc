"""The run engine on its own, with a one-parameter model: cadence, throughput windows that leave out
validation and checkpoint time, and the summary."""

import subprocess
import sys
import time

import pytest
import torch

from ldm.engine.config import load_config
from ldm.engine.engine import Engine
from ldm.engine.records import read_metrics
from ldm.trainer.config import LDMConfig


class _Source:
    batches_per_epoch = 4

    def iterate(self, start, stop):
        for step in range(start, stop):
            yield step, step // 4, None


def test_cadence_throughput_and_summary(tmp_path, capsys):
    cfg = load_config(LDMConfig, None, [f"output_dir={tmp_path}", "name=e", "train.max_steps=6", "train.log_every=3",
                                        "train.validate_every=2", "train.checkpoint_every=3", "train.batch_size=64",
                                        "train.tensorboard=false", "train.warmup_steps=0"])
    engine = Engine(cfg, lambda *args: None, "engine test", cfg.train.validate_every)
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=0.1)
    engine.optimize_with(optimizer, [w], 0.0, "constant", 0)
    engine.track_ema([w], 0.5)
    validated = []

    def step(step, batch):
        loss = (w ** 2).sum()
        loss.backward()
        return {"loss": loss.detach()}

    def validate(step):
        validated.append(step)
        time.sleep(0.3)  # slow: must not count against throughput
        return {"val_loss": float(step)}

    assert [engine.needs_log(d) for d in range(1, 7)] == [False, False, True, False, False, True]
    assert [engine.needs_validate(d) for d in range(1, 7)] == [False, True, False, True, False, False]
    assert [engine.needs_save(d) for d in range(1, 7)] == [False, False, True, False, False, True]
    assert engine.fit(_Source(), step, validate) == 6
    assert validated == [0, 2, 4, 6]
    rows = read_metrics(tmp_path / "e" / "metrics.jsonl")
    logged = [r for r in rows if "epoch" in r]
    assert [r["step"] for r in logged] == [3, 6]
    # 3 steps of 64 images, each step microseconds long; a validation (0.3 s) sat inside each window.
    assert all(r["images_per_s"] > 3 * 64 / 0.3 * 5 for r in logged), logged
    # SGD at lr 0.1 on |w|^2: w shrinks by 0.8 per step; the loss logged is the window's mean.
    assert abs(logged[0]["loss"] - 3 * (1 + 0.64 + 0.8 ** 4) / 3) < 1e-5
    with engine.ema_weights():  # the EMA lags the trained weights
        assert float(w[0].detach()) > 0.8 ** 6 + 1e-3
    assert abs(float(w[0].detach()) - 0.8 ** 6) < 1e-6  # and they are back afterwards
    result = engine.finish({"extra": 1}, {"where": tmp_path})
    assert result["steps"] == 6 and result["extra"] == 1 and result["final_loss"] == round(logged[1]["loss"], 5)
    assert "engine test run e" in capsys.readouterr().out
    assert [p.name for p in sorted((tmp_path / "e" / "checkpoints").iterdir())] == ["step-3", "step-6"]


FAULTS_SCRIPT = """
import resource, sys
import torch
torch.set_num_threads(1)  # one malloc arena: worker threads' arenas would grow on their own schedule
if sys.argv[1] == "keep":
    from ldm.engine.accelerator import keep_freed_cpu_memory
    assert keep_freed_cpu_memory()
net = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 8, 3, padding=1))
x = torch.randn(64, 8, 16, 16)
for i in range(10):
    if i == 5:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_cpu_memory_is_reused_without_page_faults():
    """A training step's buffers, freed and allocated again the next step, cost a page fault per 4 KiB page by
    default (tens of thousands per step here); with `keep_freed_cpu_memory` the later steps fault (almost) nothing."""
    def count(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True,
                                  check=True).stdout)

    # the fewest of three runs: on a loaded machine a run now and then faults a few hundred pages more (640 once
    # in a full suite, against 0-128 usually and ~27,000 without the setting)
    faults = {"default": count("default"), "keep": min(count("keep") for _ in range(3))}
    assert faults["default"] > 5_000, faults
    assert faults["keep"] < 500, faults
