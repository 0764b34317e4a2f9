"""Test accuracy against wall seconds: the original Keras script, the base recipe and the speed run on the same
axes (docs/time_to_accuracy.png), and the seconds each takes to reach 0.90, 0.92 and 0.93.

    .venv/bin/python scripts/time_to_accuracy.py --recipes base speedrun --out docs/time_to_accuracy.png

Each command runs once, alone, as a whole process (`scripts/benchmark.py --whole-command --test-each-epoch`):
after every epoch it also scores the official test set, and the seconds it spends doing so are left out of its
clock, so each point is the wall time since launch at which the command had a model that accurate. The extra
test passes only measure: they change nothing training reads. The last point of each curve is the whole
command's end, with the test accuracy it printed.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import benchmark

LEVELS = (0.90, 0.92, 0.93)
LABELS = {"keras": "original Keras script", "base": "fmnist, configs/base.yaml"}


def seconds_to(curve: list[dict[str, float]], level: float) -> float | None:
    """The first time the curve reaches `level`; None if it never does."""
    return next((point["seconds"] for point in curve if point["test_acc"] >= level), None)


def curve_figure(runs: dict[str, dict[str, Any]]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    for name, run in runs.items():
        points = [*run["curve"], {"seconds": run["wall_seconds"], "test_acc": run["test_acc"]}]
        axes.plot(
            [point["seconds"] for point in points],
            [point["test_acc"] for point in points],
            marker="o",
            markersize=3,
            label=f"{LABELS.get(name, f'fmnist, + configs/{name}.yaml')} ({run['wall_seconds']:.0f} s)",
        )
    for level in LEVELS:
        axes.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    axes.set_xlabel("wall seconds since the command started (its extra test passes left out)")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0.80, 0.95)
    axes.set_title("Time to accuracy on this machine's CPU")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return figure


def report(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| command | whole command s | test accuracy | " + " | ".join(f"s to {level}" for level in LEVELS) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(LEVELS))
    for name, run in runs.items():
        reached = [seconds_to(run["curve"], level) for level in LEVELS]
        cells = " | ".join("-" if seconds is None else f"{seconds:.1f}" for seconds in reached)
        lines.append(f"| {name} | {run['wall_seconds']:.1f} | {run['test_acc']:.4f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["base", "speedrun"], help="as in benchmark.py")
    parser.add_argument("--data-dir", default=benchmark.DEFAULT_DATA_DIR)
    parser.add_argument("--keras-python", default=".venv-keras/bin/python", help="a Python with tensorflow-cpu")
    parser.add_argument("--out", default="time_to_accuracy.png", help="the picture (.png or .svg)")
    parser.add_argument("--json", help="also write the curves to this JSON file")
    options = parser.parse_args(argv)
    flags = ["--whole-command", "--test-each-epoch", "--pairs", "1", "--data-dir", options.data_dir]
    flags += ["--keras-python", options.keras_python, "--recipes", *options.recipes]
    runs = {
        name: results[0] for name, results in benchmark.run_whole_commands(benchmark.parse_args(flags))["0"].items()
    }
    print(report(runs))
    curve_figure(runs).savefig(options.out)
    print(f"picture: {options.out}")
    if options.json:
        Path(options.json).write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
