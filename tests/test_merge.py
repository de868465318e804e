"""`qlaunch merge`: the adapter folded into a 16-bit copy of the base gives the adapter's outputs."""

import torch

from conftest import python, run_command, tail


def test_merged_model_matches_base_plus_adapter(demo_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    proc = run_command(
        [python(), "-m", "launcher", "train", "--nproc", "1", "--config", str(demo_assets / "run.yaml"),
         "--output_dir", str(run), "--train.max_steps", "15"],
        tmp_path / "train.log",
    )
    assert proc.returncode == 0, tail(tmp_path / "train.log")
    merged_dir = tmp_path / "merged"
    proc = run_command([python(), "-m", "launcher", "merge", str(run / "adapter"), "--output", str(merged_dir)], tmp_path / "merge.log")
    assert proc.returncode == 0, tail(tmp_path / "merge.log")
    proc = run_command([python(), "-m", "launcher", "merge", str(run / "adapter"), "--output", str(merged_dir)], tmp_path / "again.log")
    assert proc.returncode == 2 and "already exists" in (tmp_path / "again.log").read_text()

    ids = torch.tensor([[1, 10, 17, 24, 31, 38, 45, 52]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(demo_assets / "base", dtype=torch.bfloat16)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        adapted = PeftModel.from_pretrained(base, str(run / "adapter"))
        adapted_logits = adapted(input_ids=ids).logits.float()
        merged_logits = merged(input_ids=ids).logits.float()
    merge_error = (merged_logits - adapted_logits).abs().max().item()
    adapter_effect = (adapted_logits - base_logits).abs().max().item()
    assert merge_error < 0.1 * adapter_effect, (merge_error, adapter_effect)  # bf16 rounding of the merged weights
    assert not any("lora" in name for name, _ in merged.named_parameters())
