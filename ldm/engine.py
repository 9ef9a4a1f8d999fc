"""The run engine shared by the diffusion and autoencoder trainers. It knows nothing of diffusion.

A trainer builds its models, data and optimizer, hands them to an `Engine`, and calls ``fit`` with a batch
source and a step function; the engine does the rest of a run:

    Engine(cfg, check)     accelerator, config check, seed, resume target, run folder
    .optimize_with(...)    optimizer, gradient clipping, LR schedule (in optimizer steps), fp16 skip count
    .track_ema(...)        an EMA of the trained weights, checkpointed with the rest
    .fit(source, step)     resume, then per step: step -> optimize -> log -> save -> validate; timing
    .finish(result, paths) the last metrics row, the loss plot and the closing summary

Cadence is named: ``needs_log``, ``needs_save``, ``needs_validate``. Throughput windows leave out the time
spent saving and validating.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterable, Protocol

import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, list_checkpoints, resolve_resume
from .config import save_config, to_yaml
from .run import MetricsWriter, format_summary, make_accelerator, plot_curves, warn_if_cpu_threads_capped

logger = logging.getLogger(__name__)

LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # config name -> diffusers' name


class Source(Protocol):
    """What the engine needs of a batch source."""

    batches_per_epoch: int

    def iterate(self, start: int, stop: int) -> Iterable[tuple[int, int, object]]:
        """(step, epoch, batch) for steps start..stop-1."""


def strategy_name(accelerator) -> str:
    """How Accelerate distributes this run, as the config check names it."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return "deepspeed_zero3" if plugin is not None and plugin.zero_stage == 3 else "deepspeed"
    return {DistributedType.FSDP: "fsdp", DistributedType.MULTI_GPU: "multi_gpu",
            DistributedType.MULTI_CPU: "multi_cpu"}.get(kind, "no")


