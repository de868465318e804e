"""Image chat records for vision-language models, in TRL's vision format.

A record holds `messages` whose contents are strings or lists of parts (`{"type": "image"}`, `{"type": "text",
"text": ...}`) and `images`: one file path per image part, in order, relative to the dataset's directory. It is
rendered with the processor's chat template and the loss covers the assistant turns (chat.py's rule); the processor
expands each image's placeholder into as many image tokens as the image's resolution makes, and those are never
targets.

Tokenizing (once per node, tokenized.py) opens and processes every image, so a missing, unreadable or truncated
image is found before launch and named with its record; a URL is refused there too (nothing is fetched at run time).
The cache keeps each sample's image paths, not pixels: the rank that trains on a sample reads and processes its
images when it collates the micro batch (`PixelBatch`).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, DataSource
from ..vision import TOKEN_TYPE_INPUTS, ImageInputs, auto_class
from .chat import assistant_turns, check_messages, target_spans
from .labels import IGNORE_INDEX, target_tokens


@dataclass(frozen=True)
class VisionProcessor:
    """A vision-language model's processor (image processor, tokenizer, chat template) and what its data needs to
    know of the model."""

    processor: object
    model_class: type
    """The model's class: its forward says which image inputs it takes."""
    image_token_id: int
    """The id of the tokens an image's features take the place of (the config's: Gemma 3's processor names its
    begin-of-image token so)."""

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def load_processor(path: str, trust_remote_code: bool, config) -> VisionProcessor:
    """The processor saved beside the vision-language model of `config`."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(
            f"`{path}` is a vision-language model but its processor cannot be read ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:200]}). Save the model's processor beside it "
            "(`processor.save_pretrained`), with what it needs installed (Qwen2-VL's needs torchvision)."
        ) from error
    return VisionProcessor(processor, auto_class(config)._model_mapping[type(config)], config.image_token_id)


def image_parts(messages: list[dict]) -> int:
    """The `{"type": "image"}` parts of a conversation."""
    return sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def record_images(images, messages: list[dict], directory: Path, where: str) -> list[str]:
    """The record's image files as absolute paths, checked against its image parts; a ConfigError naming what is wrong."""
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ConfigError(f"{where}: `images` must be a list of file paths, got {images!r}.")
    if any("://" in p for p in images):
        url = next(p for p in images if "://" in p)
        raise ConfigError(
            f"{where}: image `{url}` is a URL; nothing is fetched at run time. Download the images and list their "
            "file paths (relative to the dataset's directory)."
        )
    wanted = image_parts(messages)
    if wanted != len(images):
        raise ConfigError(
            f'{where}: the messages hold {wanted} {{"type": "image"}} parts but `images` lists {len(images)} files; '
            "each image part takes the next file, in order."
        )
    paths = [(directory / p).resolve() for p in images]
    for path in paths:
        if not path.is_file():
            raise ConfigError(
                f"{where}: image `{path}` does not exist (paths are relative to the dataset's directory)."
            )
    return [str(p) for p in paths]


def open_image(path: str, where: str = ""):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:  # PIL's UnidentifiedImageError and "image file is truncated" are both OSErrors
        raise ConfigError(f"{where or 'Image'}: `{path}` cannot be read as an image ({error}).") from error


class VisionEncoder:
    """`datasets.map`'s batched function for image chat records: ids, labels, targets, truncated and image paths."""

    def __init__(self, vision: VisionProcessor, source: DataSource, max_seq_len: int):
        self.processor, self.source, self.max_seq_len = vision.processor, source, max_seq_len
        self.directory = Path(source.path).resolve().parent
        self.image_token = vision.image_token_id

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [] for name in ("input_ids", "labels", "targets", "truncated", "images")}
        s = self.source
        for messages, images, index in zip(batch[s.messages_field], batch[s.images_field], indices, strict=True):
            where = f"Dataset `{s.path}`, record {index}"
            check_messages(messages, where)
            paths = record_images(images, messages, self.directory, where)
            ids, labels = self.encode(messages, paths, where)
            kept_ids, kept_labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            cut_image = kept_ids.count(self.image_token) < ids.count(self.image_token)
            if cut_image or target_tokens(kept_labels) == 0:  # the model needs each image's tokens whole
                continue
            out["input_ids"].append(kept_ids)
            out["labels"].append(kept_labels)
            out["targets"].append(target_tokens(kept_labels))
            out["truncated"].append(len(ids) > self.max_seq_len)
            out["images"].append(paths)
        return out

    def encode(self, messages: list[dict], paths: list[str], where: str) -> tuple[list[int], list[int]]:
        text, spans = target_spans(self.processor, messages, assistant_turns(messages), where)
        plain = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        in_target = [any(start <= begin < end for start, end in spans) for begin, _ in plain["offset_mapping"]]
        images = [open_image(p, where) for p in paths]
        expanded = self.processor(text=[text], images=images or None, add_special_tokens=False)["input_ids"][0]
        expanded = list(expanded)
        flags = aligned_flags(plain["input_ids"], in_target, expanded)
        if [t for t, f in zip(plain["input_ids"], in_target, strict=True) if f] != [
            t for t, f in zip(expanded, flags, strict=True) if f
        ]:
            raise ConfigError(
                f"{where}: the processor's image tokens change how the assistant's text tokenizes, so its targets "
                "cannot be told apart; put the images in the user's turns."
            )
        return expanded, [
            t if f and t != self.image_token else IGNORE_INDEX for t, f in zip(expanded, flags, strict=True)
        ]


def aligned_flags(plain: list[int], flags: list[bool], expanded: list[int]) -> list[bool]:
    """`flags` of the text's tokens carried onto the tokens of the same text with the image placeholders expanded:
    tokens the expansion added or changed are never targets."""
    out = [False] * len(expanded)
    matcher = difflib.SequenceMatcher(a=plain, b=expanded, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        out[b : b + size] = flags[a : a + size]
    return out


class PixelBatch:
    """A micro batch's image inputs: its samples' images read and processed by the processor's image processor, and
    the per-token image marks the model's forward takes (`TOKEN_TYPE_INPUTS`)."""

    def __init__(self, vision: VisionProcessor):
        self.image_processor, self.image_token = vision.processor.image_processor, vision.image_token_id
        self.accepted = set(inspect.signature(vision.model_class.forward).parameters)

    def __call__(self, images: list[str], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.of_images([open_image(p) for p in images], input_ids) if images else {}

    def of_images(self, images: list, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        processed = self.image_processor(images=images, return_tensors="pt")
        batch = {k: v for k, v in processed.items() if k in self.accepted and torch.is_tensor(v)}
        for name in TOKEN_TYPE_INPUTS:
            if name in self.accepted:
                batch[name] = (input_ids == self.image_token).long()
        return batch


def planned_images(vision: VisionProcessor, rows: int, per_row: int, size: int) -> ImageInputs:
    """The image inputs of a micro batch of `rows` rows of `per_row` images of `size` x `size` pixels each, as this
    model's processor makes them (the budget's, before any data exists)."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}] * per_row}]
    text = vision.processor.apply_chat_template(messages, tokenize=False)
    image = Image.new("RGB", (size, size))
    ids = vision.processor(text=[text] * rows, images=[[image] * per_row] * rows, return_tensors="pt")["input_ids"]
    return ImageInputs.of(
        {"input_ids": ids, **PixelBatch(vision).of_images([image] * (rows * per_row), ids)}, vision.image_token_id
    )
