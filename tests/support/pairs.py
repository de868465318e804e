"""Synthetic preference pairs: the chosen completion follows a rule, the rejected one breaks it.

Prompts are runs of the demo corpus's words (`t<n>`, each STRIDE after the one before, as the SFT data is). The
rule: a chosen completion answers in words of the first tenth of the vocabulary (t0 ... t24), a rejected one in
words of the rest, the same number of them, both at random. A tiny random model learns that from a few hundred
pairs and carries it to prompts and words it never saw together. Three forms, as TRL takes them: texts, message
lists, and message lists with the prompt implicit (whole conversations that share their first turn).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from launcher.demo import NUM_WORDS, STRIDE


def run_of_words(start: int, count: int) -> list[str]:
    return [f"t{(start + STRIDE * i) % NUM_WORDS}" for i in range(count)]


RULE_WORDS = NUM_WORDS // 10


def pair(rng: random.Random, prompt_words: int, answer_words: int) -> tuple[str, str, str]:
    prompt = run_of_words(rng.randrange(NUM_WORDS), prompt_words)
    chosen = [f"t{rng.randrange(RULE_WORDS)}" for _ in range(answer_words)]
    rejected = [f"t{rng.randrange(RULE_WORDS, NUM_WORDS)}" for _ in range(answer_words)]
    return " ".join(prompt), " " + " ".join(chosen), " " + " ".join(rejected)


def write_pairs(
    path: Path, records: int = 64, seed: int = 0, form: str = "text", prompt_words: int = 6, answer_words: int = 4
) -> Path:
    rng = random.Random(seed)
    with Path(path).open("w") as f:
        for _ in range(records):
            prompt, chosen, rejected = pair(rng, prompt_words, answer_words)
            if form == "text":
                record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            else:
                user = [{"role": "user", "content": prompt}]
                answers = [[{"role": "assistant", "content": text.strip()}] for text in (chosen, rejected)]
                if form == "chat":
                    record = {"prompt": user, "chosen": answers[0], "rejected": answers[1]}
                else:
                    record = {"chosen": user + answers[0], "rejected": user + answers[1]}
            f.write(json.dumps(record) + "\n")
    return Path(path)


def write_unpaired(path: Path, records: int = 64, seed: int = 0, prompt_words: int = 6, answer_words: int = 4) -> Path:
    """KTO's records: each pair's chosen completion labelled true or its rejected one labelled false, at random."""
    rng = random.Random(seed)
    with Path(path).open("w") as f:
        for _ in range(records):
            prompt, chosen, rejected = pair(rng, prompt_words, answer_words)
            desirable = rng.random() < 0.5
            record = {"prompt": prompt, "completion": chosen if desirable else rejected, "label": desirable}
            f.write(json.dumps(record) + "\n")
    return Path(path)
