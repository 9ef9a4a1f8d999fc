"""Training timesteps: how often each t of the schedule is trained on."""

from __future__ import annotations

import torch



def sample_timesteps(n: int, num_timesteps: int, sampling: str, gen: torch.Generator, mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """(n,) training timesteps in [0, T): uniform (DDPM), or logit-normal t/T = σ(N(mean, std²)) (Esser et al.
    2024, §3.1), which spends more of training on the middle of the schedule."""
    if sampling == "uniform":
        return torch.randint(0, num_timesteps, (n,), generator=gen)
    if sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, generator=gen))
        return (u * num_timesteps).long().clamp(max=num_timesteps - 1)
    raise ValueError(f"diffusion.timestep_sampling={sampling!r} is not one of ['uniform', 'logit_normal', 'importance']")


class ImportanceSampler:
    """Improved DDPM's importance sampling of timesteps (§3.3): p_t ∝ sqrt(E[L_t²]) over the last ``history``
    losses seen at each t, mixed with ``uniform`` of the uniform density; uniform until every t has a full
    history. ``sample`` returns t and the weights 1 / (T p_t) that keep the loss an unbiased estimate of the
    uniform-t loss. The history is a state_dict of tensors, checkpointed with the run, so a resumed run draws
    the same timesteps."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform: float = 0.001):
        self.T, self.history, self.uniform = num_timesteps, history, uniform
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probs(self) -> torch.Tensor:
        if int(self.counts.min()) < self.history:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.losses.pow(2).mean(1).sqrt()
        return w / w.sum() * (1 - self.uniform) + self.uniform / self.T

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs()
        t = torch.multinomial(p, n, replacement=True, generator=gen)
        return t, (1.0 / (self.T * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) loss of each sample at its timestep; the oldest of a full history drops."""
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[step] == self.history:
                self.losses[step, :-1] = self.losses[step, 1:].clone()
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"]), self.counts.copy_(state["counts"])
