"""benchmarks/reference_anchor.py: the reference run at another nominal batch, its checkout untouched."""

import pytest

from benchmarks.reference_anchor import with_nominal_batch

SCRIPT = "def train(hyp):\n    nbs = 64  # nominal batch size\n    return nbs\n"


def test_the_copy_runs_the_asked_nominal_batch_and_the_checkout_keeps_its_own(tmp_path):
    checkout = tmp_path / "yolov9"
    (checkout / "utils").mkdir(parents=True)
    (checkout / "train_dual.py").write_text(SCRIPT)
    (checkout / "utils" / "loss.py").write_text("x = 1\n")
    copy = with_nominal_batch(checkout, tmp_path / "copy", 8)
    assert (copy / "train_dual.py").read_text() == SCRIPT.replace("nbs = 64", "nbs = 8")
    assert (copy / "utils" / "loss.py").read_text() == "x = 1\n"
    assert (checkout / "train_dual.py").read_text() == SCRIPT


def test_a_script_that_sets_it_otherwise_is_refused_by_name(tmp_path):
    checkout = tmp_path / "yolov9"
    checkout.mkdir()
    (checkout / "train_dual.py").write_text("nbs = batch_size * 4\n")
    with pytest.raises(SystemExit, match="train_dual.py does not set its nominal batch"):
        with_nominal_batch(checkout, tmp_path / "copy", 8)
