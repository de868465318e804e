"""Packing and the eval split for real, on 2 ranks: a packed run and an unpacked run over the same samples
(one optimizer step holds every training sample either way) log the same losses and the same eval losses,
on FSDP2 and ZeRO-3 and two model families, with the memory budget met by packed rows as by padded ones.
The packed run computes its loss 7 tokens at a time, the unpacked one over all logits (the model's own).
The unpacked run finds the data already tokenized."""

import json

import pytest

from launcher.config import DataConfig
from launcher.data.batches import pack
from launcher.data.loading import load_tokenizer
from launcher.data.tokenized import load_tokenized
from support.launches import assert_budget_rows, probe_runs_command, read_metrics, run_command, tail

TRAIN_SAMPLES, EVAL_FRACTION, SEED = 8, 0.2, 0


def capacity_for_two_rows(model_path: str, data_path: str) -> int:
    """The smallest max_seq_len that packs the training samples into exactly 2 rows (and cuts none)."""
    from launcher.config import ModelConfig

    tokenizer = load_tokenizer(ModelConfig(path=model_path))
    train, _ = load_tokenized(DataConfig(path=data_path, eval_fraction=EVAL_FRACTION), tokenizer, SEED)
    assert len(train) == TRAIN_SAMPLES
    for capacity in range(int(train.lengths.max()), int(train.lengths.sum()) + 1):
        if len(pack(train.lengths, capacity)) == 2:
            return capacity
    raise AssertionError("no max_seq_len packs these samples into 2 rows")


@pytest.mark.parametrize("strategy,family", [("fsdp2", "llama-tied"), ("zero3", "qwen2")])
def test_packed_and_unpacked_runs_log_the_same_losses(family_assets, tmp_path, strategy, family):
    assets = family_assets(family)
    data = tmp_path / "data.jsonl"
    data.write_text("".join((assets / "data.jsonl").read_text().splitlines(keepends=True)[:10]))
    capacity = capacity_for_two_rows(str(assets / "base"), str(data))
    common = (
        *("--strategy", strategy, "--model.path", str(assets / "base")),
        *("--data.path", str(data), "--data.max_seq_len", str(capacity), "--data.eval_fraction", str(EVAL_FRACTION)),
        *("--train.max_steps", "2", "--train.eval_every_steps", "1", "--train.seed", str(SEED)),
        *(
            "--lora.dropout",
            "0",
            "--quant.compute_dtype",
            "float32",
        ),  # no dropout masks; fp32: differences are rounding
    )
    # The packed run's loss is chunked across sample and row boundaries, the unpacked run's is the model's own.
    # Both run in one launch (dist_probe.py --runs): the unpacked one after the packed one.
    options = {True: (1, 7), False: (4, 0)}
    outs = {packing: tmp_path / f"packing-{packing}" for packing in options}
    runs_file, log = tmp_path / "runs.json", tmp_path / "launch.log"
    runs_file.write_text(
        json.dumps(
            [
                {
                    "probe_dir": str(outs[packing] / "probe"),
                    "args": [
                        *common,
                        *("--data.packing", str(packing).lower(), "--train.micro_batch_size", str(micro)),
                        *("--train.loss_chunk_tokens", str(loss_chunk), "--output_dir", str(outs[packing] / "run")),
                    ],
                }
                for packing, (micro, loss_chunk) in options.items()
            ]
        )
    )
    assert run_command(probe_runs_command(strategy, runs_file), log, timeout=900).returncode == 0, tail(log)
    runs = {}
    for packing, out in outs.items():
        runs[packing] = read_metrics(out / "run")
        assert_budget_rows(json.loads((out / "run" / "memory_budget.json").read_text()), (strategy, family, packing))
    assert "read from the cache" in log.read_text()  # the unpacked run: tokenized by the packed run's ranks
    packed, unpacked = runs[True], runs[False]
    assert [r["step"] for r in packed] == [r["step"] for r in unpacked] == [1, 2]
    for key in ("loss", "eval_loss"):
        assert [r[key] for r in packed] == pytest.approx([r[key] for r in unpacked], rel=1e-4), key
    assert packed[1]["loss"] < packed[0]["loss"] and packed[1]["eval_loss"] != packed[0]["eval_loss"]
