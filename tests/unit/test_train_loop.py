"""The loop's decisions after each step, and the learning-rate schedule: pure functions of step and config."""

import math

import pytest

from launcher.config import CheckpointConfig, TrainConfig
from launcher.train import after_step, lr_lambda


def actions(total, has_eval=False, checkpoint_every=0, **train):
    cfg, checkpoint = TrainConfig(**train), CheckpointConfig(every_steps=checkpoint_every)
    return [after_step(done, total, cfg, checkpoint, has_eval) for done in range(1, total + 1)]


def steps_where(plan, what: str) -> list[int]:
    return [done for done, a in enumerate(plan, start=1) if getattr(a, what)]


def test_logs_every_interval_and_the_last_step():
    plan = actions(10, log_interval=4)
    assert steps_where(plan, "log") == [4, 8, 10]
    assert steps_where(actions(3), "log") == [1, 2, 3]


def test_evaluates_on_its_interval_and_at_the_end_only_with_eval_data_and_always_logs_then():
    plan = actions(10, has_eval=True, eval_every_steps=3, log_interval=5)
    assert steps_where(plan, "evaluate") == [3, 6, 9, 10]
    assert steps_where(plan, "log") == [3, 5, 6, 9, 10]
    assert steps_where(actions(10, has_eval=True), "evaluate") == [10]
    assert steps_where(actions(10, has_eval=False, eval_every_steps=3), "evaluate") == []


def test_checkpoints_on_schedule_and_at_the_end_and_polls_for_a_stop_before_the_last_step():
    plan = actions(7, checkpoint_every=3)
    assert steps_where(plan, "checkpoint") == [3, 6, 7]
    assert steps_where(actions(7), "checkpoint") == [7]
    assert steps_where(plan, "poll_stop") == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_schedule_warms_up_then_decays_to_its_end(schedule):
    factor = lr_lambda(TrainConfig(lr_schedule=schedule, warmup_steps=4), total_steps=20)
    assert [factor(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert factor(4) == 1.0
    end = {"cosine": 0.0, "linear": 0.0, "constant": 1.0}[schedule]
    assert math.isclose(factor(20), end, abs_tol=1e-12)
    if schedule == "cosine":
        assert math.isclose(factor(12), 0.5)
