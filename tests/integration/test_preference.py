"""Preference training learns the preference, on two ranks: DPO on fsdp2 and zero3, ORPO on fsdp2, KTO on fsdp2
(its reference by the adapter switched off) and zero3 (precomputed).

The pairs (support/pairs.py): a chosen completion answers in words of the first tenth of the vocabulary, a
rejected one in the rest. The base model prefers the chosen completion (a higher log-probability per token) on
about half of the held-out pairs; after 30 steps the trained adapter must prefer it on at least 90%: DPO's
implicit reward (the log ratio to the reference, the adapter switched off) and ORPO's policy alike, on pairs
from a file it never trained on. DPO's reference is the adapter switched off, or
precomputed once before training (and read back by a later launch). KTO trains on the same pairs, each split
into a desirable and an undesirable completion; its adapter's implicit reward is then compared on the held-out
pairs. The reference-loss equality and the budget of each objective on every strategy are the matrix's rows
llama-tied-dpo, qwen3-moe-orpo and qwen2-kto (test_matrix.py).
"""

import json

import pytest
import torch

from support.launches import probe_runs_command, read_metrics, run_command, tail
from support.pairs import write_pairs

STEPS = 30
LAUNCHES = {
    "fsdp2": ("dpo", "dpo-precomputed", "orpo", "kto", "sft", "sft-continued", "dpo-from-sft"),
    "zero3": ("dpo", "dpo-precomputed", "kto-precomputed"),
}
"""Each strategy's runs, in one launch, in this order: dpo-precomputed computes its reference once before training
(zero3's reads the table fsdp2's run kept beside the data cache); sft trains an adapter on the SFT data, which
sft-continued continues and dpo-from-sft starts from and takes as its reference (`lora.init_from`)."""
MAX_SEQ_LEN = 48
SFT_STEPS = 20


