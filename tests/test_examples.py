"""examples/transfer.py: user code that fine-tunes a trained encoder and a random-init one on a
few labels; run at the runlocal scale (its numbers there say nothing about the method)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import transfer  # noqa: E402


@pytest.mark.slow
def test_transfer_example_fine_tunes_both_and_prints_their_accuracy(digits_run, capsys):
    results = transfer.main([f"--workdir={digits_run}", "--steps=60", "--labels_per_class=5"])
    assert set(results) == {"trained encoder", "random init"}
    assert all(0.3 < acc <= 1.0 for acc in results.values())  # 50 labels, 10 classes: chance is 0.1
    out = capsys.readouterr().out
    assert ("fine-tuned on 50 labelled digits images (5 per class), 60 steps; top-1 on test (360 images):"
            in out)
    assert f"trained encoder  {100 * results['trained encoder']:6.2f}%" in out


def test_labelled_subset_is_per_class_and_seeded():
    labels = np.repeat(np.arange(4), 20)
    a, b = transfer.labelled_subset(labels, 3, 0), transfer.labelled_subset(labels, 3, 1)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3] and len(set(a)) == 12
    assert not np.array_equal(a, b)
