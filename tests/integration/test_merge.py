"""`qlaunch merge` and `qlaunch export`: the adapter folded into a 16-bit copy of the base gives the adapter's outputs."""

import pytest
import torch

from support.launches import qlaunch


def test_merged_model_matches_base_plus_adapter(demo_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    qlaunch(
        tmp_path / "train.log",
        *("train", "--nproc", "1", "--config", str(demo_assets / "run.yaml"), "--output_dir", str(run)),
        *("--train.max_steps", "15"),
    )
    merged_dir = tmp_path / "merged"
    qlaunch(tmp_path / "merge.log", "merge", str(run / "adapter"), "--output", str(merged_dir))
    qlaunch(tmp_path / "again.log", "merge", str(run / "adapter"), "--output", str(merged_dir), expect=2)
    assert "already exists" in (tmp_path / "again.log").read_text()

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


EXPERTS = ("--lora.target_parameters", "[mlp.experts.gate_up_proj, mlp.experts.down_proj]")


@pytest.mark.parametrize(
    "family,strategy,extra",
    [("qwen2", "fsdp2", ()), ("mixtral", "zero3", EXPERTS), ("qwen3-moe", "fsdp2", EXPERTS)],
    ids=["qwen2-fsdp2", "mixtral-zero3-4bit-experts-adapted", "qwen3-moe-fsdp2-4bit-experts-adapted"],
)
def test_export_and_merge_round_trip_of_tied_and_moe_families(family, strategy, extra, family_assets, tmp_path):
    """Two ranks with the default LoRA config (dropout on), a checkpoint exported to an adapter, and the
    adapter merged: the export equals the run's adapter, the merged model gives the adapter's outputs,
    and a tied base stays tied (saved once, tied again on load). With adapters on the 4-bit experts, the
    reload onto the 4-bit base (`qlaunch verify`) gives training's logits and the merge puts them into the
    16-bit experts."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher.model.experts import sort_expert_parameters

    assets, run = family_assets(family), tmp_path / "run"
    qlaunch(
        tmp_path / "train.log",
        *("train", "--nproc", "2", "--strategy", strategy, "--output_dir", str(run)),
        *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl"), "--data.max_seq_len", "64"),
        *("--train.max_steps", "4", "--train.lr", "3e-3", "--checkpoint.every_steps", "4"),
        *extra,
    )
    qlaunch(tmp_path / "verify.log", "verify", str(run))
    exported = tmp_path / "exported"
    qlaunch(tmp_path / "export.log", "export", str(run), "--output", str(exported))
    trained, restored = (load_file(d / "adapter_model.safetensors") for d in (run / "adapter", exported))
    assert trained.keys() == restored.keys() and all(
        torch.equal(trained[k], restored[k].to(trained[k].dtype)) for k in trained
    )

    merged_dir = tmp_path / "merged"
    qlaunch(tmp_path / "merge.log", "merge", str(exported), "--output", str(merged_dir), "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(assets / "base", dtype=torch.float32)
    sort_expert_parameters(base)  # peft nests adapted experts in that order on 4-bit ones (README: MoE experts)
    base_experts = [p.detach().clone() for n, p in base.named_parameters() if n.endswith("experts.gate_up_proj")]
    tied = base.config.tie_word_embeddings
    assert merged.config.tie_word_embeddings == tied
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    saved = load_file(merged_dir / "model.safetensors")
    assert ("lm_head.weight" in saved) != tied  # a tied model saves the shared matrix once
    ids = torch.tensor([load_file(run / "adapter_check.safetensors")["input_ids"][0].tolist()])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted_logits = PeftModel.from_pretrained(base, str(exported))(input_ids=ids).logits
        merged_logits = merged(input_ids=ids).logits
    adapter_effect = (adapted_logits - base_logits).abs().max().item()
    assert (merged_logits - adapted_logits).abs().max().item() < 1e-3 * max(adapter_effect, 1.0)
    assert adapter_effect > 1e-3
    if extra:  # the merged experts are no longer the base's
        merged_experts = [p for n, p in merged.named_parameters() if n.endswith("experts.gate_up_proj")]
        assert base_experts and len(merged_experts) == len(base_experts)
        assert not any(torch.equal(m, b) for m, b in zip(merged_experts, base_experts, strict=True))
