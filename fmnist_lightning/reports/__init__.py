"""Metrics and pictures: the test report, calibration, curves from CSV logs, and the figures they draw."""
