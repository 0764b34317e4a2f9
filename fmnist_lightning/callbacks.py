"""0.1.0's place of the report callbacks: run folders' config.yaml name `fmnist_lightning.callbacks.CurvePlots`
and `.TestReport`."""

from fmnist_lightning.reports.callbacks import CurvePlots, TestReport

__all__ = ["CurvePlots", "TestReport"]
