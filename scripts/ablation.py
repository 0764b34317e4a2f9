"""Base, each improvement alone, and the improved recipe, 3 seeds each: a table and a figure.

Usage: .venv/bin/python scripts/ablation.py [--seeds 0 1 2] [--recipes ...] [--out runs/ablation]
(see --help); the logic lives in fmnist_lightning/ablation.py.
"""

from fmnist_lightning.ablation import main

if __name__ == "__main__":
    main()
