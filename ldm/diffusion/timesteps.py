"""Training timesteps: how often each t of the schedule is trained on.

Every sampler has one interface (as improved-diffusion's ``ScheduleSampler``): ``sample(n, generator) -> (t,
weights)`` draws n timesteps in [0, T) and the per-example loss weights that keep the loss an unbiased estimate
of the uniform-t loss (ones for samplers that mean to change it), and ``update(t, losses)`` shows it the losses
just measured at those timesteps (only a loss-aware sampler keeps them). `TIMESTEP_SAMPLERS` names them for the
config (``diffusion.timestep_sampling``).
"""

from __future__ import annotations

from typing import Callable

import torch


class TimestepSampler:
    """Uniform timesteps t ~ U{0, ..., T-1} (DDPM); the base of the others."""

    checkpointed = False  # whether its state must be saved with the run (a loss history)

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    @classmethod
    def build(cls, num_timesteps: int, mean: float, std: float, gather: Callable | None) -> "TimestepSampler":
        """The sampler from the config's settings (each takes those it uses)."""
        return cls(num_timesteps)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (n,) long, weights (n,) float32)."""
        return torch.randint(0, self.num_timesteps, (n,), generator=generator), torch.ones(n)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the unweighted ``losses`` (n,) seen at ``t`` (n,); a sampler that does not learn ignores them."""


class LogitNormalTimesteps(TimestepSampler):
    """t/T = σ(N(mean, std²)) (Esser et al. 2024, §3.1), which spends more of training on the middle of the schedule
    (mean > 0: on high noise). Weights are ones: the density itself is the point."""

    def __init__(self, num_timesteps: int, mean: float = 0.0, std: float = 1.0):
        super().__init__(num_timesteps)
        self.mean, self.std = mean, std

    @classmethod
    def build(cls, num_timesteps: int, mean: float, std: float, gather: Callable | None) -> "TimestepSampler":
        return cls(num_timesteps, mean, std)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator))
        return (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1), torch.ones(n)


class ImportanceTimesteps(TimestepSampler):
    """Improved DDPM's importance sampling of timesteps (§3.3): p_t ∝ sqrt(E[L_t²]) over the last ``history``
    losses seen at each t, mixed with ``uniform`` of the uniform density; uniform until every t has a full
    history. The weights 1 / (T p_t) keep the loss an unbiased estimate of the uniform-t loss. The history is a
    state_dict of tensors, checkpointed with the run, so a resumed run draws the same timesteps; ``gather``
    (``accelerator.gather``) brings every process's losses to each, so all keep the same history."""

    checkpointed = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform: float = 0.001,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(num_timesteps)
        self.history, self.uniform = history, uniform
        self.gather = gather or (lambda x: x)
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    @classmethod
    def build(cls, num_timesteps: int, mean: float, std: float, gather: Callable | None) -> "TimestepSampler":
        return cls(num_timesteps, gather=gather)

    def probs(self) -> torch.Tensor:
        T = self.num_timesteps
        if int(self.counts.min()) < self.history:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.losses.pow(2).mean(1).sqrt()
        return w / w.sum() * (1 - self.uniform) + self.uniform / T

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs()
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record every process's unweighted loss at its timestep; the oldest of a full history drops."""
        t, losses = self.gather(t), self.gather(losses.detach())
        for step, loss in zip(t.tolist(), losses.double().cpu().tolist()):
            if self.counts[step] == self.history:
                self.losses[step, :-1] = self.losses[step, 1:].clone()
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


TIMESTEP_SAMPLERS = {"uniform": TimestepSampler, "logit_normal": LogitNormalTimesteps,
                     "importance": ImportanceTimesteps}


class TimestepRange:
    """A sampler confined to timesteps [low, high) (kohya-ss's min/max timestep): the inner sampler draws over
    high - low timesteps and its draws are shifted by ``low``; its loss history and weights are those of the
    range."""

    def __init__(self, inner: TimestepSampler, low: int):
        self.inner, self.low = inner, low
        self.checkpointed = inner.checkpointed

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t, weights = self.inner.sample(n, generator)
        return t + self.low, weights

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        self.inner.update(t - self.low, losses)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def make_timestep_sampler(name: str, num_timesteps: int, mean: float = 0.0, std: float = 1.0,
                          gather: Callable[[torch.Tensor], torch.Tensor] | None = None, low: int = 0,
                          high: int | None = None) -> TimestepSampler | TimestepRange:
    """The sampler ``diffusion.timestep_sampling`` names (``mean``/``std``: the logit-normal's settings; ``gather``:
    the importance sampler's, for several processes), over timesteps [low, high) (default: all)."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"diffusion.timestep_sampling={name!r} is not one of {list(TIMESTEP_SAMPLERS)}")
    high = num_timesteps if high is None else high
    if not 0 <= low < high <= num_timesteps:
        raise ValueError(f"the timestep range [{low}, {high}) must lie within [0, {num_timesteps}) and hold a step")
    sampler = TIMESTEP_SAMPLERS[name].build(high - low, mean, std, gather)
    return sampler if (low, high) == (0, num_timesteps) else TimestepRange(sampler, low)
