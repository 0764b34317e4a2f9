"""What each improvement is worth: train base, each improvement alone, and the improved recipe, several seeds.

Usage: .venv/bin/python scripts/ablation.py [--seeds 0 1 2] [--recipes ...] [--out runs/ablation] (see --help).

Every run goes through the CLI (`fmnist fit ... --test_after_fit true`) in a process of its own; the
test score comes from the run's metrics.csv. The summary (mean and standard deviation over seeds of
test accuracy and loss, epochs, wall time, parameters) is written as Markdown and CSV, and the
validation curves of the first seed of every recipe are overlaid in one figure.
"""

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fmnist_lightning.module import FashionMNISTClassifier
from fmnist_lightning.reports.classification import markdown_table
from fmnist_lightning.reports.metrics_log import read_run
from fmnist_lightning.reports.plots import curve_figure, save_figure

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LONGER = ["--trainer.max_epochs=30"]  # each improvement alone trains as long as the improved recipe
RECIPES: dict[str, list[str]] = {
    "base (the original, 10 epochs)": [],
    "base, 30 epochs": LONGER,
    "+ augmentation (shifts)": [*LONGER, "--data.translate=1"],
    "+ dropout (dense layer)": [*LONGER, "--model.dropout=[0.0, 0.0, 0.0, 0.2]"],
    "+ batch norm": [*LONGER, "--model.batch_norm=true"],
    "+ AdamW, one-cycle": [
        *LONGER,
        "--model.optimizer.class_path=torch.optim.AdamW",
        "--model.optimizer.init_args.lr=0.005",
        "--model.optimizer.init_args.weight_decay=0.01",
        "--model.lr_schedule=onecycle",
    ],
    "+ label smoothing": [*LONGER, "--model.label_smoothing=0.05"],
    "+ rotation (up to 10°)": [*LONGER, "--data.rotate=10"],
    "+ zoom (up to 10%)": [*LONGER, "--data.zoom=0.1"],
    "improved (configs/improved.yaml)": ["--config", str(CONFIGS / "improved.yaml")],
    # The second round: hours on a 2-core CPU, so run only when named with --recipes.
    "strong (configs/strong.yaml)": ["--config", str(CONFIGS / "strong.yaml")],
    "student without a teacher (configs/distill.yaml)": ["--config", str(CONFIGS / "distill.yaml")],
    "distilled (configs/distill.yaml + --teacher)": ["--config", str(CONFIGS / "distill.yaml")],
    "distilled on all 60,000 images (last epoch)": ["--config", str(CONFIGS / "distill.yaml"), "--data.val_size=0"],
    "distilled, the teacher's augmentation (shifts of 2, flips, erasing)": [
        "--config",
        str(CONFIGS / "distill.yaml"),
        "--data.translate=2",
        "--data.flip=true",
        "--data.erase=0.25",
    ],
}
FIRST_ROUND = list(RECIPES)[: list(RECIPES).index("improved (configs/improved.yaml)") + 1]
TAUGHT = {recipe for recipe in RECIPES if recipe.startswith("distilled")}  # these also get --model.teacher
COLUMNS = ["recipe", "seeds", "test accuracy", "± sd", "test loss", "± sd", "epochs", "minutes per run", "parameters"]


def slug(recipe: str) -> str:
    return re.sub("-+", "-", "".join(c if c.isalnum() else "-" for c in recipe.lower())).strip("-")


