"""Metrics: progress on rank 0 and `<output_dir>/metrics.jsonl`, one JSON line per logged step.

Progress is a tqdm bar on a terminal; elsewhere (a Slurm log, a file) a plain line about every
twentieth of the run, since a bar's carriage-return updates make a log file unreadable.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from . import disk_full


def bars_only_on_a_terminal() -> None:
    """Off a terminal the libraries' own progress bars (transformers' "Loading weights", ...) stay off too."""
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


class MetricsLog:
    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        enabled: bool,
        first_step: int = 0,
        on_record: Callable[[dict], None] | None = None,
    ):
        self.enabled, self.on_record = enabled, on_record
        self.path = Path(output_dir) / "metrics.jsonl"
        self.records: list[dict] = []
        if enabled:
            self._keep_up_to(first_step)
        self.total_steps = total_steps
        self.interactive = sys.stderr.isatty()
        self.line_every = max(1, total_steps // 20)
        self.bar = tqdm(
            total=total_steps,
            initial=first_step,
            desc="train",
            unit="step",
            disable=not (enabled and self.interactive),
            dynamic_ncols=True,
        )
        self._started = time.perf_counter()

    def _keep_up_to(self, step: int) -> None:
        """A fresh run starts an empty log; a resumed one keeps the lines up to its checkpoint's step."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if step and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, **record) -> None:
        if not self.enabled:
            return
        record["elapsed_s"] = round(time.perf_counter() - self._started, 3)
        record["unix_time"] = round(time.time(), 3)
        self.records.append(record)
        line = json.dumps(record) + "\n"
        with disk_full.writing(self.path, "metrics record", len(line)), self.path.open("a") as f:
            f.write(line)
        if self.on_record is not None:  # the experiment trackers
            self.on_record(record)
        shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}
        if record.get("grad_norm") is not None:
            shown["grad_norm"] = f"{record['grad_norm']:.3f}"
        for key, name in (("rewards/accuracies", "acc"), ("rewards/margins", "margin"), ("eval_loss", "eval_loss")):
            if key in record:
                shown[name] = f"{record[key]:.4f}"
        if self.interactive:
            self.bar.set_postfix(shown)
        elif record["step"] % self.line_every == 0 or record["step"] == self.total_steps or "eval_loss" in record:
            values = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {record['step']}/{self.total_steps} {values} elapsed {record['elapsed_s']:.0f}s", flush=True)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
