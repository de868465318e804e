"""Chat data for real: multi-turn `messages` records, rendered with the chat template the run config
names, packed, with an eval split, train a family's model on 2 ranks, logged to TensorBoard as well
(the terminal shows qlaunch's lines alone; tests/unit/test_data.py checks the assistant mask token by token, test_packing.py the packed losses)."""

import json

import pytest

from support.families import TURNS_TEMPLATE, corpus
from support.launches import other_libraries_lines, qlaunch, read_metrics


def test_chat_records_train_with_the_configured_template_on_two_ranks(family_assets, tmp_path):
    assets = family_assets("qwen3")
    texts = corpus(assets / "data.jsonl")
    chats = []
    for first, second in zip(texts[::2], texts[1::2], strict=False):
        words = first.split() + second.split()
        turns = [" ".join(words[i : i + 8]) for i in range(0, 32, 8)]
        roles = ["user", "assistant", "user", "assistant"]
        chats.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    template = tmp_path / "turns.jinja"
    template.write_text(TURNS_TEMPLATE)
    out, steps, log = tmp_path / "run", 3, tmp_path / "train.log"
    qlaunch(
        log,
        *("train", "--nproc", "2", "--strategy", "zero3", "--model.path", str(assets / "base")),
        *("--data.path", str(data), "--data.chat_template", str(template), "--data.max_seq_len", "96"),
        *("--data.packing", "true", "--data.eval_fraction", "0.25", "--train.report_to", "tensorboard"),
        *("--train.max_steps", str(steps), "--output_dir", str(out)),
    )
    records = read_metrics(out)
    losses = [r["loss"] for r in records]
    assert len(losses) == steps and all(0 < loss < 20 for loss in losses), losses
    assert [r["step"] for r in records if "eval_loss" in r] == [steps] and 0 < records[-1]["eval_loss"] < 20
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The terminal holds qlaunch's lines alone; the rank logs what other libraries said (DeepSpeed on every CPU).
    assert other_libraries_lines(log.read_text()) == [], log.read_text()
    assert "Setting accelerator to CPU" in (out / "logs" / "rank-00001.log").read_text()

    # TensorBoard, offline: the same scalars as metrics.jsonl, and each rank's peak memory.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "trackers" / "qlaunch"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        assert [step for step, _ in scalars[key]] == [1, 2, 3], key
        assert [value for _, value in scalars[key]] == pytest.approx([r[key] for r in records], rel=1e-6), key
    assert scalars["eval_loss"] == [(steps, pytest.approx(records[-1]["eval_loss"], rel=1e-6))]
    for rank in (0, 1):
        assert scalars[f"memory/rank{rank}/peak_host_rss_mib"][0][1] > 100


def test_the_budget_command_prints_its_table_alone(family_assets, tmp_path):
    """`qlaunch budget` as a user runs it (a process of its own, which imports torch, bitsandbytes, DeepSpeed)."""
    log = tmp_path / "budget.log"
    qlaunch(log, "budget", "--model", str(family_assets("qwen3") / "base"), "--strategy", "zero3", "--world-size", "2")
    text = log.read_text()
    assert text.startswith("Memory budget per rank:") and other_libraries_lines(text) == [], text
