"""`fmnist lr_find --config CONFIG`: Lightning's learning-rate finder on the configured model, data and optimizer."""

import argparse
import math

from lightning.pytorch.tuner import Tuner

from fmnist_lightning.commands.lightning import lightning_command
from fmnist_lightning.errors import UserError
from fmnist_lightning.training.run_folders import TakeBackRunFolders, run_folder


def lr_find_command(args: list[str]) -> None:
    """`fmnist lr_find --config CONFIG [--min_lr --max_lr --num_training]`: Lightning's learning-rate finder for
    the configured model, data and optimizer; the plot goes to a run folder, the suggestion is printed."""
    options = argparse.ArgumentParser(
        prog="fmnist lr_find", description=lr_find_command.__doc__, add_help=False, exit_on_error=False
    )
    options.add_argument("--min_lr", type=float, default=1e-6)
    options.add_argument("--max_lr", type=float, default=1.0)
    options.add_argument("--num_training", type=int, default=100, help="training steps the search takes")
    finder_settings, rest = options.parse_known_args(args)
    check_finder_range(finder_settings.min_lr, finder_settings.max_lr, finder_settings.num_training)
    cli = lightning_command(rest, run=False)
    take_back = next(callback for callback in cli.trainer.callbacks if isinstance(callback, TakeBackRunFolders))
    try:
        finder = Tuner(cli.trainer).lr_find(
            cli.model, datamodule=cli.datamodule, update_attr=False, **vars(finder_settings)
        )  # the optimizer's learning rate is swept by Lightning's own schedule; the model keeps its setting
        suggestion = finder.suggestion() if finder is not None else None
        if suggestion is None:
            raise UserError(
                "the learning-rate finder found no clear minimum (the loss blew up early, or too few steps "
                "were left); try a lower --max_lr or more --num_training steps"
            )
        import matplotlib.pyplot as plt  # only now: the other commands never pay for matplotlib's import

        from fmnist_lightning.reports.plots import save_figure

        folder = run_folder(cli.trainer)
        figure = finder.plot(suggest=True)  # Lightning draws it with pyplot
        save_figure(figure, folder / "lr_find.png")
        plt.close(figure)
    except BaseException:  # nothing left behind: the run folder and its config.yaml go too
        take_back.take_back()
        raise
    print(f"lr_find plot:     {folder / 'lr_find.png'}")
    print(f"suggested lr:     {suggestion:.3g} (set it as model.optimizer.init_args.lr)")


# Lightning's suggestion leaves out the first 10 losses and the last one, and needs two to take a slope.
FINDER_MIN_STEPS = 13


def check_finder_range(min_lr: float, max_lr: float, num_training: int) -> None:
    """Refuse a search range the finder cannot sweep before anything runs."""
    if not 0 < min_lr < max_lr or not math.isfinite(max_lr):
        raise UserError(
            f"lr_find sweeps from --min_lr up to --max_lr, both positive: got {min_lr:g} and {max_lr:g}; "
            "give for example --min_lr 1e-6 --max_lr 1"
        )
    if num_training < FINDER_MIN_STEPS:
        raise UserError(
            f"--num_training {num_training} is too few steps for a suggestion; give at least {FINDER_MIN_STEPS} "
            "(the default is 100)"
        )
