"""The diffusion math: Gaussian diffusion's schedules, forward and reverse processes and losses, the densities of
training timesteps, and the registry of diffusers schedulers. Holds no network and imports nothing else of the
project."""
