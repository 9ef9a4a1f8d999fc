"""Train a KL autoencoder: `accelerate launch train_autoencoder.py --config configs/autoencoder/<preset>.yaml [key=value ...]`."""

from ldm.cli import autoencoder_main

if __name__ == "__main__":
    autoencoder_main()
