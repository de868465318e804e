"""The family x strategy matrix: every decoder family on every sharding strategy, for real.

One list of families (tests/support/families.py) and one of strategies; each cell is a real `qlaunch train`
run of two CPU ranks over gloo under `accelerate launch` with the strategy's shipped config (the observer
script only reads state, see dist_probe.py), compared with a single-process run on the same global batch.
The cells of one strategy share one launch, whose ranks run them in turn (dist_probe.py --runs): a cell
pays for its run, not for starting two interpreters. Each cell is still reported by name, and a cell that
fails ends its strategy's launch (the cells after it report that they were not reached). Every cell checks what
matters for a sharded QLoRA run:
  * the first losses and gradient norms equal the single process's (same data, seed and global batch;
    the cell computes its loss in chunks of 16 tokens and offloads its activations, the single process
    computes it over all logits at once and keeps them resident);
  * adapter gradients' optimizer states are split (whole on every rank for ddp);
  * the adapter reloads in one process with the sharded model's logits, and it matters;
  * every rank's shard is rank 0's bytes, packed 4-bit data and quantization constants included;
  * tied embeddings are one parameter and one storage before and after sharding;
  * checkpointing is non-reentrant (each layer runs twice per micro step; three times with DPO's reference, five
    with KTO's reference and KL term);
  * the memory budget: static components to the byte, activations within 10%, on every rank.
Each cell records what is 4-bit and what is adapted; test_readme_table.py renders the README's table
from these records. `-m matrix_smoke` runs one cell per family (each strategy twice).
"""

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launcher import strategies
from support.families import BY_NAME, FAMILIES, LAYERS
from support.launches import (
    assert_budget_rows,
    load_probes,
    probe_runs_command,
    qlaunch,
    read_metrics,
    run_command,
    tail,
)
from support.matrix import CELL_FACTS
from support.shards import assert_shards_are_rank0s_bytes

WORLD = 2
MICRO = 1
ACCUM = 2  # the sharded runs accumulate; the reference takes the whole global batch at once
STEPS = 4
LOSS_CHUNK = 16
"""The sharded runs compute the loss 16 tokens at a time (several chunks per micro batch, across sample
boundaries) and offload their saved activations; the reference is the model's own loss over all logits
(`train.loss_chunk_tokens: 0`) with its activations resident."""


def cells(refused: bool = False):
    """The matrix's cells that run (or, with `refused`, those refused before launch), as pytest params."""
    for i, family in enumerate(FAMILIES):
        for j, strategy in enumerate(strategies.NAMES):
            if (strategy in family.refused) != refused:
                continue
            # A Latin-square diagonal: every family once, every strategy at least twice.
            marks = [pytest.mark.matrix, *([pytest.mark.matrix_smoke] if j == i % len(strategies.NAMES) else [])]
            yield pytest.param((family.name, strategy), id=f"{family.name}-{strategy}", marks=marks)


def train_args(
    family: str, assets: Path, out: Path, strategy: str, micro: int, accum: int, reference: bool = False
) -> list[str]:
    return [
        *BY_NAME[family].run_args,
        "--train.loss_chunk_tokens",
        str(0 if reference else LOSS_CHUNK),
        "--train.activation_offload",
        str(not reference).lower(),
        "--model.path",
        str(assets / "base"),
        "--data.path",
        str(assets / BY_NAME[family].data),
        "--data.max_seq_len",
        "64",
        "--strategy",
        strategy,
        "--output_dir",
        str(out),
        "--train.micro_batch_size",
        str(micro),
        "--train.grad_accum_steps",
        str(accum),
        "--train.max_steps",
        str(STEPS),
        "--train.lr",
        "3e-3",
        "--train.warmup_steps",
        "1",
        # Dropout masks differ between two ranks and one process; the losses must not.
        "--lora.dropout",
        "0",
        "--train.check_4bit_weights",
        "true",
    ]