class Engine:
    """Runs a trainer's steps with everything around them (see the module docstring). ``cfg.train`` must
    have: seed, mixed_precision, max_steps, batch_size, log_every, checkpoint_every, keep_last, resume,
    tensorboard, and may have validate_every."""

    def __init__(self, cfg, check: Callable, title: str):
        self.cfg, self.tc, self.title, self.run_dir = cfg, cfg.train, title, cfg.run_dir
        self.accelerator = acc = make_accelerator(self.tc.mixed_precision)
        check(cfg, acc.num_processes, strategy_name(acc))  # before any I/O or model building
        set_seed(self.tc.seed)
        self.resume_from = resolve_resume(self.tc.resume, self.run_dir / "checkpoints")  # a wrong path fails now
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        warn_if_cpu_threads_capped(acc)
        self.device = acc.device
        self.optimizer = self.lr_schedule = self.ema = self.metrics = self.ckpt = None
        self.clip_params, self.max_grad_norm, self.ema_params = [], 0.0, []
        self.skipped_steps, self.start_step, self.step, self.last_row = 0, 0, 0, {}
        self.train_time, self.paused, self.final_validation = 0.0, 0.0, {}
        self.checkpoint_files: dict = {}  # name -> folder copied into every checkpoint

    # ---- set-up ------------------------------------------------------------------------------

    def optimize_with(self, optimizer, clip_params: list, max_grad_norm: float, schedule: str, warmup_steps: int):
        """The optimizer the engine steps after each step function, clipping ``clip_params`` to
        ``max_grad_norm`` (0: off), with an LR schedule counted in optimizer steps whatever the number of
        processes (so a checkpoint resumes on another count). Call after ``accelerator.prepare``."""
        from diffusers.optimization import get_scheduler

        self.optimizer, self.clip_params, self.max_grad_norm = optimizer, clip_params, max_grad_norm
        raw = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
        self.lr_schedule = get_scheduler(LR_SCHEDULES[schedule], raw, num_warmup_steps=warmup_steps,
                                         num_training_steps=self.tc.max_steps)
        self.accelerator.register_for_checkpointing(self.lr_schedule)

    def track_ema(self, params: list, decay: float | None, warmup: bool = False):
        """An exponential moving average of ``params`` (diffusers' EMAModel), stepped after every optimizer
        step and checkpointed; ``ema_weights()`` swaps it in. None: off."""
        if decay is None:
            return None
        from diffusers.training_utils import EMAModel

        self.ema_params = params
        self.ema = EMAModel(params, decay=decay, use_ema_warmup=warmup, power=2 / 3, foreach=True)
        self.ema.to(self.device)
        self.accelerator.register_for_checkpointing(self.ema)
        return self.ema

    @contextlib.contextmanager
    def ema_weights(self):
        """Run the body with the EMA weights in place (when EMA is on), then put the trained ones back."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.ema_params)
        self.ema.copy_to(self.ema_params)
        try:
            yield
        finally:
            self.ema.restore(self.ema_params)

    # ---- cadence -----------------------------------------------------------------------------

    def needs_log(self, done: int) -> bool:
        return done % self.tc.log_every == 0 or done == self.tc.max_steps

    def needs_save(self, done: int) -> bool:
        every = self.tc.checkpoint_every
        return bool(every) and (done % every == 0 or done == self.tc.max_steps)

    def needs_validate(self, done: int) -> bool:
        every = getattr(self.tc, "validate_every", 0)
        return bool(every) and done % every == 0 and done < self.tc.max_steps

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, source: Source, train_step: Callable[[int, object], dict],
            validate: Callable[[int], dict] | None = None) -> int:
        """Resume, then run ``train_step(step, batch) -> {name: tensor}`` (forward and backward of one global
        batch) for every step up to ``train.max_steps``; ``validate(step) -> row`` (main process's row) at the
        start of a fresh run, every ``train.validate_every`` steps and at the end. Returns the last step."""
        acc, tc = self.accelerator, self.tc
        self.ckpt = CheckpointManager(acc, self.run_dir / "checkpoints", tc.keep_last)
        self.start_step = self.step = start = \
            self.ckpt.load(self.resume_from, source.batches_per_epoch) if self.resume_from is not None else 0
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", acc.is_main_process, fresh=start == 0,
                                     tensorboard_dir=self.run_dir / "tensorboard" if tc.tensorboard else None)
        self.metrics.truncate_after(start)  # rows an interrupted run wrote after its last checkpoint
        if start == 0 and validate is not None:
            self._validate(validate, 0)
        window, window_steps = {}, 0
        bar = tqdm(total=tc.max_steps, initial=start, desc=self.title, disable=not acc.is_main_process)
        t_start = t_window = time.time()
        self.paused = window_paused = 0.0
        for step, epoch, batch in source.iterate(start, tc.max_steps):
            terms = train_step(step, batch)
            self._optimize()
            for key, value in terms.items():  # sums stay on the device: one host sync per log line
                total, count = window.get(key, (0.0, 0))
                window[key] = (total + torch.as_tensor(value, device=self.device).detach().float(), count + 1)
            done, window_steps = step + 1, window_steps + 1
            self.step = done
            bar.update(1)
            if self.needs_log(done):
                seconds = time.time() - t_window - (self.paused - window_paused)
                self._log(done, epoch, window, window_steps, seconds)
                bar.set_postfix(loss=f"{self.last_row.get('loss', math.nan):.4f}")
                window, window_steps, t_window, window_paused = {}, 0, time.time(), self.paused
            if self.needs_save(done):
                self._pause(self.ckpt.save, done, source.batches_per_epoch, to_yaml(self.cfg), self.checkpoint_files)
            if self.needs_validate(done):
                self._validate(validate, done)
        bar.close()
        self.train_time = time.time() - t_start - self.paused
        if validate is not None:
            self.final_validation = self._validate(validate, self.step)
        return self.step

    def _optimize(self) -> None:
        acc = self.accelerator
        if self.max_grad_norm > 0:
            acc.clip_grad_norm_(self.clip_params, self.max_grad_norm)
        self.optimizer.step()
        if acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            self.skipped_steps += 1
        else:
            self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.ema_params)

    def _log(self, done: int, epoch: int, window: dict, steps: int, seconds: float) -> None:
        means = self.accelerator.reduce(torch.stack([total / count for total, count in window.values()]),
                                        reduction="mean")
        row = {"step": done, "epoch": epoch, **{k: v.item() for k, v in zip(window, means)},
               "lr": self.lr_schedule.get_last_lr()[0],
               "images_per_s": steps * self.tc.batch_size / max(seconds, 1e-9)}
        if self.tc.mixed_precision == "fp16":
            row["skipped_steps"] = self.skipped_steps
        self.metrics.write(**row)
        self.last_row = row

    def _pause(self, fn, *args):
        """Run ``fn`` outside the throughput clock."""
        t0 = time.time()
        try:
            return fn(*args)
        finally:
            self.paused += time.time() - t0

    def _validate(self, validate, step: int) -> dict:
        row = self._pause(validate, step) or {}
        if self.accelerator.is_main_process and row:
            self.metrics.write(step=step, **row)
        self.accelerator.wait_for_everyone()
        return row

    # ---- the end -----------------------------------------------------------------------------

    def finish(self, result: dict, paths: dict, plot_keys: tuple[str, ...] = ("loss",)) -> dict:
        """Write the run's last metrics row (training numbers and ``result``), the loss plot and the closing
        summary (with ``paths``: what was saved where); return the numbers."""
        acc = self.accelerator
        steps_run = self.step - self.start_step
        final = {"final_loss": round(self.last_row.get("loss", math.nan), 5), "steps": self.step,
                 "train_time_s": round(self.train_time, 1),
                 "images_per_s": round(steps_run * self.tc.batch_size / max(self.train_time, 1e-9), 1),
                 "num_processes": acc.num_processes, **result}
        if self.tc.mixed_precision == "fp16":
            final["skipped_steps"] = self.skipped_steps
        if acc.is_main_process:
            self.metrics.write(step=self.step, **final)
            self.metrics.close()
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", keys=plot_keys)
            saved = ", ".join(str(p) for p in list_checkpoints(self.ckpt.root)) or "-"
            shown = {k: (f"{v:.4f}" if isinstance(v, float) and abs(v) < 1e4 else v) for k, v in final.items()}
            print(format_summary(f"{self.title} run {self.cfg.name}", {
                **shown, **paths, "loss plot": self.run_dir / "loss.png", "metrics": self.run_dir / "metrics.jsonl",
                "checkpoints": saved}))
        acc.end_training()
        return final