def threads_per_job(jobs: int) -> int:
    """The CPU cores shared out between runs going at the same time."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_recipe(recipe: str, seed: int, options: argparse.Namespace) -> dict:
    """One fit + test through the CLI; its test score, epochs, wall time and parameter count."""
    version = f"seed{seed}"
    command = [
        sys.executable, "-m", "fmnist_lightning", "fit",
        "--config", str(CONFIGS / "base.yaml"), *RECIPES[recipe], *options.extra,
        *(["--model.teacher", options.teacher] if recipe in TAUGHT else []),
        "--seed_everything", str(seed),
        "--data.data_dir", options.data_dir,
        "--trainer.logger.init_args.save_dir", str(options.out),
        "--trainer.logger.init_args.name", slug(recipe),
        "--trainer.logger.init_args.version", version,
        "--trainer.enable_progress_bar=false", "--test_after_fit=true",
    ]  # fmt: skip
    run_dir = options.out / slug(recipe) / version
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not the continuation of an earlier one
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads_per_job(options.jobs))}
    print(f"ablation: {recipe}, seed {seed} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{recipe}, seed {seed} failed:\n{result.stderr[-3000:]}")
    metrics = read_run(run_dir / "metrics.csv", name=recipe)
    model, _ = FashionMNISTClassifier.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return {
        "run_dir": run_dir,
        "metrics": metrics,
        "test_acc": metrics.final["test_acc"],
        "test_loss": metrics.final["test_loss"],
        "epochs": 1 + max(metrics.series("train_acc")[0]),
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.network.parameters()),
    }


def summary_row(recipe: str, runs: list[dict]) -> list[str]:
    accuracies, losses = [run["test_acc"] for run in runs], [run["test_loss"] for run in runs]

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return [
        recipe,
        str(len(runs)),
        f"{statistics.mean(accuracies):.4f}",
        f"{spread(accuracies):.4f}",
        f"{statistics.mean(losses):.4f}",
        f"{spread(losses):.4f}",
        str(runs[0]["epochs"]),
        f"{statistics.mean(run['seconds'] for run in runs) / 60:.1f}",
        f"{runs[0]['parameters']:,}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--recipes", nargs="+", choices=list(RECIPES), default=FIRST_ROUND, help="default: all but the second round"
    )
    parser.add_argument("--teacher", help="the checkpoint the distilled recipe learns from, e.g. a strong run's")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=Path("runs") / "ablation")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, the CPU cores shared out between them (default 1)"
    )
    parser.add_argument(
        "extra", nargs="*", help="more CLI overrides for every run, after --, e.g. -- --trainer.max_epochs=2"
    )
    options = parser.parse_args(argv)
    if TAUGHT.intersection(options.recipes) and not options.teacher:
        parser.error("the distilled recipe needs --teacher CKPT, e.g. the best checkpoint of a strong run")
    start = time.perf_counter()
    jobs = [(recipe, seed) for recipe in options.recipes for seed in options.seeds]
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        finished = list(pool.map(lambda job: run_recipe(*job, options), jobs))
    results: dict[str, list[dict]] = {}
    for (recipe, _), run in zip(jobs, finished, strict=True):
        results.setdefault(recipe, []).append(run)
    rows = [COLUMNS] + [summary_row(recipe, runs) for recipe, runs in results.items()]
    options.out.mkdir(parents=True, exist_ok=True)
    with open(options.out / "ablation.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    total_minutes = (time.perf_counter() - start) / 60
    table = markdown_table(rows)
    threads = threads_per_job(options.jobs)
    overrides = f"Every run also had: `{' '.join(options.extra)}`.\n\n" if options.extra else ""
    (options.out / "ablation.md").write_text(
        f"{table}\n\n{overrides}Total running time: {total_minutes:.0f} minutes, {options.jobs} run(s) at a time "
        f"with {threads} thread(s) each, on {os.cpu_count()} CPU cores.\n"
    )
    figure = curve_figure([runs[0]["metrics"] for runs in results.values()], "acc", stages=("val",))
    figure.axes[0].set_title(f"Validation accuracy per epoch, seed {options.seeds[0]} of each recipe")
    save_figure(figure, options.out / "ablation_val_accuracy.png")
    print(table)
    print(
        f"\nwritten: {options.out / 'ablation.md'}, {options.out / 'ablation.csv'}, "
        f"{options.out / 'ablation_val_accuracy.png'} ({total_minutes:.0f} minutes)"
    )


if __name__ == "__main__":
    main()
