"""metrics.jsonl, the progress a batch job's log gets, and the experiment trackers' checks."""

import json

import pytest

from launcher.run.metrics import MetricsLog


def test_a_log_file_gets_a_few_dozen_plain_lines_and_every_step_in_metrics_jsonl(tmp_path, capsys):
    log = MetricsLog(tmp_path, total_steps=500, enabled=True)  # under pytest stderr is no terminal, as under Slurm
    for step in range(1, 501):
        log.advance()
        evaluated = {"eval_loss": 2.0} if step == 250 else {}
        log.log(step=step, loss=3.0, lr=1e-4, tokens=64, tokens_per_s=100.0, **evaluated)
    log.close()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "\r" not in out + err and len(lines) == 20
    assert lines[-1].startswith("step 500/500 loss 3.0000") and "eval_loss 2.0000" in lines[9]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 500 and records[249]["eval_loss"] == 2.0 and "eval_loss" not in records[0]


@pytest.mark.parametrize(
    "report_to,message",
    [
        ("tensorbored", r"`train.report_to` names `tensorbored`; Accelerate's trackers are .*tensorboard"),
        (["tensorboard", "aim"], r"names `aim`, which is not installed. Install it \(pip install aim\)"),
    ],
)
def test_unknown_or_missing_trackers_are_refused_before_launch(report_to, message):
    from launcher.config import ConfigError, load_config
    from launcher.run import tracking

    with pytest.raises(ConfigError, match=message):
        tracking.check(load_config(None, [("train.report_to", report_to)]).train)


def test_the_run_config_becomes_flat_hyperparameters():
    from launcher.config import RunConfig
    from launcher.run.tracking import flat

    values = flat(RunConfig().to_dict())
    assert values["train.lr"] == 2e-4 and values["lora.target_modules"] == "all-linear"
    assert values["data.datasets"] == "[]" and all(isinstance(v, (int, float, str, bool)) for v in values.values())
