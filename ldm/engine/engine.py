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
import os
import shutil
import time
from typing import Callable, Iterable, Protocol

import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ldm.engine.accelerator import (
    keep_freed_cpu_memory,
    make_accelerator,
    warn_if_cpu_threads_capped,
    warn_if_slow_bf16,
    warn_if_workers_exceed_cores,
)
from ldm.engine.checkpoint import CheckpointManager, list_checkpoints, read_train_state, resolve_resume
from ldm.engine.config import LR_SCHEDULES, config_differences, save_config, to_yaml
from ldm.engine.errors import NonFinite, Preempted, StopAsked, stop_signals
from ldm.engine.records import MetricsWriter, format_summary, plot_curves
from ldm.engine.runlock import lock_run_folder, release_run_folder
from ldm.engine.sharding import EMASettings, Sharding, TrainingState, fsdp_requested

logger = logging.getLogger(__name__)


class Source(Protocol):
    """What the engine needs of a batch source."""

    batches_per_epoch: int

    def iterate(self, start: int, stop: int) -> Iterable[tuple[int, int, object]]:
        """(step, epoch, batch) for steps start..stop-1."""


def strategy_name(accelerator) -> str:
    """How Accelerate distributes this run, as the config check names it. A launch asked for FSDP or DeepSpeed
    counts as such even where Accelerate falls back to DDP (on CPUs it does, silently)."""
    if fsdp_requested():
        return "fsdp"
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return {DistributedType.FSDP: "fsdp", DistributedType.MULTI_GPU: "multi_gpu",
            DistributedType.MULTI_CPU: "multi_cpu"}.get(kind, "no")


# What each strategy does with the weights: every process holds all of them (DDP), or a shard (FSDP).
SHARDING = {"no": "none", "multi_cpu": "ddp", "multi_gpu": "ddp", "fsdp": "fsdp"}


def memory_row(accelerator, modules, frozen=()) -> dict:
    """How the run held its weights: ``sharding`` (none, ddp, fsdp), ``params_total`` (the parameters
    of the trained ``modules``, each counted once), ``params_per_process`` (those of them the largest process
    holds: a sharded parameter counts its local shard) and ``params_frozen`` (those of the ``frozen`` modules,
    which every process holds whole), and on CUDA ``peak_memory_gib_per_process`` (the largest process's peak of
    allocated memory). Every process must call it."""
    params = {id(p): p for m in modules for p in m.parameters()}
    total = sum(p.numel() for p in params.values())
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params.values())
    device = accelerator.device
    held = accelerator.gather(torch.tensor([local], device=device)).max().item()
    still = sum(p.numel() for p in {id(p): p for m in frozen for p in m.parameters() if id(p) not in params}.values())
    row = {"sharding": SHARDING[strategy_name(accelerator)], "params_total": total, "params_per_process": int(held),
           "params_frozen": still}
    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        row["peak_memory_gib_per_process"] = round(accelerator.gather(peak).max().item(), 2)
    return row


