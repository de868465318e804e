"""A vision-language adapter learns what only the image says: the colour of a shape, asked the same question every
time (support/vision.py's shapes), answered right on held-out images far more often than any answer that does not
look at the image could be."""

import json
from collections import Counter

import torch

from launcher import train
from launcher.checkpoint.export import load_for_inference
from launcher.config import load_config, parse_overrides
from launcher.data.labels import IGNORE_INDEX
from launcher.data.loading import load_training_data
from support.vision import COLOURS, VISION_BY_NAME, build_vision_family, write_shapes_dataset


def answer_accuracy(model, rows, tokenizer) -> float:
    """How often the colour the model ranks first, among the four, is the held-out sample's answer."""
    firsts = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(colour))[0] for colour in sorted(COLOURS)]
    assert len(set(firsts)) == len(firsts)
    right = 0
    for sample in range(len(rows)):
        batch = rows.collate([sample], tokenizer.pad_token_id)
        labels = batch.pop("labels")[0]
        at = int((labels != IGNORE_INDEX).nonzero()[0])  # the answer's first token
        with torch.no_grad():
            logits = model(**batch).logits[0, at - 1]
        right += firsts[int(logits[firsts].argmax())] == int(labels[at])
    return right / len(rows)


def test_the_adapter_reads_the_colour_from_held_out_images(tmp_path):
    # A wider initialization than the matrix's: its frozen random output layer would bound every logit near 1.
    root = build_vision_family(VISION_BY_NAME["llava"], tmp_path / "llava", initializer_range=0.1)
    data, held = (
        write_shapes_dataset(tmp_path / "train", 256, seed=1),
        write_shapes_dataset(tmp_path / "held", 64, seed=2),
    )
    answers = Counter(json.loads(line)["messages"][1]["content"][0]["text"] for line in held.read_text().splitlines())
    assert max(answers.values()) / answers.total() < 0.5  # one answer for every image is right less than half the time
    args = [
        "--model.path", str(root / "base"), "--data.path", str(data), "--data.max_seq_len", "64",
        "--output_dir", str(tmp_path / "run"), "--strategy", "ddp", "--train.micro_batch_size", "8",
        "--train.max_steps", "200", "--train.lr", "3e-3", "--lora.dropout", "0",
    ]  # fmt: skip
    summary = train.run(load_config(None, parse_overrides(args)))
    assert summary.last_loss < 0.25 * summary.first_loss

    cfg = load_config(None, parse_overrides([*args, "--data.path", str(held)]))
    tokenizer, rows, _ = load_training_data(cfg.model, cfg.data, cfg.train, world=1)
    model = load_for_inference(tmp_path / "run")
    learned = answer_accuracy(model, rows, tokenizer)
    with model.disable_adapter():
        base = answer_accuracy(model, rows, tokenizer)
    assert learned >= 0.9 and base <= 0.5, (learned, base)
