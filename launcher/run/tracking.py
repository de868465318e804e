"""Experiment tracking through Accelerate's trackers (`train.report_to`: tensorboard, wandb, mlflow, ...):
the scalars of metrics.jsonl at every logged step, the run config as hyperparameters, and each rank's
peak memory at the end. metrics.jsonl stays the record; a tracker is a view of it."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, RunConfig, TrainConfig

TRACKER_DIR = "trackers"
"""Under output_dir: where trackers that write files (TensorBoard) write them, as <dir>/<train.project>/."""


def trackers(train: TrainConfig) -> list[str]:
    return [train.report_to] if isinstance(train.report_to, str) and train.report_to else list(train.report_to)


def check(train: TrainConfig) -> None:
    """Unknown or uninstalled trackers are refused before launch, with what to install."""
    if not trackers(train):
        return
    from accelerate.tracking import _available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    available = [str(t.value if hasattr(t, "value") else t) for t in _available_trackers]
    for name in trackers(train):
        if name not in known:
            raise ConfigError(f"`train.report_to` names `{name}`; Accelerate's trackers are {', '.join(known)}.")
        if name not in available:
            package = {"comet_ml": "comet-ml"}.get(name, name)
            raise ConfigError(
                f"`train.report_to` names `{name}`, which is not installed. Install it (pip install {package}) "
                "or remove it from `train.report_to`."
            )


def accelerator_kwargs(train: TrainConfig, output_dir: Path) -> dict:
    if not trackers(train):
        return {}
    return {"log_with": trackers(train), "project_dir": str(Path(output_dir) / TRACKER_DIR)}


def start(accelerator, cfg: RunConfig) -> None:
    if not trackers(cfg.train):
        return
    run_name = cfg.train.run_name or Path(cfg.output_dir).name
    accelerator.init_trackers(
        cfg.train.project,
        config=flat(cfg.to_dict()),
        init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}},
    )


def flat(tree: dict, prefix: str = "") -> dict:
    """`{"train": {"lr": 1e-4}}` as `{"train.lr": 1e-4}`; lists as text (hyperparameters are scalars)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def log_step(accelerator, record: dict) -> None:
    """A metrics.jsonl record's numbers (Accelerate logs on the main process only)."""
    values = {k: v for k, v in record.items() if k not in ("step", "unix_time") and isinstance(v, (int, float))}
    accelerator.log(values, step=record["step"])


def log_memory(accelerator, ranks: list[dict], step: int) -> None:
    """Each rank's peak host (and device) memory, from the shard report."""
    values = {}
    for report in ranks:
        values[f"memory/rank{report['rank']}/peak_host_rss_mib"] = report["peak_host_rss_bytes"] / 2**20
        if report["peak_device_bytes"] is not None:
            values[f"memory/rank{report['rank']}/peak_device_mib"] = report["peak_device_bytes"] / 2**20
    accelerator.log(values, step=step)
