"""The README's first command: the embedded default trains for real on 2 CPU ranks with FSDP2."""

from launcher.run.accelerator import compute_dtype
from support.launches import qlaunch, read_metrics


def test_demo_trains_and_summarizes(tmp_path):
    out = tmp_path / "demo"
    log = tmp_path / "demo.log"
    qlaunch(log, "demo", "--output-dir", str(out), "--steps", "80")
    text = log.read_text(errors="replace")
    assert "Done: 80 steps" in text and "on 2 rank(s) with fsdp2" in text
    assert f"compute in {compute_dtype('auto', 'no')} (quant.compute_dtype auto)" in text  # said at start-up
    assert f"Adapter (PEFT format): {out / 'run' / 'adapter'}" in text
    records = read_metrics(out / "run")
    losses = [r["loss"] for r in records]
    assert len(losses) == 80
    assert losses[-1] < losses[0] - 1.0, losses  # clearly visible learning
    assert {"step", "loss", "lr", "tokens_per_s"} <= records[-1].keys()
    assert (out / "run" / "adapter" / "adapter_config.json").is_file()
    assert (out / "run" / "run_config.yaml").is_file()