@pytest.fixture(scope="session")
def references(family_assets, tmp_path_factory):
    """The unsharded reference of a (family, strategy): one process, the same global batch in one
    micro batch, with the strategy's dtype policy; strategies with the same policy share one run (the
    dtype the packed 4-bit bytes are viewed as aside: the bytes, and so every number, are the same).
    It is `qlaunch train` on one process, run in this process (`train.run`, as `--nproc 1` does),
    which saves an interpreter start and the imports for each of them."""
    from launcher import train
    from launcher.config import load_config, parse_overrides
    from launcher.memory.predict import resolve_quant

    runs: dict[tuple, Path] = {}

    def config(name: str, strategy: str, out: Path):
        args = train_args(name, family_assets(name), out, strategy, MICRO * WORLD * ACCUM, 1, reference=True)
        return load_config(None, parse_overrides(args))

    def get(name: str, strategy: str) -> Path:
        chosen = strategies.get(strategy)
        cfg = resolve_quant(config(name, strategy, Path("run")), chosen, "no", "cpu")
        key = (name, dataclasses.replace(strategies.dtype_policy(cfg.quant, chosen, "no"), quant_storage=None))
        if key not in runs:
            root = tmp_path_factory.mktemp(f"{name}-reference")
            with (
                (root / "reference.log").open("w") as log,
                contextlib.redirect_stdout(log),
                contextlib.redirect_stderr(log),
            ):
                train.run(config(name, strategy, root / "run"))
            runs[key] = root / "run"
        return runs[key]

    return get


@pytest.fixture(scope="session")
def strategy_launches(request, family_assets, tmp_path_factory):
    """strategy -> the folder of its one launch, which ran every selected cell of that strategy in turn
    (`<folder>/<family>/run` and `<folder>/<family>/probe`, `<folder>/launch.log`)."""
    runnable = {param.values[0] for param in cells()}
    selected = [
        item.callspec.params["cell"]
        for item in request.session.items
        if hasattr(item, "callspec") and item.callspec.params.get("cell") in runnable
    ]
    done: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in done:
            names = list(dict.fromkeys(name for name, s in selected if s == strategy))
            root = tmp_path_factory.mktemp(f"matrix-{strategy}")
            runs = [
                {
                    "probe_dir": str(root / name / "probe"),
                    "args": train_args(name, family_assets(name), root / name / "run", strategy, MICRO, ACCUM),
                }
                for name in names
            ]
            (root / "runs.json").write_text(json.dumps(runs))
            run_command(
                probe_runs_command(strategy, root / "runs.json", WORLD),
                root / "launch.log",
                timeout=300 + 150 * len(runs),
            )
            done[strategy] = root
        return done[strategy]

    return get


@dataclass
class Cell:
    family: str
    strategy: str
    out: Path
    reference: Path
    probes: list[dict]

    @property
    def tied(self) -> bool:
        return BY_NAME[self.family].tied

    def losses(self, out: Path | None = None) -> list[float]:
        return [r["loss"] for r in read_metrics(out or self.out)]

    def grad_norms(self, out: Path | None = None) -> list[float]:
        return [r["grad_norm"] for r in read_metrics(out or self.out)]

    def report(self, out: Path | None = None) -> list[dict]:
        return json.loads((out or self.out).joinpath("shard_report.json").read_text())


@pytest.fixture(scope="module", params=list(cells()))
def cell(request, references, strategy_launches) -> Cell:
    name, strategy = request.param
    reference = references(name, strategy)
    launch = strategy_launches(strategy)
    root = launch / name
    finished = all((root / "probe" / f"rank{rank}.pt").is_file() for rank in range(WORLD))
    if not finished:
        started = any((root / "probe").glob("started-rank*"))
        what = "failed (its ranks' logs: run/logs/)" if started else "was not reached: a cell before it failed"
        pytest.fail(f"{name} on {strategy} {what}; the launch log ends:\n{tail(launch / 'launch.log')}")
    result = Cell(name, strategy, root / "run", reference, load_probes(root / "probe", WORLD))
    request.config.stash.setdefault(CELL_FACTS, {})[request.param] = facts(result)
    return result


