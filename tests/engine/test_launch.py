"""``python -m ldm.launch``: Accelerate's launch, except that with one process the trainer's exit status is the
launcher's (one-line errors stay one line, exit 2) and a signal to the launcher is passed on and waited for (the
trainer writes its checkpoint, exit 75), without Accelerate's warning about defaulted values."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ldm.engine.checkpoint import list_checkpoints
from ldm.engine.records import read_metrics

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ldm.launch", str(ROOT / "train_ldm.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
           f"output_dir={tmp_path}", "train.tensorboard=false", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_a_bad_setting_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    out, err = _launch(tmp_path, "train.max_steps=-1").communicate(timeout=240)
    assert "error: " in err and "train.max_steps" in err, err[-2000:]
    assert "Traceback" not in err and "CalledProcessError" not in err and "were not passed" not in err, err[-3000:]
    assert _launch(tmp_path, "train.max_steps=-1").wait(timeout=240) == 2


def test_a_sigterm_to_the_launcher_waits_for_the_checkpoint_and_exits_75(tmp_path, tiny_vae_dir, data_dir):
    proc = _launch(tmp_path, "name=stopped", f"model.vae={tiny_vae_dir}", f"data.dataset={data_dir}",
                   f"data.cache_dir={tmp_path / 'cache'}", "sample.seeds=[0]", "sample.num_inference_steps=2",
                   "train.max_steps=400", "train.log_every=1", "train.checkpoint_every=0")
    metrics, end = tmp_path / "stopped" / "metrics.jsonl", time.time() + 240
    while not (metrics.exists() and any("epoch" in r for r in read_metrics(metrics))):
        assert proc.poll() is None and time.time() < end, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher, as a scheduler would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    saved = list_checkpoints(tmp_path / "stopped" / "checkpoints")
    assert len(saved) == 1 and "preempted: stopped by SIGTERM" in err
    assert "Traceback" not in err
