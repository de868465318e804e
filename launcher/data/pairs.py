"""Preference records in TRL's formats: pairs of a prompt and two completions, `chosen` and `rejected`, and (KTO)
unpaired completions labelled desirable or not.

The prompt and the completions are strings, or message lists rendered with the tokenizer's chat template (the
completions' turns are the targets); without a `prompt` field, `chosen` and `rejected` are whole conversations
(or texts) and the prompt is what they share from the start, as TRL takes it. A pair is two sequences, prompt +
chosen and prompt + rejected, each with the loss on its completion only. A prompt longer than
`data.max_prompt_len` keeps its last tokens (peers cut from the left: the end of the prompt is what the
completion answers); a completion that does not fit after its prompt within `data.max_seq_len` keeps its
start. A pair whose prompt leaves no room for a completion is refused, naming the record.

KTO's records are a prompt, a completion and a boolean `label`, tokenized the same way; pairs given to KTO are
split into their chosen completion (desirable) and their rejected one (not), as TRL splits them.
"""

from __future__ import annotations

from ..config import ConfigError, DataConfig, DataSource
from .chat import check_messages, tokenize_chat
from .labels import IGNORE_INDEX, completion_start, target_tokens

COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels", "targets", "truncated")
"""The tokenized table of pairs: chosen ids and labels, rejected ids and labels, the chosen completion's target
tokens, whether either was cut."""


def pair_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features(
        {
            "input_ids": ids,
            "labels": ids,
            "rejected_input_ids": ids,
            "rejected_labels": ids,
            "targets": Value("int32"),
            "truncated": Value("bool"),
        }
    )


def unpaired_features():
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    return Features(
        {
            "input_ids": ids,
            "labels": ids,
            "desirable": Value("bool"),
            "targets": Value("int32"),
            "truncated": Value("bool"),
        }
    )


def shared_prompt(chosen, rejected):
    """TRL's implicit prompt: what `chosen` and `rejected` (texts or message lists) share from the start, a space
    before the first difference left with the completions."""
    end = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), None)
    if end is None:
        end = min(len(chosen), len(rejected))
    elif isinstance(chosen, str) and end > 0 and chosen[end - 1] == " ":
        end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


class PairEncoder:
    """`datasets.map`'s batched function for pair records (see the module docstring)."""

    def __init__(self, tokenizer, source: DataSource, cfg: DataConfig, chat: bool):
        self.tokenizer, self.source, self.chat = tokenizer, source, chat
        self.max_seq_len, self.max_prompt_len = cfg.max_seq_len, cfg.max_prompt_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [] for name in COLUMNS}
        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for record, index in zip(records, indices, strict=True):
            where = f"Dataset `{self.source.path}`, record {index}"
            chosen, rejected, cut = self.encode(record, where)
            out["input_ids"].append(chosen[0])
            out["labels"].append(chosen[1])
            out["rejected_input_ids"].append(rejected[0])
            out["rejected_labels"].append(rejected[1])
            out["targets"].append(target_tokens(chosen[1]))
            out["truncated"].append(cut)
        return out

    def encode(self, record: dict, where: str):
        s = self.source
        chosen, rejected = record.get(s.chosen_field), record.get(s.rejected_field)
        for name, value in ((s.chosen_field, chosen), (s.rejected_field, rejected)):
            if not value:
                raise ConfigError(
                    f"{where}: `{name}` is missing or empty; each pair needs a chosen and a rejected completion."
                )
        prompt = record.get(s.prompt_field)
        if prompt is None:
            prompt, chosen, rejected = shared_prompt(chosen, rejected)
            if not prompt or not chosen or not rejected:
                raise ConfigError(
                    f"{where}: without `{s.prompt_field}`, `{s.chosen_field}` and `{s.rejected_field}` must share a "
                    "prompt at the start and then differ; add the prompt as its own field."
                )
        chosen_ids, chosen_labels = self.sequence(prompt, chosen, f"{where}, `{s.chosen_field}`")
        rejected_ids, rejected_labels = self.sequence(prompt, rejected, f"{where}, `{s.rejected_field}`")
        cut = max(len(chosen_ids), len(rejected_ids)) > self.max_seq_len
        fitted = [
            self.fit(ids, labels, where)
            for ids, labels in ((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))
        ]
        return fitted[0], fitted[1], cut

    def sequence(self, prompt, completion, where: str) -> tuple[list[int], list[int]]:
        """Prompt + completion as ids, and labels with the prompt ignored."""
        if self.chat:
            check_messages(prompt, where)
            check_messages(completion, where)
            messages = list(prompt) + list(completion)
            ids, in_target = tokenize_chat(self.tokenizer, messages, list(range(len(prompt), len(messages))), where)
            return ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, in_target, strict=True)]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ConfigError(f"{where}: the prompt and completions must all be texts, or all message lists.")
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        completion_ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + self.eos
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids

    def fit(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        """The prompt cut to its last `max_prompt_len` tokens, then the whole cut to `max_seq_len` from the end."""
        prompt = completion_start(labels)
        if self.max_prompt_len and prompt > self.max_prompt_len:
            drop = prompt - self.max_prompt_len
            ids, labels, prompt = ids[drop:], labels[drop:], self.max_prompt_len
        if prompt + 1 > self.max_seq_len or prompt == len(labels):
            raise ConfigError(
                f"{where}: its prompt is {prompt} tokens, which leaves no room for a completion within "
                f"data.max_seq_len={self.max_seq_len}. Set `data.max_prompt_len` below max_seq_len to keep each "
                "prompt's last tokens, or raise data.max_seq_len."
            )
        return ids[: self.max_seq_len], labels[: self.max_seq_len]


class UnpairedEncoder(PairEncoder):
    """`datasets.map`'s batched function for KTO: labelled completions, or pairs split into one of each."""

    def __init__(self, tokenizer, source: DataSource, cfg: DataConfig, chat: bool, kind: str):
        super().__init__(tokenizer, source, cfg, chat)
        self.kind = kind

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {name: [] for name in ("input_ids", "labels", "desirable", "targets", "truncated")}
        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        for record, index in zip(records, indices, strict=True):
            for (ids, labels), desirable, cut in self.completions(
                record, f"Dataset `{self.source.path}`, record {index}"
            ):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["desirable"].append(desirable)
                out["targets"].append(target_tokens(labels))
                out["truncated"].append(cut)
        return out

    def completions(self, record: dict, where: str) -> list:
        if self.kind == "pairs":
            chosen, rejected, cut = self.encode(record, where)
            return [(chosen, True, cut), (rejected, False, cut)]
        s = self.source
        label, completion = record.get(s.label_field), record.get(s.completion_field)
        if not isinstance(label, bool):
            raise ConfigError(
                f"{where}: `{s.label_field}` is {label!r}; KTO takes true (a desirable completion) or false (an "
                "undesirable one)."
            )
        if not completion:
            raise ConfigError(f"{where}: `{s.completion_field}` is missing or empty.")
        ids, labels = self.sequence(record.get(s.prompt_field), completion, f"{where}, `{s.completion_field}`")
        return [(self.fit(ids, labels, where), label, len(ids) > self.max_seq_len)]
