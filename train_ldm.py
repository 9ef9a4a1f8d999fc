"""Train a text-to-image latent diffusion model: `accelerate launch train_ldm.py --config configs/ldm/<preset>.yaml [key=value ...]`."""

from ldm.trainer.train import main

if __name__ == "__main__":
    main()