def four_bit_name(module: str) -> str:
    """What the README calls a 4-bit weight: its linear's name (`q_proj`; peft wraps an adapted one as
    `q_proj.base_layer`), or for a 4-bit expert its module and parameter (`experts.gate_up_proj`, from
    `...experts[.base_layer].parametrizations.gate_up_proj.0`)."""
    owner, _, parameter = module.partition(".parametrizations.")
    last = owner.replace(".base_layer", "").rpartition(".")[2]
    return f"{last}.{parameter.partition('.')[0]}" if parameter else last


def facts(cell: Cell) -> dict:
    """What the README table says about a family: its 4-bit layers, its adapted layers, what stays dense."""
    adapter_config = json.loads((cell.out / "adapter" / "adapter_config.json").read_text())
    budget = json.loads((cell.out / "memory_budget.json").read_text())["measured"]["ranks"][0]["components"]
    return {
        # peft wraps each adapted 4-bit linear: `...q_proj.base_layer` is q_proj.
        "four_bit": sorted({four_bit_name(name) for name in cell.probes[0]["full_quant_states"]}),
        "adapted": sorted(adapter_config["target_modules"]) + sorted(adapter_config.get("target_parameters") or []),
        "dense_experts": budget["experts"] > 0,
        "tied": cell.probes[0]["tie_before_shard"]["same_parameter"],
    }


def test_losses_match_a_single_process(cell):
    losses, reference = cell.losses(), cell.losses(cell.reference)
    assert len(losses) == STEPS and len(reference) == STEPS
    # Same data, seed and global batch: every step agrees with one unsharded process, so the
    # adapter updates agree too (a step that went wrong shows in the next loss).
    assert losses == pytest.approx(reference, abs=2e-3), (losses, reference)
    assert losses[-1] != losses[0]
    # The gradient norm is over the whole adapter gradient, every rank's part and every micro batch:
    # a norm of one rank's shard (0.71x on 2 ranks) or of one micro batch would miss by far more than
    # the bfloat16 rounding that separates a batch of 2 from two accumulated batches of 1.
    norms, reference_norms = cell.grad_norms(), cell.grad_norms(cell.reference)
    assert all(n > 0 for n in norms) and norms == pytest.approx(reference_norms, rel=2e-2), (norms, reference_norms)


def test_optimizer_state_is_split(cell):
    total = cell.report(cell.reference)[0]["optimizer_state_elements_local"]
    assert total > 0
    ranks = cell.report()
    if cell.strategy == "ddp":
        assert all(rank["optimizer_state_elements_local"] == total for rank in ranks), ranks
    else:
        assert_split_evenly([rank["optimizer_state_elements_local"] for rank in ranks], total, cell.strategy)
    adapter = ranks[0]["adapter_elements_total"]
    if cell.strategy in ("ddp", "zero2"):
        assert all(rank["adapter_elements_local"] == adapter for rank in ranks), ranks
    else:
        assert_split_evenly([rank["adapter_elements_local"] for rank in ranks], adapter, cell.strategy)


def assert_split_evenly(local: list[int], total: int, strategy: str) -> None:
    """Every element held once, half on each rank. FSDP2 splits each parameter by rows, so one with fewer
    rows than ranks (Qwen2-MoE's shared-expert gate is a linear to one value: its lora_B has one row) sits
    whole on rank 0: there the halves may differ by such small parameters (under 1%)."""
    assert sum(local) == total, (local, total)
    if strategy == "fsdp2":
        assert max(local) - min(local) <= total // 100, (local, total)
    else:
        assert local == [total // WORLD] * WORLD, (local, total)


def test_adapter_reloads_with_the_trained_logits(cell):
    from safetensors.torch import load_file

    from launcher.checkpoint.export import ADAPTER_DIR, CHECK_FILE, load_for_inference

    adapter = load_file(cell.out / ADAPTER_DIR / "adapter_model.safetensors")
    trainable = {name for name, *_ in cell.probes[0]["shards"] if "lora_" in name}
    assert trainable and set(adapter) == {name.replace(".default.", ".") for name in trainable}
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)

    model = load_for_inference(cell.out)
    check = load_file(cell.out / CHECK_FILE)
    expected = check.pop("logits")
    assert ("pixel_values" in check) == bool(BY_NAME[cell.family].vision)  # a vision row checks an image sample
    with torch.no_grad():
        logits = model(**check).logits.float()
        with model.disable_adapter():
            base_logits = model(**check).logits.float()
    diff = (logits - expected).abs().max().item()
    without_adapter = (base_logits - expected).abs().max().item()
    assert diff <= 1e-4, diff
    assert without_adapter > 100 * max(diff, 1e-4), without_adapter  # the trained adapter matters


