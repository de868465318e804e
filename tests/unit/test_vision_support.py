"""The tiny vision-language bases load back offline through the Auto classes and train on their processor's output;
the shapes dataset's answer is in the image, never in the text (tests/support/vision.py)."""

import json

import pytest
import torch
from PIL import Image

from support.vision import COLOURS, VISION_FAMILIES, build_vision_family, write_shapes_dataset


@pytest.mark.parametrize("family", VISION_FAMILIES, ids=lambda f: f.name)
def test_a_base_reloads_offline_and_trains_on_its_processors_output(family, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = build_vision_family(family, tmp_path)
    processor = AutoProcessor.from_pretrained(root / "base")
    model = AutoModelForImageTextToText.from_pretrained(root / "base", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    record = json.loads((root / "vision.jsonl").read_text().splitlines()[0])
    messages = record["messages"]
    text = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and text.count(family.placeholder) == 1
    images = [Image.open(root / path) for path in record["images"]]
    batch = processor(text=[text], images=images, return_tensors="pt")
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert 4 <= image_tokens <= 16
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    text_only = processor.tokenizer(["user\nred green"], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=text_only, labels=text_only).loss)


def test_the_answer_is_the_shapes_colour_in_the_pixels_and_the_question_never_changes(tmp_path):
    path = write_shapes_dataset(tmp_path / "a", records=24, seed=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {json.dumps(r["messages"][0]) for r in records} == {json.dumps(records[0]["messages"][0])}
    answers = [r["messages"][1]["content"][0]["text"] for r in records]
    assert len(set(answers)) > 1
    for record, answer in zip(records, answers, strict=True):
        colours = {rgb for _, rgb in Image.open(path.parent / record["images"][0]).convert("RGB").getcolors()}
        assert COLOURS[answer] in colours
        assert not colours & {rgb for name, rgb in COLOURS.items() if name != answer}
    again = write_shapes_dataset(tmp_path / "b", records=24, seed=3)
    assert again.read_text() == path.read_text()
    assert (again.parent / "images/00005.png").read_bytes() == (path.parent / "images/00005.png").read_bytes()
