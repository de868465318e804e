"""`qlaunch budget` of a vision-language model: images per sample and their size, through the model's processor."""

import json

from launcher import cli


def activations(capsys, *args) -> int:
    code = cli.main(["budget", "--world-size", "2", "--json", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)["ranks"][0]["components"]["activations"]


def test_each_image_adds_its_encoders_and_tokens_activations(vision_assets, capsys):
    model = ["--model", str(vision_assets("llava") / "base"), "--seq-len", "128", "--image-size", "56"]
    capsys.readouterr()  # what building the model printed
    none, one, three = (activations(capsys, *model, "--images", str(n)) for n in (0, 1, 3))
    assert none < one < three


def test_images_are_refused_for_a_text_only_model_and_when_their_tokens_overfill_a_row(
    vision_assets, demo_assets, capsys
):
    code = cli.main(["budget", "--config", str(demo_assets / "run.yaml"), "--images", "1"])
    assert code == 2 and "is a text-only causal LM" in capsys.readouterr().err
    llava = str(vision_assets("llava") / "base")
    code = cli.main(["budget", "--model", llava, "--seq-len", "20", "--images", "2", "--image-size", "56"])
    assert code == 2 and "make 32 image tokens, more than data.max_seq_len (20)" in capsys.readouterr().err
