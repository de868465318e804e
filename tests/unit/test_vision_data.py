"""Image chat records (launcher/data/images.py): rendered with the processor, the loss on the assistant's words only,
image tokens never targets, each micro batch's images processed where it is collated; bad input refused before
launch in one line."""

import json
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from launcher import cli
from launcher.config import DataConfig, ModelConfig, TrainConfig
from launcher.data.labels import IGNORE_INDEX
from launcher.data.loading import load_training_data, load_vision_processor
from launcher.data.records import load_records
from launcher.data.records import tokenize as tokenize_records
from support.vision import VISION_FAMILIES

FAMILIES = [f.name for f in VISION_FAMILIES]
PER_TOKEN_IMAGE_MARK = {"gemma3": "token_type_ids", "paddleocr_vl": "mm_token_type_ids", "llava": None}


def tokenized(assets, data_path, **data):
    vision = load_vision_processor(ModelConfig(path=str(assets / "base")))
    cfg = DataConfig(path=str(data_path), **data)
    return vision, tokenize_records(
        load_records(cfg.sources()[0]), vision.tokenizer, cfg.sources()[0], cfg, processor=vision
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_covers_the_answer_and_never_an_image_token(family, vision_assets):
    assets = vision_assets(family)
    vision, table = tokenized(assets, assets / "vision.jsonl", max_seq_len=128)
    records = [json.loads(line) for line in (assets / "vision.jsonl").read_text().splitlines()]
    assert len(table) == len(records)
    image = vision.image_token_id
    for row, record in zip(table.select(range(8)), records, strict=False):
        ids, labels = row["input_ids"], row["labels"]
        assert ids.count(image) in (4, 16) and row["images"] == [str((assets / record["images"][0]).resolve())]
        targets = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        answer = record["messages"][1]["content"][0]["text"]
        # the answer and the turn's end, which the model must learn to emit
        assert vision.tokenizer.decode(targets) == f"{answer}</s>\n", vision.tokenizer.decode(targets)
        assert image not in targets and row["targets"] == len(targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_micro_batch_carries_its_images_and_the_per_token_marks_its_model_takes(family, vision_assets):
    assets = vision_assets(family)
    train = TrainConfig(micro_batch_size=2)
    _, rows, _ = load_training_data(
        ModelConfig(path=str(assets / "base")), DataConfig(path=str(assets / "vision.jsonl")), train, world=1
    )
    batch = rows.collate([0, 1], pad_id=0)
    assert batch["pixel_values"].shape[0] in (2, 32)  # an image each, or (PaddleOCR-VL) each image's 16 patches
    mark = PER_TOKEN_IMAGE_MARK[family]
    if mark:
        assert torch.equal(batch[mark], (batch["input_ids"] == rows.pixels.image_token).long())
    assert set(batch) <= {"input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw", mark}


def test_an_image_cut_by_max_seq_len_drops_its_record(vision_assets):
    assets = vision_assets("llava")  # 16 image tokens after the prompt's first tokens
    _, table = tokenized(assets, assets / "vision.jsonl", max_seq_len=12)
    assert len(table) == 0


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(images, parts=1):
    content = [{"type": "image"}] * parts + [{"type": "text", "text": "What colour is the shape?"}]
    return {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red"}],
        "images": images,
    }


@pytest.mark.parametrize(
    "bad,message",
    [
        (lambda d: record(["images/none.png"]), r"record 0: image `.*none.png` does not exist"),
        (
            lambda d: record(["images/00000.png"], parts=2),
            r'record 0: the messages hold 2 \{"type": "image"\} parts but `images` lists 1',
        ),
        (lambda d: record(["https://example.com/a.png"]), r"record 0: image `https://example.com/a.png` is a URL"),
        (lambda d: record(["notes.txt"]), r"record 0: `.*notes.txt` cannot be read as an image"),
    ],
    ids=["missing", "more-placeholders", "url", "not-an-image"],
)
def test_bad_image_records_are_refused_before_launch(bad, message, vision_assets, tmp_path, capsys, no_launch):
    assets = vision_assets("gemma3")
    shutil.copytree(assets / "images", tmp_path / "images")
    (tmp_path / "notes.txt").write_text("not an image")
    data = write(
        tmp_path / "bad.jsonl",
        [bad(tmp_path)] + [json.loads(line) for line in (assets / "vision.jsonl").read_text().splitlines()],
    )
    code = cli.main(
        [
            "train",
            "--model.path",
            str(assets / "base"),
            "--data.path",
            str(data),
            "--nproc",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_a_text_only_model_given_image_records_is_refused(vision_assets, demo_assets, tmp_path, capsys, no_launch):
    code = cli.main(
        [
            "train", "--config", str(demo_assets / "run.yaml"), "--data.path", str(vision_assets("llava") / "vision.jsonl"),
            "--nproc", "2", "--output_dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds image chat records" in err and "is a text-only causal LM" in err, err


@pytest.mark.parametrize("option", [["--data.packing", "true"], ["--train.sequence_parallel", "2"]])
def test_packing_and_sequence_parallelism_are_refused_with_images(option, vision_assets, tmp_path, capsys, no_launch):
    assets = vision_assets("paddleocr_vl")
    code = cli.main(
        ["train", "--model.path", str(assets / "base"), "--data.path", str(assets / "vision.jsonl"), "--nproc", "2",
         "--output_dir", str(tmp_path / "out"), *option]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "does not pack or split across ranks" in err and option[0].removeprefix("--") in err, err


def test_qlaunch_data_shows_where_the_image_tokens_sit(vision_assets, capsys):
    assets = vision_assets("llava")
    answer = json.loads((assets / "vision.jsonl").read_text().splitlines()[0])["messages"][1]["content"][0]["text"]
    code = cli.main(
        ["data", "--model.path", str(assets / "base"), "--data.path", str(assets / "vision.jsonl"), "--samples", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0
    # the image's 16 tokens as one mark inside the prompt the loss ignores; the loss on the answer
    assert re.search(r"\[\[<s>user\n<image>x16What colour is the shape\?</s>\n<s>assistant\n\]\]" + answer, out), out
    assert "images: " + str((assets / "images/00000.png").resolve()) in out


def test_the_vision_parts_stay_16_bit_and_frozen_unless_asked(vision_assets, tmp_path):
    """Default: the language model's linears are 4-bit and adapted, the vision tower's and projector's neither;
    `model.quantize_vision` and `lora.adapt_vision` each change their half, in a real run."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from launcher import train
    from launcher.checkpoint.export import load_for_inference
    from launcher.config import load_config, parse_overrides
    from launcher.vision import in_vision_part, vision_parts

    assets = vision_assets("llava")
    common = ["--model.path", str(assets / "base"), "--data.path", str(assets / "vision.jsonl"), "--strategy", "ddp"]
    common += ["--train.max_steps", "1", "--data.max_seq_len", "64"]
    seen = {}
    for name, flags in (("default", []), ("both", ["--model.quantize_vision", "true", "--lora.adapt_vision", "true"])):
        train.run(load_config(None, parse_overrides([*common, "--output_dir", str(tmp_path / name), *flags])))
        model = load_for_inference(tmp_path / name)
        parts = vision_parts(model.get_base_model())
        modules = [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules()]
        seen[name] = {
            kind: {
                in_vision_part(n, parts)
                for n, m in modules
                if isinstance(m, LoraLayer if kind == "adapted" else bnb.nn.Linear4bit)
            }
            for kind in ("adapted", "4bit")
        }
    assert seen["default"] == {"adapted": {False}, "4bit": {False}}
    assert seen["both"] == {"adapted": {False, True}, "4bit": {False, True}}


def test_merge_writes_an_image_text_model_with_its_processor(vision_assets, tmp_path):
    """`qlaunch merge` of a vision-language run: the merged 16-bit model, loaded with its processor, gives the base
    plus adapter's logits on an image sample."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from launcher import train
    from launcher.checkpoint.export import CHECK_FILE, merge_adapter
    from launcher.config import load_config, parse_overrides

    assets = vision_assets("paddleocr_vl")
    run = tmp_path / "run"
    args = ["--model.path", str(assets / "base"), "--data.path", str(assets / "vision.jsonl"), "--strategy", "ddp"]
    args += ["--train.max_steps", "3", "--train.lr", "1e-2", "--data.max_seq_len", "64", "--output_dir", str(run)]
    train.run(load_config(None, parse_overrides(args)))
    merged_dir = merge_adapter(run / "adapter", tmp_path / "merged", dtype="float32")
    assert AutoProcessor.from_pretrained(merged_dir).image_processor is not None
    check = load_file(run / CHECK_FILE)
    check.pop("logits")
    assert "pixel_values" in check  # an image sample
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(assets / "base", dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**check).logits
        adapted_logits = PeftModel.from_pretrained(base, str(run / "adapter"))(**check).logits
        merged_logits = merged(**check).logits
    assert (merged_logits - adapted_logits).abs().max() < 1e-3 < (adapted_logits - base_logits).abs().max()