@pytest.fixture(scope="module")
def assets(family_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    return {
        "base": family_assets("llama") / "base",
        "sft_data": family_assets("llama") / "data.jsonl",
        "train": write_pairs(root / "train.jsonl", 256, seed=1),
        "held_out": write_pairs(root / "held-out.jsonl", 64, seed=2),
        "root": root,
    }


def args(run: str, assets: dict, out) -> list[str]:
    sft_adapter = str(assets["root"] / "fsdp2" / "sft" / "run" / "adapter")
    common = [
        "--model.path", str(assets["base"]),
        "--train.micro_batch_size", "4",
        "--train.lr", "5e-3",
        "--lora.dropout", "0",
        "--data.cache_dir", str(assets["root"] / "cache"),
        "--output_dir", str(out),
    ]  # fmt: skip
    if run.startswith("sft"):
        data = ["--data.path", str(assets["sft_data"]), "--data.max_seq_len", "64"]
        steps = ["--train.max_steps", str(SFT_STEPS if run == "sft" else 4)]
        return common + data + steps + (["--lora.init_from", sft_adapter] if run == "sft-continued" else [])
    return common + [
        "--data.path", str(assets["train"]),
        "--data.eval_path", str(assets["held_out"]),
        "--data.max_seq_len", str(MAX_SEQ_LEN),
        "--train.objective", run.partition("-")[0],
        "--dpo.beta", "0.5",
        "--orpo.beta", "0.5",
        "--kto.beta", "0.5",
        "--train.max_steps", str(STEPS),
        "--train.eval_every_steps", str(STEPS),
        "--dpo.precompute_reference", str(run == "dpo-precomputed").lower(),
        "--kto.precompute_reference", str(run == "kto-precomputed").lower(),
        *(["--lora.init_from", sft_adapter] if run == "dpo-from-sft" else []),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(assets) -> dict[tuple[str, str], list[dict]]:
    """(strategy, objective) -> the run's metrics.jsonl records; each strategy's runs share one launch."""
    found = {}
    for strategy, objectives in LAUNCHES.items():
        root = assets["root"] / strategy
        root.mkdir()
        outs = {objective: root / objective for objective in objectives}
        runs_file = root / "runs.json"
        runs_file.write_text(
            json.dumps(
                [{"probe_dir": str(out / "probe"), "args": args(o, assets, out / "run")} for o, out in outs.items()]
            )
        )
        log = root / "launch.log"
        assert run_command(probe_runs_command(strategy, runs_file), log, timeout=600).returncode == 0, tail(log)
        found |= {(strategy, o): read_metrics(out / "run") for o, out in outs.items()}
        found[(strategy, "log")] = log.read_text()
    return found


def held_out_pairs(assets):
    """The held-out pairs as one batch (chosen sequences, then rejected), and the base model in fp32 computing
    each sequence's log-probability of its completion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.config import DataConfig, RunConfig, TrainConfig
    from launcher.data.batches import Rows
    from launcher.data.tokenized import load_tokenized
    from launcher.model.loss import install_loss
    from launcher.objectives import get

    tokenizer = AutoTokenizer.from_pretrained(assets["base"])
    data_cfg = DataConfig(path=str(assets["held_out"]), max_seq_len=MAX_SEQ_LEN, cache_dir=str(assets["root"]))
    rows = Rows(load_tokenized(data_cfg, tokenizer, 0, "dpo")[0], False, MAX_SEQ_LEN)
    batch = get(RunConfig(train=TrainConfig(objective="dpo"))).collate(rows, list(range(len(rows))), 0)
    model = AutoModelForCausalLM.from_pretrained(assets["base"], dtype=torch.float32)
    install_loss(model, 0, 0)
    return batch, model


def base_preference(assets) -> float:
    """The share of held-out pairs whose chosen completion the base model gives a higher log-probability per
    token than the rejected one."""
    from launcher.objectives.base import target_counts

    batch, model = held_out_pairs(assets)
    with torch.no_grad():
        per_token = model(**batch, sequence_logps=True).sequence_logps / target_counts(batch)
    chosen, rejected = per_token.chunk(2)
    return (chosen > rejected).float().mean().item()


def test_preference_training_learns_the_held_out_preference(runs, assets):
    before = base_preference(assets)
    logs = {key: value for key, value in runs.items() if key[1] == "log"}
    runs = {key: value for key, value in runs.items() if key[1].startswith(("dpo", "orpo"))}
    after = {key: records[-1]["eval_rewards/accuracies"] for key, records in runs.items()}
    print(f"held-out pairs preferred: base {before:.2f}; after {STEPS} steps: {after}")
    assert 0.2 <= before <= 0.8, before
    for key, records in runs.items():
        assert len(records) == STEPS and records[-1]["step"] == STEPS, key
        assert after[key] >= 0.9, (key, after[key])
        assert records[-1]["eval_rewards/margins"] > 0, key
    for strategy in ("fsdp2", "zero3"):
        dpo, precomputed = runs[(strategy, "dpo")], runs[(strategy, "dpo-precomputed")]
        # The reference is the adapter switched off: at the first step the policy is the reference.
        assert dpo[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert dpo[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
        # Precomputed once, it is the same reference (computed in other micro batches: bf16 rounding apart).
        assert [r["loss"] for r in precomputed[:5]] == pytest.approx([r["loss"] for r in dpo[:5]], abs=5e-3)
    assert "reference log-probabilities of 256 samples computed and kept" in logs[("fsdp2", "log")]
    assert "reference log-probabilities of 256 samples read from" in logs[("zero3", "log")]
    assert runs[("fsdp2", "orpo")][-1]["eval_nll_loss"] < runs[("fsdp2", "orpo")][0]["nll_loss"]


def test_sft_then_dpo_continues_the_sft_adapter_and_takes_it_as_the_reference(runs):
    sft, continued = runs[("fsdp2", "sft")], runs[("fsdp2", "sft-continued")]
    from_sft, fresh = runs[("fsdp2", "dpo-from-sft")], runs[("fsdp2", "dpo")]
    # lora.init_from alone: training goes on where the adapter left off, not from the base.
    first, last, went_on = sft[0]["loss"], sft[-1]["loss"], continued[0]["loss"]
    assert len(sft) == SFT_STEPS and last < first - 0.3, (first, last)
    assert abs(went_on - last) < abs(went_on - first) / 3, (first, last, went_on)
    # DPO from the SFT adapter: the policy starts as the SFT adapter (other log-probabilities than the base's),
    # and so does the reference (precomputed before the first step): the first margin is 0, the first loss log 2.
    assert from_sft[0]["logps/chosen"] != pytest.approx(fresh[0]["logps/chosen"], abs=0.5)
    assert from_sft[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert from_sft[0]["loss"] == pytest.approx(0.6931472, abs=1e-3)
    assert from_sft[-1]["eval_rewards/accuracies"] >= 0.9


def implicit_reward_preference(assets, adapter) -> float:
    """The share of held-out pairs whose chosen completion gets the higher implicit reward (log-probability under
    the adapter minus under the base) from the adapter trained by KTO."""
    from peft import PeftModel

    batch, base = held_out_pairs(assets)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        policy = model(**batch, sequence_logps=True).sequence_logps
        with model.disable_adapter():
            reference = model(**batch, sequence_logps=True).sequence_logps
    chosen, rejected = (policy - reference).chunk(2)
    return (chosen > rejected).float().mean().item()


def test_kto_learns_the_held_out_preference_from_labelled_completions(runs, assets):
    logs = {strategy: runs[(strategy, "log")] for strategy in ("fsdp2", "zero3")}
    for strategy, run in (("fsdp2", "kto"), ("zero3", "kto-precomputed")):
        records = runs[(strategy, run)]
        assert len(records) == STEPS, run
        # At the first step the policy is the reference (switched off, or precomputed), so every log ratio and
        # the KL term are 0 and each completion's loss is 1 - sigmoid(0).
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert records[0]["loss"] == pytest.approx(0.5, abs=1e-4)
        assert records[-1]["eval_rewards/margins"] > 0, run
        share = implicit_reward_preference(assets, assets["root"] / strategy / run / "run" / "adapter")
        print(f"{strategy} {run}: held-out pairs preferred by the implicit reward after {STEPS} steps: {share:.2f}")
        assert share >= 0.9, (strategy, run, share)
    assert "KTO trains on 256 desirable and 256 undesirable completions" in logs["fsdp2"]
    assert "reference log-probabilities of 512 samples computed and kept" in logs["zero3"]