class Engine:
    """Runs a trainer's steps with everything around them (see the module docstring). ``cfg`` is a
    `RunConfig` whose ``train`` section is an `EngineSettings`; ``check(cfg, num_processes, strategy)`` rejects
    its bad values; ``validate_every``: steps between two validations (0: at the start and the end only)."""

    def __init__(self, cfg, check: Callable, title: str, validate_every: int = 0):
        self.cfg, self.tc, self.title, self.run_dir = cfg, cfg.train, title, cfg.run_dir
        self.accelerator = acc = make_accelerator(self.tc.mixed_precision)
        check(cfg, acc.num_processes, strategy_name(acc))  # before any I/O or model building
        set_seed(self.tc.seed)
        # FSDP2 on more than one process (`ldm.engine.sharding`); one process has nothing to shard
        self.sharding = Sharding(acc, self.tc.mixed_precision) \
            if strategy_name(acc) == "fsdp" and acc.num_processes > 1 else None
        self.resume_from = resolve_resume(self.tc.resume, self.run_dir / "checkpoints")  # a wrong path fails now
        self.made_folder = not self.run_dir.exists()  # a set-up failure removes what this run made
        if acc.is_main_process:  # one run per folder, for the whole run (`ldm.engine.runlock`)
            lock_run_folder(self.run_dir)
        self._claim_run_folder()
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        warn_if_cpu_threads_capped(acc)
        if self.tc.num_workers:
            warn_if_workers_exceed_cores(self.tc.num_workers, acc.num_processes)
        self.device = acc.device
        warn_if_slow_bf16(self.tc.mixed_precision, self.device.type)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        self.optimizer = self.lr_schedule = self.ema = self.metrics = self.ckpt = None
        self.clip_params, self.max_grad_norm, self.ema_params, self.trained_modules = [], 0.0, [], {}
        self.validate_every = validate_every
        self.first_bad = None  # the first step whose loss or gradients were not finite (a device tensor)
        self.skipped_steps, self.nonfinite_skipped, self.start_step, self.step, self.last_row = 0, 0, 0, 0, {}
        self.train_time, self.paused, self.final_validation = 0.0, 0.0, {}
        self.checkpoint_files: dict = {}  # name -> folder copied into every checkpoint
        self.state_objects: dict = {}  # name -> object whose state_dict is checkpointed (LR schedule, EMA)

    # ---- set-up ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def setting_up(self):
        """Around a run's set-up (data, networks, caches): when it fails, the run folder this run made is removed
        again (nothing in it is a run yet), so it does not show among the runs; a folder that was there stays."""
        try:
            yield
        except BaseException:
            release_run_folder(self.run_dir)
            if self.made_folder and self.accelerator.is_main_process \
                    and not (self.run_dir / "metrics.jsonl").exists():
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _claim_run_folder(self) -> None:
        """A run folder holds one run. Resuming checks the checkpoint's config against this one (settings of
        run length and logging may change; anything else needs ``train.allow_config_change``). A fresh start
        where another run left checkpoints or a different config needs ``train.overwrite``, which removes
        those checkpoints (so the old run's higher steps cannot outlive or outrank the new ones)."""
        import dataclasses

        import yaml

        tc, now, defaults = self.tc, dataclasses.asdict(self.cfg), dataclasses.asdict(type(self.cfg)())
        if self.resume_from is not None:
            diff = config_differences(yaml.safe_load(read_train_state(self.resume_from)["config"]), now, defaults,
                                      self.cfg.RUN_SETTINGS)
            if diff and not tc.allow_config_change:
                raise ValueError(f"train.resume: checkpoint {self.resume_from} was written with another config "
                                 f"({'; '.join(diff)}); resume with the same settings, or pass "
                                 f"train.allow_config_change=true to go on with these")
            if diff:
                logger.warning("resuming %s with a changed config: %s", self.resume_from, "; ".join(diff))
            return
        saved = list_checkpoints(self.run_dir / "checkpoints")
        old_config = self.run_dir / "config.yaml"
        trained = (self.run_dir / "metrics.jsonl").is_file()  # a run that failed while setting up left no metrics
        diff = config_differences(yaml.safe_load(old_config.read_text()) or {}, now, defaults, self.cfg.RUN_SETTINGS) \
            if old_config.is_file() and trained else []
        if (saved or diff) and not tc.overwrite:
            held = f"checkpoints up to {saved[-1].name}" if saved else "a run with another config"
            raise ValueError(f"{self.run_dir} already holds {held}" + (f" ({'; '.join(diff)})" if diff else "")
                             + "; resume it with train.resume=latest, choose another name=..., or pass "
                               "train.overwrite=true to start afresh (its checkpoints are removed)")
        self.accelerator.wait_for_everyone()  # every process has looked before anything is removed
        if saved and self.accelerator.is_main_process:
            logger.warning("train.overwrite=true: removing %d checkpoint(s) of the previous run in %s", len(saved),
                           self.run_dir / "checkpoints")
            shutil.rmtree(self.run_dir / "checkpoints")
        self.accelerator.wait_for_everyone()

    def optimize_with(self, optimizer, clip_params: list, max_grad_norm: float, schedule: str, warmup_steps: int,
                      modules: dict | None = None):
        """The optimizer the engine steps after each step function, clipping ``clip_params`` to
        ``max_grad_norm`` (0: off), with an LR schedule counted in optimizer steps whatever the number of
        processes (so a checkpoint resumes on another count). Call after ``accelerator.prepare``. ``modules``:
        {name: unwrapped module} the optimizer trains, which a sharded checkpoint holds by name (needed to write
        one, under FSDP, or to read one)."""
        from diffusers.optimization import get_scheduler

        self.optimizer, self.clip_params, self.max_grad_norm = optimizer, clip_params, max_grad_norm
        self.trained_modules = modules or {}
        raw = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's wrapper
        self.lr_schedule = get_scheduler(LR_SCHEDULES[schedule], raw, num_warmup_steps=warmup_steps,
                                         num_training_steps=self.tc.max_steps)
        self.state_objects["lr_schedule"] = self.lr_schedule  # checkpointed as JSON, never pickled

    def track_ema(self, params: list, decay: float | None, warmup: bool = False):
        """An exponential moving average of ``params`` (diffusers' EMAModel), stepped after every optimizer
        step and checkpointed; ``ema_weights()`` swaps it in. None: off."""
        if decay is None:
            return None
        from diffusers.training_utils import EMAModel

        self.ema_params = params
        # torch has no sharded version of every foreach op the EMA uses (_foreach_copy_): one tensor at a time there
        self.ema = EMAModel(params, decay=decay, use_ema_warmup=warmup, power=2 / 3, foreach=self.sharding is None)
        self.ema.to(self.device)
        # sharded: the shadows are sharded like the weights, checkpointed with them by name
        self.state_objects["ema"] = EMASettings(self.ema) if self.sharding is not None else self.ema
        return self.ema

    def training_state(self) -> TrainingState | None:
        """The trained modules, optimizer and EMA as a sharded checkpoint holds them (None when the trainer gave
        no modules)."""
        if not self.trained_modules:
            return None
        return TrainingState(self.trained_modules, getattr(self.optimizer, "optimizer", self.optimizer), self.ema,
                             self.ema_params)

    @contextlib.contextmanager
    def whole(self, *modules):
        """Whole copies of ``modules`` (unwrapped) on the main process for the body: under FSDP gathered by every
        process (the others get None), otherwise the modules themselves. Every process must enter it."""
        plain = [None if m is None else self.accelerator.unwrap_model(m) for m in modules]
        if self.sharding is None:
            yield plain
            return
        with self.sharding.gathered(plain) as copies:
            yield copies

    @contextlib.contextmanager
    def no_sync(self, module):
        """Gradients of the body's backward pass are kept on this process, not reduced (an accumulation
        micro-batch before the last)."""
        if self.sharding is not None and self.sharding.is_sharded(module):
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(module):
                yield

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
        every = self.validate_every
        return bool(every) and done % every == 0 and done < self.tc.max_steps

    # ---- the run -----------------------------------------------------------------------------

    def fit(self, source: Source, train_step: Callable[[int, object], dict],
            validate: Callable[[int], dict] | None = None) -> int:
        """Resume, then run ``train_step(step, batch) -> {name: tensor}`` (forward and backward of one global
        batch) for every step up to ``train.max_steps``; ``validate(step) -> row`` (main process's row) at the
        start of a fresh run, every ``validate_every`` steps and at the end. Returns the last step.

        Raises `Preempted` after writing a checkpoint when the process is asked to stop (SIGTERM, SIGINT,
        SIGUSR1), and `NonFinite` (before anything non-finite is saved) when the loss or the gradients stop
        being finite under ``train.on_nonfinite=stop``."""
        with stop_signals() as stop:
            start = self._resume(source.batches_per_epoch)
            if start == 0 and validate is not None:
                self._validate(validate, 0)  # a stop here (`StopAsked`) ends the run: nothing was trained
            self._train(source, train_step, validate, start, stop)
            self.check_finite(self.step)  # nothing non-finite reaches validation or export
            if validate is not None:
                with contextlib.suppress(StopAsked):  # cut short by a stop: the checkpoint comes next
                    self.final_validation = self._validate(validate, self.step)
            if self._stop_requested(stop):  # no grid, scoring or export after a stop: a checkpoint to resume from
                self._preempt(self.step, source, stop)
        return self.step

    def _train(self, source: Source, train_step, validate, start: int, stop: dict) -> None:
        acc, tc = self.accelerator, self.tc
        self.window, self.window_steps = {}, 0
        bar = tqdm(total=tc.max_steps, initial=start, desc=self.title, disable=not acc.is_main_process)
        t_start = self.t_window = time.time()
        self.paused = self.window_paused = 0.0
        for step, epoch, batch in source.iterate(start, tc.max_steps):
            terms = train_step(step, batch)
            self._optimize(step, terms)
            self.step = done = step + 1
            bar.update(1)
            with contextlib.suppress(StopAsked):  # a validation cut short by a stop: the checkpoint comes next
                self._after_step(done, epoch, terms, source, validate, bar)
            if self._stop_requested(stop):
                bar.close()
                self._preempt(done, source, stop)
        bar.close()
        self.train_time = time.time() - t_start - self.paused

    def _resume(self, batches_per_epoch: int) -> int:
        acc, tc = self.accelerator, self.tc
        self.ckpt = CheckpointManager(acc, self.run_dir / "checkpoints", tc.keep_last, self.state_objects,
                                      self.training_state(), sharded=self.sharding is not None)
        self.start_step = self.step = start = \
            self.ckpt.load(self.resume_from, batches_per_epoch) if self.resume_from is not None else 0
        if self.ema is not None:
            self.ema.to(self.device)  # a loaded EMA state arrives on the CPU
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", acc.is_main_process, fresh=start == 0,
                                     tensorboard_dir=self.run_dir / "tensorboard" if tc.tensorboard else None)
        self.metrics.truncate_after(start)  # rows an interrupted run wrote after its last checkpoint
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        return start

    def _after_step(self, done: int, epoch: int, terms: dict, source, validate, bar) -> None:
        """Window sums (on the device: one host sync per log line), then log, save and validate when due."""
        for key, value in terms.items():
            total, count = self.window.get(key, (0.0, 0))
            self.window[key] = (total + torch.as_tensor(value, device=self.device).detach().float(), count + 1)
        self.window_steps += 1
        if self.needs_log(done):
            self.check_finite(done, params=False)
            seconds = time.time() - self.t_window - (self.paused - self.window_paused)
            self._log(done, epoch, self.window, self.window_steps, seconds)
            bar.set_postfix(loss=f"{self.last_row.get('loss', math.nan):.4f}")
            self.window, self.window_steps, self.t_window, self.window_paused = {}, 0, time.time(), self.paused
        if self.needs_save(done):
            self.check_finite(done)
            self._pause(self.ckpt.save, done, source.batches_per_epoch, to_yaml(self.cfg), self.checkpoint_files)
        if self.needs_validate(done):
            self._validate(validate, done)

    def _optimize(self, step: int, terms: dict) -> None:
        """Clip, step the optimizer and the LR schedule, zero the gradients, step the EMA. A non-finite loss or
        gradient norm marks the step (no host sync); under ``train.on_nonfinite=skip_step`` the update is
        skipped instead (one host sync per step)."""
        acc, policy = self.accelerator, self.tc.on_nonfinite
        norm = None
        if self.max_grad_norm > 0 or policy == "skip_step":
            limit = self.max_grad_norm if self.max_grad_norm > 0 else math.inf
            if self.sharding is not None:  # the norm over every process's shards
                norm = torch.nn.utils.clip_grad_norm_(self.clip_params, limit).full_tensor()
            else:
                norm = acc.clip_grad_norm_(self.clip_params, limit)
        bad = ~torch.isfinite(torch.stack([torch.as_tensor(v, device=self.device).detach().float().sum()
                                           for v in terms.values()])).all()
        if norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(norm, device=self.device))
        if policy == "skip_step" and bool(bad):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
            logger.warning("step %d: non-finite loss or gradient, update skipped (train.on_nonfinite=skip_step; "
                           "%d so far)", step + 1, self.nonfinite_skipped)
            return
        self.first_bad = torch.where(bad & (self.first_bad < 0), step + 1, self.first_bad)
        self.optimizer.step()
        if acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped the update
            self.skipped_steps += 1
        else:
            self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.ema_params)

    # ---- faults ------------------------------------------------------------------------------

    def check_finite(self, done: int, params: bool = True) -> None:
        """Under ``train.on_nonfinite=stop``: raise `NonFinite` if any step so far had a non-finite loss or
        gradient, or (``params``) a trained weight is non-finite. One host sync."""
        if self.tc.on_nonfinite != "stop" or self.first_bad is None:
            return
        flags = [self.first_bad.float()]
        if params and self.clip_params:
            finite = torch.stack([torch.isfinite(getattr(p, "_local_tensor", p).detach()).all()
                                  for p in self.clip_params]).all()  # a shard's own part; reduced below
            flags.append(torch.where(finite, -1.0, float(done)).to(self.device))
        bad = self.accelerator.reduce(torch.stack(flags), reduction="max")
        if float(bad.max()) >= 0:
            saved = list_checkpoints(self.ckpt.root)
            raise NonFinite(int(bad[0]) if bad[0] >= 0 else done, saved[-1] if saved else None,
                            self.tc.checkpoint_every)

    def _stop_requested(self, stop: dict) -> bool:
        """Whether any process was signalled (agreed across processes, so all stop at the same step)."""
        asked = stop["signal"] is not None
        if self.accelerator.num_processes > 1:
            asked = bool(self.accelerator.reduce(torch.tensor(float(asked), device=self.device), reduction="max"))
        return asked

    def _preempt(self, done: int, source, stop: dict) -> None:
        """Write a checkpoint at ``done`` (unless one was just written) and raise `Preempted`."""
        self.check_finite(done)
        path = self.ckpt.root / f"step-{done}"
        if not self.needs_save(done):
            path = self.ckpt.save(done, source.batches_per_epoch, to_yaml(self.cfg), self.checkpoint_files)
        name = stop["name"] or "a signal on another process"
        if self.accelerator.is_main_process:
            self.metrics.write(step=done, preempted=name, checkpoint=str(path))
            self.metrics.close()
        raise Preempted(done, path, name)

    def _log(self, done: int, epoch: int, window: dict, steps: int, seconds: float) -> None:
        means = self.accelerator.reduce(torch.stack([total / count for total, count in window.values()]),
                                        reduction="mean")
        row = {"step": done, "epoch": epoch, **{k: v.item() for k, v in zip(window, means)},
               "lr": self.lr_schedule.get_last_lr()[0],
               "images_per_s": steps * self.tc.batch_size / max(seconds, 1e-9)}
        if self.tc.mixed_precision == "fp16":
            row["skipped_steps"] = self.skipped_steps
        if self.nonfinite_skipped:
            row["nonfinite_skipped"] = self.nonfinite_skipped
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

    def finish(self, result: dict, paths: dict, plot_keys: tuple[str, ...] = ("loss",), modules=(),
               frozen=()) -> dict:
        """Write the run's last metrics row (training numbers, how the trained ``modules`` and the ``frozen``
        ones were held (`memory_row`) and
        ``result``), the loss plot and the closing summary (with ``paths``: what was saved where); return the
        numbers."""
        acc = self.accelerator
        steps_run = self.step - self.start_step
        final = {"final_loss": round(self.last_row.get("loss", math.nan), 5), "steps": self.step,
                 "train_time_s": round(self.train_time, 1),
                 "images_per_s": round(steps_run * self.tc.batch_size / max(self.train_time, 1e-9), 1),
                 "num_processes": acc.num_processes, **memory_row(acc, modules, frozen), **result}
        if self.tc.mixed_precision == "fp16":
            final["skipped_steps"] = self.skipped_steps
        if self.nonfinite_skipped:
            final["nonfinite_skipped"] = self.nonfinite_skipped
        if acc.is_main_process:
            self.metrics.write(step=self.step, **final)
            self.metrics.close()
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png", keys=plot_keys)
            saved = ", ".join(str(p) for p in list_checkpoints(self.ckpt.root)) or "-"
            shown = {k: (f"{v:.4f}".rstrip("0").rstrip(".") if isinstance(v, float) and abs(v) < 1e4 else v)
                     for k, v in final.items()}  # 637.1, not 637.1000
            print(format_summary(f"{self.title} run {self.cfg.name}", {
                **shown, **paths, "loss plot": self.run_dir / "loss.png", "metrics": self.run_dir / "metrics.jsonl",
                "checkpoints": saved}))
        # Every process reaches here before the process group goes: a process that tore it down while another
        # was still exporting left that one hanging at exit, in gloo's destructor (seen once in a 2-process run).
        acc.wait_for_everyone()
        acc.end_training()
        release_run_folder(self.run_dir)
        return final
