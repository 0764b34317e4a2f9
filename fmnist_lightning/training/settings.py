"""What each model and data setting is, in one table that every decision reads: which settings a resume must
match, which follow the command line over a checkpoint's, which decide the validation split, which define the
model, which are file paths (data to the checkpoint allow-list, never code), and which belong to one
architecture. `tests/test_settings.py` fails when an argument of the model or the DataModule is missing here.
"""

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    SPEED = "speed-only"  # changes no number: the command line's value stands, also over a checkpoint's
    LOCATION = "location"  # where the files are: free to differ between runs
    PREDICTION = "prediction"  # what `predict` reads and how; no part of training
    EVALUATION = "evaluation"  # how test and predict score; never saved
    SPLIT = "split"  # which training images are held out: validate and calibrate must use the run's
    MODEL = "model-defining"  # the trained network and its outputs: a checkpoint's value wins over a given one
    RUN = "run"  # how the run trains (optimizer, loss, schedule, batches, augmentation): a resume must match


@dataclass(frozen=True)
class Setting:
    kind: Kind
    path: bool = False  # its value is a file path, never an import path
    only_for: str | None = None  # the one model.architecture it applies to
    augmentation: bool = False  # a training augmentation (the demo's recipe line names them together)


MODEL_SETTINGS = {
    "optimizer": Setting(Kind.RUN),
    "architecture": Setting(Kind.MODEL),
    "normalize": Setting(Kind.MODEL),
    "batch_norm": Setting(Kind.MODEL, only_for="original"),
    "dropout": Setting(Kind.MODEL, only_for="original"),
    "label_smoothing": Setting(Kind.RUN),
    "lr_schedule": Setting(Kind.RUN),
    "warmup_epochs": Setting(Kind.RUN),
    "pretrained": Setting(Kind.RUN, path=True, only_for="mobilenet_v2"),
    "pool_before_relu": Setting(Kind.SPEED),
    "channels_last": Setting(Kind.SPEED),
    "compile": Setting(Kind.SPEED),
    "cuda_graph": Setting(Kind.SPEED),
    "tta": Setting(Kind.EVALUATION),
    "temperature": Setting(Kind.MODEL),
    "depth": Setting(Kind.MODEL, only_for="resnet"),
    "width": Setting(Kind.MODEL, only_for="resnet"),
    "teacher": Setting(Kind.RUN, path=True),
    "distill_temperature": Setting(Kind.RUN),
    "distill_weight": Setting(Kind.RUN),
}
# Inside model.optimizer: how torch runs the update, not what it computes.
OPTIMIZER_SPEED_SETTINGS = ("optimizer.init_args.fused", "optimizer.init_args.foreach")

DATA_SETTINGS = {
    "data_dir": Setting(Kind.LOCATION, path=True),
    "batch_size": Setting(Kind.RUN),
    "eval_batch_size": Setting(Kind.SPEED),  # metrics are exact sums whatever the batch
    "val_size": Setting(Kind.SPLIT),
    "split_seed": Setting(Kind.SPLIT),
    "shuffle_seed": Setting(Kind.RUN),
    "system_dir": Setting(Kind.LOCATION, path=True),
    "download": Setting(Kind.LOCATION),
    "data_on_device": Setting(Kind.SPEED),  # batches are augmented on the accelerator either way
    "predict_paths": Setting(Kind.PREDICTION, path=True),
    "invert": Setting(Kind.PREDICTION),
    "num_workers": Setting(Kind.SPEED),
    "translate": Setting(Kind.RUN, augmentation=True),
    "flip": Setting(Kind.RUN, augmentation=True),
    "erase": Setting(Kind.RUN, augmentation=True),
    "rotate": Setting(Kind.RUN, augmentation=True),
    "zoom": Setting(Kind.RUN, augmentation=True),
}

# Trainer settings that decide what a run computes; recorded in its checkpoints (`resume.RunSettings`).
TRAINER_RUN_SETTINGS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "deterministic",
    "devices",
    "num_nodes",
    "max_epochs",
)

# Kinds a resume may change: they change no number of the run.
FREE_KINDS = frozenset({Kind.SPEED, Kind.LOCATION, Kind.PREDICTION, Kind.EVALUATION})


def model_settings(*kinds: Kind) -> tuple[str, ...]:
    """The model settings of these kinds, by name (as in the checkpoint's hyper_parameters)."""
    return tuple(name for name, setting in MODEL_SETTINGS.items() if setting.kind in kinds)


def data_settings(*kinds: Kind) -> tuple[str, ...]:
    """The data settings of these kinds, by name (as in the checkpoint's datamodule_hyper_parameters)."""
    return tuple(name for name, setting in DATA_SETTINGS.items() if setting.kind in kinds)


# With --ckpt_path the command line's speed-only model settings stand; its model-defining ones are named if dropped.
SPEED_MODEL_SETTINGS = (*model_settings(Kind.SPEED), *OPTIMIZER_SPEED_SETTINGS)
MODEL_DEFINING_SETTINGS = model_settings(Kind.MODEL)
# Settings a resume may change, as dotted config keys.
FREE_SETTINGS = frozenset(
    {f"model.{name}" for name in (*model_settings(*FREE_KINDS), *OPTIMIZER_SPEED_SETTINGS)}
    | {f"data.{name}" for name in data_settings(*FREE_KINDS)}
)
# What decides a checkpoint's validation images: validate refuses others; calibrate rebuilds the split from them.
SPLIT_SETTINGS = tuple(f"data.{name}" for name in data_settings(Kind.SPLIT))
# The model settings whose value is a file path, and those of one architecture only.
PATH_MODEL_SETTINGS = frozenset(name for name, setting in MODEL_SETTINGS.items() if setting.path)
ARCHITECTURE_SETTINGS = {name: setting.only_for for name, setting in MODEL_SETTINGS.items() if setting.only_for}
AUGMENTATION_SETTINGS = tuple(name for name, setting in DATA_SETTINGS.items() if setting.augmentation)
