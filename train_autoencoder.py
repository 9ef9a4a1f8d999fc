"""Train a KL autoencoder: `accelerate launch train_autoencoder.py --config configs/autoencoder/<preset>.yaml [key=value ...]`."""

from autoencoder.train import main

if __name__ == "__main__":
    main()
