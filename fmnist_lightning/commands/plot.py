"""`fmnist plot RUN [RUN ...]`: accuracy and loss curves from CSV logs, one run or several compared."""

from jsonargparse import ArgumentParser

from fmnist_lightning.reports.curves import FORMATS, draw_curves


def plot_command(args: list[str]) -> None:
    """`fmnist plot RUN [RUN ...]`: accuracy and loss curves from CSV logs."""
    parser = ArgumentParser(prog="fmnist plot", description=plot_command.__doc__, exit_on_error=False)
    parser.add_argument("runs", nargs="+", help="run folders, metrics.csv files, or folders holding runs")
    parser.add_argument("--out", help="folder for the images (default: the run's folder, or the runs' parent)")
    parser.add_argument("--format", nargs="+", default=["png"], help=f"one or more of {', '.join(FORMATS)}")
    config = parser.parse_args(args)
    for path in draw_curves(config.runs, config.out, config.format):
        print(f"curves:           {path}")
