"""Per-class numbers against a hand-computed example, and the examples kept for the galleries."""

import csv

import pytest
import torch

from fmnist_lightning.reports.classification import (
    ClassificationReportMetric,
    ExampleCollector,
    confusion_rows,
    markdown_table,
    report_rows,
    write_csv,
)

# Three classes, six images: true labels and predictions, and what they give by hand.
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
PREDICTED = torch.tensor([0, 0, 1, 1, 2, 2])
CONFUSION = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
PRECISION = [2 / 2, 1 / 2, 1 / 2]
RECALL = [2 / 3, 1 / 2, 1 / 1]
F1 = [0.8, 0.5, 2 / 3]
NAMES = ["cat", "dog", "owl"]


def computed_report():
    metric = ClassificationReportMetric(num_classes=3)
    probabilities = torch.nn.functional.one_hot(PREDICTED, 3).float() * 0.7 + 0.1
    metric.update(probabilities[:4], LABELS[:4])  # two batches: the numbers accumulate
    metric.update(probabilities[4:], LABELS[4:])
    return metric.compute()


def test_confusion_matrix_and_per_class_scores_match_the_hand_computation():
    report = computed_report()
    assert report.confusion.tolist() == CONFUSION
    assert report.support.tolist() == [3, 2, 1]
    assert report.per_class["precision"].tolist() == pytest.approx(PRECISION)
    assert report.per_class["recall"].tolist() == pytest.approx(RECALL)
    assert report.per_class["f1"].tolist() == pytest.approx(F1)
    assert report.averages["macro"] == pytest.approx(
        {"precision": 2 / 3, "recall": (2 / 3 + 1 / 2 + 1) / 3, "f1": (0.8 + 0.5 + 2 / 3) / 3}
    )
    assert report.averages["micro"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6})


def test_report_rows_csv_and_markdown(tmp_path):
    rows = report_rows(computed_report(), class_names=NAMES)
    assert rows[0] == ["class", "precision", "recall", "f1", "support"]
    assert rows[1] == ["cat", "1.0000", "0.6667", "0.8000", "3"]
    assert rows[-2] == ["macro average", "0.6667", "0.7222", "0.6556", "6"]
    assert rows[-1] == ["micro average", "0.6667", "0.6667", "0.6667", "6"]
    write_csv(rows, tmp_path / "report.csv")
    with open(tmp_path / "report.csv", newline="") as file:
        assert list(csv.reader(file)) == rows
    table = markdown_table(rows).splitlines()
    assert table[0] == "| class | precision | recall | f1 | support |"
    assert table[1] == "|---|---:|---:|---:|---:|"
    assert table[2] == "| cat | 1.0000 | 0.6667 | 0.8000 | 3 |"


def test_confusion_rows_in_counts_and_normalised_by_true_class():
    confusion = torch.tensor(CONFUSION)
    assert confusion_rows(confusion, class_names=NAMES) == [
        ["true \\ predicted", "cat", "dog", "owl"],
        ["cat", "2", "1", "0"],
        ["dog", "0", "1", "1"],
        ["owl", "0", "0", "1"],
    ]
    assert confusion_rows(confusion, normalize=True, class_names=NAMES)[1:] == [
        ["cat", "0.6667", "0.3333", "0.0000"],
        ["dog", "0.0000", "0.5000", "0.5000"],
        ["owl", "0.0000", "0.0000", "1.0000"],
    ]


def test_collector_keeps_the_most_confident_mistakes_across_batches_and_the_first_samples():
    collector = ExampleCollector(gallery_size=2, sample_size=3)
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 28, 28)
    # batch 1: image 0 right; images 1, 2 wrong with confidence 0.6 and 0.9; image 3 wrong, 0.7
    probabilities = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.1, 0.9], [0.3, 0.7]])
    collector.update(images, torch.tensor([0, 0, 0, 0]), probabilities)
    # batch 2: one more mistake, more confident than all: 0.95
    collector.update(images[:1] + 10, torch.tensor([0]), torch.tensor([[0.05, 0.95]]))

    mistakes = collector.mistakes
    assert mistakes.confidence.tolist() == pytest.approx([0.95, 0.9])
    assert [int(image[0, 0, 0]) for image in mistakes.images] == [10, 2]
    assert mistakes.labels.tolist() == [0, 0]
    assert mistakes.predicted.tolist() == [1, 1]
    assert [int(image[0, 0, 0]) for image in collector.samples.images] == [0, 1, 2]
    assert collector.samples.predicted.tolist() == [0, 1, 1]
