"""Speed and memory of this project's fit against a hand-written loop and a typical Lightning port.

Usage: .venv/bin/python scripts/benchmark.py [--epochs 4] [--precision 32-true|bf16-mixed] [--json out.json]
(see --help); the logic lives in fmnist_lightning/benchmark.py.
"""

from fmnist_lightning.benchmark import main

if __name__ == "__main__":
    main()
