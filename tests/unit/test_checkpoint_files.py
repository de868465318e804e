"""Checkpoint files are read as data, never as code."""

import random

import numpy as np
import pytest
import torch


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file if ever unpickled


def test_a_planted_pickle_in_a_checkpoint_is_refused_without_running(tmp_path):
    from launcher import checkpoint
    from launcher.config import ConfigError

    step = tmp_path / "step-000002"
    (step / "rng").mkdir(parents=True)
    torch.save(checkpoint.rng_state(), step / "rng" / "rank-00000.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    marker = tmp_path / "ran"
    torch.save({"last_epoch": 2, "payload": _RunsCode(marker)}, step / "scheduler.pt")

    class Strategy:
        def load_trainable(self, *args):
            raise AssertionError("the trainable state was read before the checkpoint's pickles were checked")

    with pytest.raises(
        ConfigError, match=r"scheduler.pt` holds objects no qlaunch checkpoint holds \(it names `.*open"
    ):
        checkpoint.load(step, Strategy(), None, None, None)
    assert not marker.exists()
    # What qlaunch writes loads: the RNG state (with its numpy array) restores the exact streams.
    checkpoint.restore_rng_state(checkpoint.load_plain(step / "rng" / "rank-00000.pt"))
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
