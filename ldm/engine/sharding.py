"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): every process holds a shard of each
trained weight, of its gradient and of its optimizer state, and gathers a block's weights only while the block
runs.

One code path on GPUs and CPUs. ``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp.yaml``;
``fsdp_cpu_2proc.yaml`` on a machine without GPUs) asks for it; the trainer shards its modules itself, block by
block, before it builds the optimizer, and never hands them to ``accelerator.prepare`` (which on CPUs would
quietly wrap them in DDP instead). What needs whole weights gets them from `Sharding.gathered`: every process
takes part, the main process receives a plain copy (sample grids, scores, export).

Checkpoints of a sharded run (`TrainingState`) are torch distributed checkpoints in safetensors
(``sharded/shard-0000R-….safetensors``, one per process, the layout in each file's header) plus a JSON file for
what is not a tensor; nothing is unpickled. They load on any number of processes, sharded or not, because every
tensor is named by its parameter's name, not by its place in a list.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path

import torch

from ldm.engine.checkpoint import join_state, split_state

logger = logging.getLogger(__name__)

def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (Accelerate sets ACCELERATE_USE_FSDP; on CPUs it then falls back to DDP
    without a word, so the trainer reads the request itself)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def launch_settings() -> dict:
    """The FSDP settings of the launch (Accelerate's FSDP_* variables) this trainer honours, checked: version 2
    only, parameters on the GPU, activation checkpointing through ``train.gradient_checkpointing``."""
    env = os.environ
    version = env.get("FSDP_VERSION", "2")
    if version != "2":
        raise ValueError(f"fsdp_version: {version} is not supported; this trainer shards with FSDP2 "
                         f"(torch.distributed.fsdp.fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("fsdp_offload_params: true is not supported by this trainer; keep the shards on the GPUs "
                         "(false), or add processes to make each shard smaller")
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise ValueError("fsdp_activation_checkpointing: true is not used by this trainer; set it to false and pass "
                         "train.gradient_checkpointing=true, which checkpoints the U-Net's blocks under FSDP too")
    return {"reshard_after_forward": env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"}


def _empty_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every parameter replaced by a meta tensor of its shape (no memory), buffers kept as they
    are (small, and some are not in the state dict); it is filled again from a full state dict."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    return module


class Sharding:
    """The run's FSDP2 sharding over all processes: ``shard`` modules block by block, ``gathered`` plain copies of
    them, and the gradient-sync switch for accumulation micro-batches."""

    def __init__(self, accelerator, mixed_precision: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.accelerator, self.device = accelerator, accelerator.device
        self.settings = launch_settings()
        self.mesh = init_device_mesh(self.device.type, (accelerator.num_processes,))
        # bf16 compute on gathered weights, fp32 master weights, optimizer state and gradient reduction
        self.policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                           reduce_dtype=torch.float32)
        self.skeletons: dict[int, torch.nn.Module] = {}  # id(sharded module) -> its plain skeleton (main process)

    def shard(self, module: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
        """Shard ``module`` in place: each of ``blocks`` is its own unit (gathered while it runs), the rest goes
        with the root. The main process's weights are broadcast first, so every process starts from the same
        ones whatever random numbers set-up drew on each."""
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        for tensor in [*module.parameters(), *module.buffers()]:
            on_device = tensor.data.to(self.device)
            dist.broadcast(on_device, src=0)
            tensor.data.copy_(on_device)
        if self.accelerator.is_main_process:
            self.skeletons[id(module)] = _empty_parameters(copy.deepcopy(module))
        options = {"mesh": self.mesh, "mp_policy": self.policy, **self.settings}
        for block in blocks:
            fully_shard(block, **options)
        fully_shard(module, **options)

    def is_sharded(self, module) -> bool:
        return id(module) in self.skeletons or any(hasattr(p, "to_local") for p in module.parameters())

    @contextlib.contextmanager
    def gathered(self, modules: list):
        """Plain full copies of ``modules`` (fp32 master weights, on the device) on the main process, None on the
        others; unsharded modules are given as they are. Every process must enter it together."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        main = self.accelerator.is_main_process
        out, filled = [], []
        for module in modules:
            if module is None or not self.is_sharded(module):
                out.append(module)
                continue
            full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not main:
                out.append(None)
                continue
            plain = self.skeletons[id(module)]
            plain.load_state_dict(full, assign=True)
            plain.to(self.device).train(module.training)
            out.append(plain)
            filled.append(plain)
        try:
            yield out
        finally:
            for plain in filled:  # give the memory back until the next time
                _empty_parameters(plain)

    def remap(self, groups: list[dict], before: dict[int, str], modules: dict[str, torch.nn.Module]) -> list[dict]:
        """Parameter groups built before sharding, pointed at the sharded parameters (sharding replaces each
        parameter by a new one); ``before``: id(old parameter) -> "module.name"."""
        after = {f"{m}.{n}": p for m, module in modules.items() for n, p in module.named_parameters()}
        return [{**g, "params": [after[before[id(p)]] if id(p) in before else p for p in g["params"]]}
                for g in groups]


# ----------------------------------------------------------------------------------------------
# Checkpoints: the trained modules, the optimizer and the EMA by parameter name
# ----------------------------------------------------------------------------------------------

class TrainingState:
    """What a sharded checkpoint holds of a run, whether this run shards or not: the trained ``modules`` (by
    name), the ``optimizer`` over them and the ``ema`` of ``ema_params`` (diffusers' EMAModel; its settings are
    checkpointed beside, as JSON)."""

    def __init__(self, modules: dict, optimizer, ema=None, ema_params: list | None = None):
        self.container = torch.nn.ModuleDict(modules)
        self.optimizer, self.ema = optimizer, ema
        names = {id(p): n for n, p in self.container.named_parameters()}
        self.ema_names = [names[id(p)] for p in (ema_params or [])]

    def _state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.container, self.optimizer)
        tensors: dict = {f"model.{k}": v for k, v in model.items()}
        skeleton = {"optimizer": split_state(optim, tensors, "optim", copy=False)}
        if self.ema is not None:
            tensors.update({f"ema.{n}": s for n, s in zip(self.ema_names, self.ema.shadow_params)})
        return tensors, skeleton

    def save(self, folder: Path, is_main: bool) -> None:
        """Every process writes its shards into ``folder``; the main process also writes the JSON part."""
        import torch.distributed.checkpoint as dcp

        tensors, skeleton = self._state()
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
        if is_main:
            (folder / "state.json").write_text(json.dumps(skeleton))

    def load(self, folder: Path) -> None:
        """Read the checkpoint in ``folder`` into this run's modules, optimizer and EMA, resharded to however
        this run holds them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tensors, _ = self._state()
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
        skeleton = json.loads((folder / "state.json").read_text())
        model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        set_state_dict(self.container, self.optimizer, model_state_dict=model,
                       optim_state_dict=join_state(skeleton["optimizer"], tensors))
        # the EMA's shadows were read in place


class EMASettings:
    """An EMA's state without its shadow weights (those go into the sharded checkpoint by parameter name)."""

    def __init__(self, ema):
        self.ema = ema

    def state_dict(self) -> dict:
        return {k: v for k, v in self.ema.state_dict().items() if k not in ("shadow_params", "collected_params")}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
