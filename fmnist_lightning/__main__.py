"""`python -m fmnist_lightning` is the `fmnist` command."""

from fmnist_lightning.cli import main

if __name__ == "__main__":
    main()
