"""The bad-input battery: mistakes a user can make with every command, each ending fast in one clear
`qlaunch` error line (the last one printed) with no traceback, and nothing on disk changed: no file that
was there (an earlier run, a checkpoint, a model) altered, no output directory created.

Each case runs the real command line (`launcher.cli.main`) in this process; `no_launch` fails a case that
would get as far as starting `accelerate launch`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from launcher import cli, preflight, strategies
from launcher.checkpoint import store
from launcher.config import load_config

SECONDS = 30  # generous on a busy 2-core machine; a case that gets this far has started something heavy


@dataclass(frozen=True)
class Case:
    name: str
    argv: str
    """The command line, `{placeholders}` filled from the `world` fixture."""
    says: str
    """A regex the last line must match."""
    code: int = 2


TRAIN = "train --config {run} --nproc 2 --output_dir {fresh}"
CASES = [
    # Run config and command line
    Case("config-missing", "train --config {root}/nope.yaml", r"Run config `.*nope.yaml` does not exist"),
    Case("config-not-yaml", "train --config {bad_yaml}", r"is not valid YAML: expected ',' or ']'.* at line 2"),
    Case("config-a-list", "train --config {list_yaml}", r"must be a mapping at the top level"),
    Case("unknown-key", TRAIN + " --train.lrr 1e-4", r"Unknown config key `train.lrr`. Did you mean `train.lr`\?"),
    Case("unknown-section", TRAIN + " --trian.lr 1e-4", r"Unknown config key `trian`. Did you mean `train`\?"),
    Case("value-not-a-number", TRAIN + " --train.lr fast", r"`train.lr` must be float, got 'fast'"),
    Case("override-not-yaml", TRAIN + " --data.datasets [{{path:", r"value of `--data.datasets` is not valid YAML"),
    Case("override-without-value", TRAIN + " --train.lr", r"`--train.lr` needs a value"),
    Case("nproc-zero", TRAIN + " --nproc 0", r"`--nproc` must be at least 1, got 0"),
    Case("nproc-not-int", TRAIN + " --nproc two", r"argument --nproc: invalid int value: 'two'"),
    Case("strategy-unknown", TRAIN + " --strategy zero4", r"Unknown strategy `zero4`. Choose one of: fsdp2"),
    # Values
    Case("lora-r-zero", TRAIN + " --lora.r 0", r"`lora.r` must be a positive integer, got 0"),
    Case("lora-dropout-one", TRAIN + " --lora.dropout 1", r"`lora.dropout` must be in \[0, 1\), got 1"),
    Case("quant-type", TRAIN + " --quant.type int8", r"`quant.type` is `int8`; use nf4 or fp4"),
    Case("compute-dtype", TRAIN + " --quant.compute_dtype fp8", r"`quant.compute_dtype` is `fp8`; use one of"),
    Case("mixed-precision", TRAIN + " --train.mixed_precision fp8", r"`train.mixed_precision` is `fp8`; use"),
    Case("lr-schedule", TRAIN + " --train.lr_schedule step", r"`train.lr_schedule` is `step`; use cosine"),
    Case("lr-zero", TRAIN + " --train.lr 0", r"`train.lr` must be positive, got 0"),
    Case(
        "global-batch-and-accumulation",
        TRAIN + " --train.global_batch_size 16 --train.grad_accum_steps 2",
        r"Set `train.global_batch_size` or `train.grad_accum_steps`, not both",
    ),
    Case(
        "global-batch-not-a-multiple",
        TRAIN + " --train.global_batch_size 12",
        r"`train.global_batch_size` 12 is not a multiple of micro_batch_size 4 x 2 data-parallel ranks \(8 samples "
        r"per pass\): choose a micro_batch_size that divides 6",
    ),
    Case(
        "loss-chunk-negative",
        TRAIN + " --train.loss_chunk_tokens -1",
        r"`train.loss_chunk_tokens` must be 0 \(the model.s own loss\) or positive, got -1",
    ),
    Case(
        "sequence-parallel-zero",
        TRAIN + " --train.sequence_parallel 0",
        r"`train.sequence_parallel` must be a positive number of ranks per sequence, got 0",
    ),
    Case(
        "sequence-parallel-world",
        TRAIN + " --nproc 3 --train.sequence_parallel 2",
        r"splits each sequence across 2 ranks, so the world size must divide by it; this run has 3 rank\(s\)",
    ),
    Case(
        "sequence-parallel-strategy",
        TRAIN + " --strategy fsdp1 --train.sequence_parallel 2",
        r"fsdp1 cannot run this config: `train.sequence_parallel` above 1 runs with fsdp2, zero3",
    ),
    Case(
        "sequence-parallel-heads",
        TRAIN + " --nproc 8 --train.sequence_parallel 8",
        r"`train.sequence_parallel: 8` cannot split .* key/value heads; each rank of a group takes 1/8 of both",
    ),
    Case("epochs-zero", TRAIN + " --train.epochs 0", r"`train.epochs` must be a positive integer, got 0"),
    Case("max-steps-negative", TRAIN + " --train.max_steps -1", r"`train.max_steps` must be 0 \(use epochs\)"),
    Case("eval-every-negative", TRAIN + " --train.eval_every_steps -5", r"`train.eval_every_steps` must be >= 0"),
    Case("tracker-unknown", TRAIN + " --train.report_to [nosuch]", r"`train.report_to` names `nosuch`"),
    Case("timeout-zero", TRAIN + " --dist.timeout_s 0", r"`dist.timeout_s` must be a positive number of seconds"),
    Case("preempt-code-1", TRAIN + " --dist.preempt_exit_code 1", r"`dist.preempt_exit_code` must be in 3..125"),
    # Data
    Case("data-missing", TRAIN + " --data.path {root}/nope.jsonl", r"Dataset `.*nope.jsonl` does not exist"),
    Case("data-empty", TRAIN + " --data.path {empty}", r"Dataset `.*empty.jsonl` is empty"),
    Case("data-bad-json", TRAIN + " --data.path {bad_json}", r"Could not read `.*bad.jsonl` as json: JSON parse"),
    Case("data-not-utf8", TRAIN + " --data.path {latin1}", r"is not UTF-8 text.*iconv"),
    Case("data-fields", TRAIN + " --data.path {qa}", r"has fields \['answer', 'question'\].*`data.text_field`"),
    Case("data-suffix", TRAIN + " --data.path {run}", r"Cannot tell the format of `.*run.yaml` from its ending"),
    Case("data-seq-len-1", TRAIN + " --data.max_seq_len 1", r"`data.max_seq_len` must be at least 2, got 1"),
    Case("data-too-small", TRAIN + " --train.micro_batch_size 300", r"makes 512 rows .* one optimizer step needs 600"),
    Case(
        "data-path-and-datasets", TRAIN + " --data.datasets '[{{path: {qa}}}]'", r"Both `data.path` and `data.datasets`"
    ),
    Case(
        "data-weight-zero",
        TRAIN + " --data.path '' --data.datasets '[{{path: {data}, weight: 0}}]'",
        r"weight` must be positive",
    ),
    Case("eval-fraction", TRAIN + " --data.eval_fraction 1.5", r"`data.eval_fraction` must be in \[0, 1\)"),
    # Preference training
    Case(
        "pairs-under-sft",
        TRAIN + " --data.path {pairs}",
        r"holds preference pairs .* Set `train.objective` to dpo, orpo or kto",
    ),
    Case("sft-data-under-dpo", TRAIN + " --train.objective dpo", r"holds text records, which train.objective `dpo`"),
    Case(
        "labelled-under-sft",
        TRAIN + " --data.path {labelled}",
        r"holds completions labelled desirable or not .* Set `train.objective` to kto",
    ),
    Case("labelled-under-orpo", TRAIN + " --train.objective orpo --data.path {labelled}", r"train.objective `orpo`"),
    Case(
        "label-not-boolean",
        TRAIN + " --train.objective kto --data.path {bad_label}",
        r"record 1: `label` is 'yes'; KTO takes true .* or false",
    ),
    Case(
        "kto-weight-zero",
        TRAIN + " --train.objective kto --kto.undesirable_weight 0",
        r"must be positive, got 1.0 and 0",
    ),
    Case(
        "objective-unknown",
        TRAIN + " --train.objective ppo",
        r"`train.objective` is `ppo`; use one of sft, dpo, orpo or kto",
    ),
    Case(
        "dpo-loss-unknown",
        TRAIN + " --dpo.loss_type kto",
        r"`dpo.loss_type` is `kto`; use one of sigmoid, ipo, hinge or simpo",
    ),
    Case("dpo-beta-zero", TRAIN + " --train.objective dpo --dpo.beta 0", r"`dpo.beta` must be positive"),
    Case(
        "dpo-smoothing-hinge",
        TRAIN + " --train.objective dpo --dpo.loss_type hinge --dpo.label_smoothing 0.1",
        r"`dpo.label_smoothing` applies to the sigmoid and simpo losses",
    ),
    Case(
        "precompute-simpo",
        TRAIN + " --train.objective dpo --dpo.loss_type simpo --dpo.precompute_reference true",
        r"SimPO has no reference to precompute",
    ),
    Case("init-from-missing", TRAIN + " --lora.init_from {root}/nope", r"`lora.init_from` is `.*nope`, which has no"),
    Case("init-from-not-lora", TRAIN + " --lora.init_from {dora}", r"is not a plain LoRA adapter"),
    Case("pairs-packed", TRAIN + " --train.objective dpo --data.path {pairs} --data.packing true", r"not packed"),
    Case(
        "pairs-split",
        TRAIN + " --train.objective orpo --data.path {pairs} --train.sequence_parallel 2",
        r"does not split sequences across ranks",
    ),
    Case("pair-empty", TRAIN + " --train.objective dpo --data.path {empty_pair}", r"record 1: `rejected` is missing"),
    Case(
        "prompt-too-long",
        TRAIN + " --train.objective dpo --data.path {long_prompt}",
        r"record 0: its prompt is \d+ tokens, which leaves no room.*data.max_prompt_len",
    ),
    Case(
        "prompt-len-over-seq", TRAIN + " --data.max_prompt_len 64", r"`data.max_prompt_len` must be 0 .* below max_seq"
    ),
    # Model and LoRA
    Case("model-missing", TRAIN + " --model.path {root}/nope", r"Model `.*nope` not found"),
    Case("model-no-weights", TRAIN + " --model.path {no_weights}", r"has config.json but no weights"),
    Case("model-truncated", TRAIN + " --model.path {truncated}", r"model.safetensors` is truncated"),
    Case("lora-target-none", TRAIN + " --lora.target_modules [nope]", r"No name in `lora.target_modules` \(nope\)"),
    Case("lora-target-typo", TRAIN + " --lora.target_modules [q_proj,v_porj]", r"v_porj.*q_proj"),
    Case("rank-pattern-none", TRAIN + " --lora.rank_pattern '{{nope: 4}}'", r"`lora.rank_pattern` names `nope`, which"),
    Case("rank-pattern-zero", TRAIN + " --lora.rank_pattern '{{q_proj: 0}}'", r"`lora.rank_pattern.q_proj` must be a"),
    Case(
        "dora-on-experts",
        TRAIN + " --lora.use_dora true --lora.target_parameters [mlp.experts.down_proj]",
        r"`lora.use_dora` with `lora.target_parameters`: peft has no DoRA for adapted parameters",
    ),
    Case("loraplus-negative", TRAIN + " --train.loraplus_lr_ratio -1", r"`train.loraplus_lr_ratio` must be 0 \(off\)"),
    # Outputs and resume
    Case("earlier-run", "train --config {run} --nproc 2 --output_dir {earlier}", r"already holds a run.*overwrite"),
    Case("resume-not-checkpoint", TRAIN + " --resume {root}", r"is not a complete checkpoint \(no meta.json\)"),
    Case(
        "resume-changed-lora-r",
        "train --config {run} --nproc 2 --output_dir {earlier} --resume auto --lora.r 8",
        r"Cannot resume from .*\(lora.r: 16 -> 8\)",
    ),
    # Other commands
    Case("data-cmd-missing-file", "data --config {run} --data.path {root}/nope.jsonl", r"Dataset .* does not exist"),
    Case(
        "data-cmd-model-missing",
        "data --config {run} --model.path {root}/nope",
        r"Cannot read a tokenizer from `.*nope`",
    ),
    Case("budget-model-missing", "budget --model {root}/nope", r"Model `.*nope` not found"),
    Case("budget-world-zero", "budget --model {base} --world-size 0", r"World size 0 .* not a whole number"),
    Case(
        "budget-sequence-parallel-world",
        "budget --model {base} --world-size 3 --sequence-parallel 2",
        r"world size must divide by it; this run has 3 rank\(s\)",
    ),
    Case("budget-strategy", "budget --model {base} --strategy zero9", r"Unknown strategy `zero9`"),
    # The one rule for a value, whichever command reads it (budget accepted a sequence of 1 token before)
    Case("budget-seq-len-one", "budget --model {base} --seq-len 1", r"`data.max_seq_len` must be at least 2, got 1"),
    Case("plan-lora-r-zero", "plan --model {base} --gpu-memory 24GiB --lora-r 0", r"`lora.r` must be a positive"),
    Case("data-seq-len-one", "data --config {run} --data.max_seq_len 1", r"`data.max_seq_len` must be at least 2"),
    Case("data-offload", "data --config {run} --train.offload gpu", r"`train.offload` is `gpu`; use none, optim"),
    Case("plan-memory-not-size", "plan --model {base} --gpu-memory lots", r"--gpu-memory `lots` is not a size"),
    Case("plan-without-memory", "plan --model {base}", r"`qlaunch plan` needs --gpu-memory"),
    Case("plan-memory-without-unit", "plan --model {base} --gpu-memory 24", r"--gpu-memory `24` has no unit"),
    Case(
        "train-offload-not-offered",
        TRAIN + " --strategy fsdp2 --train.offload optimizer",
        r"fsdp2 cannot run this config: `train.offload: optimizer` is not offered",
    ),
    Case("train-offload-unknown", TRAIN + " --train.offload gpu", r"`train.offload` is `gpu`; use none"),
    Case("export-not-checkpoint", "export {root}", r"is not a complete training checkpoint \(no meta.json\)"),
    Case("export-output-exists", "export {earlier} --output {earlier}", r"already exists; choose another --output"),
    Case("export-no-adapter-config", "export {damaged}", r"has no adapter_config.json"),
    Case("export-planted-pickle", "export {planted}", r"could run code"),
    Case("merge-not-adapter", "merge {root} --output {fresh}", r"is not an adapter directory \(no adapter_config"),
    Case("merge-output-exists", "merge {adapter} --output {earlier}", r"already exists; choose another --output"),
    Case("verify-not-run", "verify {root}", r"is not the output directory of a finished run"),
    Case("demo-dir-not-empty", "demo --output-dir {earlier}", r"already exists and is not empty"),
    Case("demo-strategy", "demo --output-dir {fresh} --strategy zero9", r"Unknown strategy `zero9`"),
    Case("unknown-command", "trian --config {run}", r"invalid choice: 'trian'"),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


class PlantedPickle:
    """Unpickling it would create `marker`: a checkpoint must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def world(demo_assets, tmp_path_factory) -> dict[str, str]:
    """Files the cases point at: broken inputs, and an earlier run that must survive every case."""
    import pickle

    root = tmp_path_factory.mktemp("battery")
    files = {"root": root, "run": demo_assets / "run.yaml", "base": demo_assets / "base"}
    files["data"] = demo_assets / "data.jsonl"
    files["fresh"] = root / "fresh-output"

    def write(name: str, filename: str, content: bytes) -> None:
        files[name] = root / filename
        files[name].write_bytes(content)

    write("bad_yaml", "bad.yaml", b"train: [1, 2\n")
    write("list_yaml", "list.yaml", b"- model\n- train\n")
    write("empty", "empty.jsonl", b"")
    write("bad_json", "bad.jsonl", b'{"text": "a b"}\n{"text": \n')
    write("latin1", "latin1.jsonl", b'{"text": "caf\xe9 t1 t2"}\n' * 8)
    write("qa", "qa.jsonl", json.dumps({"question": "t1", "answer": "t2"}).encode() + b"\n")
    files["dora"] = root / "dora-adapter"
    files["dora"].mkdir()
    (files["dora"] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 8}))
    (files["dora"] / "adapter_model.safetensors").write_bytes(b"")
    pair = {"prompt": "t1 t8", "chosen": " t15", "rejected": " t3"}
    write("pairs", "pairs.jsonl", (json.dumps(pair) + "\n").encode() * 8)
    write("empty_pair", "empty-pair.jsonl", (json.dumps(pair) + "\n" + json.dumps({**pair, "rejected": ""})).encode())
    write("long_prompt", "long-prompt.jsonl", json.dumps({**pair, "prompt": " ".join(["t1"] * 200)}).encode())
    labelled = {"prompt": "t1 t8", "completion": " t15", "label": True}
    write("labelled", "labelled.jsonl", (json.dumps(labelled) + "\n").encode() * 8)
    write(
        "bad_label",
        "bad-label.jsonl",
        (json.dumps(labelled) + "\n" + json.dumps({**labelled, "label": "yes"})).encode(),
    )
    files["no_weights"] = shutil.copytree(demo_assets / "base", root / "no-weights")
    (files["no_weights"] / "model.safetensors").unlink()
    files["truncated"] = shutil.copytree(demo_assets / "base", root / "truncated")
    weights = files["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    # An earlier run: its adapter, metrics and a complete checkpoint of this very config.
    earlier = files["earlier"] = root / "earlier"
    files["adapter"] = earlier / "adapter"
    files["adapter"].mkdir(parents=True)
    (earlier / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(files["base"])})
    )
    (earlier / "adapter" / "adapter_model.safetensors").write_bytes(b"precious")
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    written = load_config(files["run"], [("output_dir", str(earlier)), ("train.mixed_precision", "no")])
    cfg = preflight.prelaunch_resolved(written, strategies.resolve(written), 2)  # as its ranks wrote it
    step = store.checkpoint_root(cfg.output_dir) / store.step_name(2)
    step.mkdir(parents=True)
    meta = {"step": 2, "world_size": 2, "strategy": "fsdp2", "checkpoint_format": "dcp"}
    (step / store.META).write_text(json.dumps({**meta, "fingerprint": store.fingerprint(cfg)}))
    (step / "adapter_config.json").write_text((earlier / "adapter" / "adapter_config.json").read_text())
    (step.parent / store.LATEST).write_text(step.name)
    files["damaged"] = root / "damaged"
    files["damaged"].mkdir()
    (files["damaged"] / store.META).write_text(json.dumps({**meta, "fingerprint": {}}))

    # A checkpoint someone hands over, whose DCP metadata would run code when unpickled.
    planted = files["planted"] = root / "planted"
    (planted / "trainable").mkdir(parents=True)
    (planted / store.META).write_text(json.dumps({**meta, "fingerprint": {}}))
    (planted / "adapter_config.json").write_text((earlier / "adapter" / "adapter_config.json").read_text())
    (planted / "trainable" / ".metadata").write_bytes(pickle.dumps(PlantedPickle(root / "pwned")))
    return {name: str(path) for name, path in files.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, world, capsys, no_launch):
    import shlex

    import torch.distributed as dist

    root = Path(world["root"])
    before = snapshot(root)
    started = time.monotonic()
    try:
        code = cli.main(shlex.split(case.argv.format(**world)))
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    took = time.monotonic() - started
    out, err = capsys.readouterr()

    assert code == case.code, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("qlaunch"), err
    assert "error" in lines[-1] and re.search(case.says, lines[-1]), lines[-1]
    assert "Traceback" not in out + err
    assert took < SECONDS, f"took {took:.1f} s to fail"
    assert snapshot(root) == before  # nothing changed, created or removed; the planted pickle did not run
    assert not dist.is_initialized()


def test_the_battery_is_big_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert {c.argv.split()[0] for c in CASES} >= {
        "train",
        "data",
        "budget",
        "plan",
        "export",
        "merge",
        "verify",
        "demo",
    }
