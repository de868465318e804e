"""Sequence parallelism for real: every sequence split across 2 CPU ranks (gloo all-to-alls inside the model's
attention), on FSDP2 and ZeRO-3, four families (GQA, a sliding window, eager soft-capped attention, tied
embeddings), packed rows and padded ones, and on 4 ranks as 2 data-parallel groups x 2. Each run is compared
with one process on the same global batch computing the model's own loss over whole sequences:
  * the losses, gradient norms and eval losses (split the same way) are the single process's (fp32:
    differences are rounding);
  * the ranks of a group trained on the same rows, and the groups on different ones;
  * the memory budget holds on every rank: static components to the byte, activations within 10%.
The runs of one world size and strategy share one launch (dist_probe.py --runs)."""

import contextlib
import json
from pathlib import Path

import pytest

from support.launches import assert_budget_rows, load_probes, probe_runs_command, read_metrics, run_command

MICRO, ACCUM, STEPS = 1, 2, 3
RUNS = {
    # (strategy, world): [(family, packing)]
    ("fsdp2", 2): [("llama-tied", False), ("mistral", True)],
    ("zero3", 2): [("gemma2", True), ("qwen2", False)],
    ("fsdp2", 4): [("llama", True)],
}
SPLIT = 2


def run_args(family: str, assets: Path, out: Path, packing: bool, micro: int, accum: int, split: int) -> list[str]:
    return [
        *("--model.path", str(assets / "base"), "--data.path", str(assets / "data.jsonl")),
        *("--data.max_seq_len", "64", "--data.packing", str(packing).lower(), "--output_dir", str(out)),
        *("--train.micro_batch_size", str(micro), "--train.grad_accum_steps", str(accum)),
        *("--train.max_steps", str(STEPS), "--train.lr", "3e-3", "--lora.dropout", "0"),
        *("--quant.compute_dtype", "float32", "--train.sequence_parallel", str(split)),
        *("--data.eval_fraction", "0.2", "--train.eval_every_steps", "2"),
        # The split runs compute their loss 16 tokens at a time, the reference over all logits at once.
        *("--train.loss_chunk_tokens", "16" if split > 1 else "0"),
    ]


@pytest.fixture(scope="module")
def launches(family_assets, tmp_path_factory):
    """(strategy, world) -> the folder of its one launch (`<folder>/<family>/run`, `.../probe`)."""
    done = {}

    def get(strategy: str, world: int) -> Path:
        if (strategy, world) not in done:
            root = tmp_path_factory.mktemp(f"sp-{strategy}-{world}")
            runs = [
                {
                    "probe_dir": str(root / family / "probe"),
                    "args": [
                        "--strategy",
                        strategy,
                        *run_args(family, family_assets(family), root / family / "run", packing, MICRO, ACCUM, SPLIT),
                    ],
                }
                for family, packing in RUNS[(strategy, world)]
            ]
            (root / "runs.json").write_text(json.dumps(runs))
            run_command(probe_runs_command(strategy, root / "runs.json", world), root / "launch.log", timeout=900)
            done[(strategy, world)] = root
        return done[(strategy, world)]

    return get


def reference(family_assets, tmp_path: Path, family: str, packing: bool, world: int) -> list[dict]:
    """One process, the whole global batch in one micro batch, whole sequences (`train.run`, as --nproc 1)."""
    from launcher import train
    from launcher.config import load_config, parse_overrides

    out = tmp_path / "reference"
    micro = MICRO * ACCUM * world // SPLIT
    args = run_args(family, family_assets(family), out, packing, micro, 1, 1)
    with (
        (tmp_path / "reference.log").open("w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        train.run(load_config(None, parse_overrides(args)))
    return read_metrics(out)


CASES = [(s, w, f, p) for (s, w), runs in RUNS.items() for f, p in runs]


@pytest.mark.parametrize(
    "strategy,world,family,packing", CASES, ids=[f"{f}-{s}-{w}ranks{'-packed' if p else ''}" for s, w, f, p in CASES]
)
def test_split_sequences_train_as_one_process_on_whole_ones(
    launches, family_assets, tmp_path, strategy, world, family, packing
):
    root = launches(strategy, world)
    out = root / family / "run"
    split, whole = read_metrics(out), reference(family_assets, tmp_path, family, packing, world)
    assert [r["step"] for r in split] == [r["step"] for r in whole] == list(range(1, STEPS + 1))
    assert [r["step"] for r in split if "eval_loss" in r] == [r["step"] for r in whole if "eval_loss" in r] == [2, 3]
    for key in ("loss", "grad_norm", "eval_loss"):
        ours, theirs = [r[key] for r in split if key in r], [r[key] for r in whole if key in r]
        assert ours == pytest.approx(theirs, rel=1e-5), key
    assert split[-1]["loss"] < split[0]["loss"]
    probes = load_probes(root / family / "probe", world)
    batches = [p["batches"] for p in probes]
    for rank in range(world):
        assert batches[rank] == batches[rank - rank % SPLIT], "a sequence group's ranks saw different rows"
    if world > SPLIT:
        assert batches[0] != batches[SPLIT], "two data-parallel groups saw the same rows"
    assert_budget_rows(json.loads((out / "memory_budget.json").read_text()), (strategy, world, family))
