"""benchmarks/quality.py as typed: options may come between the config overrides."""

import pytest

from benchmarks.quality import main


def test_options_between_the_overrides_are_taken():
    with pytest.raises(SystemExit, match="nope.yaml does not exist"):
        main(["train.epochs=3", "--config", "nope.yaml", "--seeds", "1", "train.batch_size=4"])