def test_every_shard_is_rank0s_bytes(cell):
    assert_shards_are_rank0s_bytes(cell.probes, cell.strategy)
    # ... and so is every 4-bit weight as its linear receives it in the first forward, gathered.
    four_bit = len(cell.probes[0]["full_quant_states"])
    for rank in cell.report():
        assert rank["packed_weights_in_first_forward"] == {"checked": four_bit, "of": four_bit, "differing": []}


def test_other_ranks_never_hold_the_whole_model(cell):
    # Before sharding, only the source rank has weight data; the others hold a meta skeleton.
    assert cell.probes[0]["materialized_bytes_before_shard"] > 0
    for probe in cell.probes[1:]:
        assert probe["materialized_bytes_before_shard"] == 0


def test_tied_embeddings_stay_one_tensor(cell):
    for rank, probe in enumerate(cell.probes):
        # Before sharding the other ranks hold a meta skeleton: one parameter, no storage yet.
        before = None if rank else cell.tied
        assert probe["tie_before_shard"] == {"same_parameter": cell.tied, "same_storage": before}, (rank, probe)
        assert probe["tie_after_shard"] == {"same_parameter": cell.tied, "same_storage": cell.tied}, (rank, probe)


def test_checkpointing_is_non_reentrant(cell):
    for probe in cell.probes:
        assert "CheckpointFunctionBackward" not in probe["loss_graph_node_types"]
        # Each decoder layer ran twice per micro step: forward, then recomputed in backward (and once more for
        # DPO's reference, under no gradient, which checkpointing does not recompute); so did each vision encoder
        # layer (PaddleOCR-VL's are not sharding units of their own, so not counted).
        family = BY_NAME[cell.family]
        calls = (family.layer_forwards * LAYERS + family.vision_unit_calls) * ACCUM
        assert probe["first_step_layer_forward_calls"] == calls


def test_memory_budget_matches_what_each_rank_holds(cell):
    from launcher.memory.components import STATIC_COMPONENTS

    for out, world in ((cell.out, WORLD), (cell.reference, 1)):
        report = json.loads((out / "memory_budget.json").read_text())
        assert report["predicted"] is not None
        assert [r["rank"] for r in report["measured"]["ranks"]] == list(range(world))
        assert {row["component"] for row in report["comparison"]} == set(STATIC_COMPONENTS) | {"activations"}
        assert_budget_rows(report, (cell.family, cell.strategy, world))
        for rank in report["measured"]["ranks"]:
            held = rank["components"]
            assert (
                held["lora"] > 0 and held["gradients"] > 0 and held["optimizer_states"] > 0 and held["activations"] > 0
            )
        assert (out / "memory_budget.png").is_file()


@pytest.mark.parametrize("cell", list(cells(refused=True)))
def test_refused_cells_stop_before_any_process_starts(cell, family_assets, tmp_path):
    name, strategy = cell
    out = tmp_path / "run"
    log = tmp_path / "launch.log"
    qlaunch(
        log,
        "train",
        "--nproc",
        str(WORLD),
        *train_args(name, family_assets(name), out, strategy, MICRO, ACCUM),
        expect=2,
    )
    text = log.read_text()
    assert f"qlaunch: error: {strategy} cannot run this config" in text and BY_NAME[name].refused[strategy] in text, (
        text
    )
    assert "Strategies that can:" in text and "rank 0/" not in text and not out.exists(), text
