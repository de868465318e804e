"""Data loading, tokenization and the deterministic distributed sampler."""

import json

import pandas
import pytest

from launcher.config import ConfigError, DataConfig
from launcher.data.batches import GlobalBatches
from launcher.data.labels import IGNORE_INDEX
from launcher.data.records import load_records, record_kind
from launcher.data.records import tokenize as tokenize_records
from launcher.demo import build_tokenizer
from support.families import TURNS_TEMPLATE
from support.families import build_tokenizer as build_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tokenize(records, tokenizer, cfg: DataConfig):
    """Token ids and labels of each kept record, tokenized in memory as the cache does on disk."""
    table = tokenize_records(records, tokenizer, cfg.sources()[0], cfg)
    return table["input_ids"][:], table["labels"][:]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_completion_puts_loss_on_the_completion_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "t1 t2 t3", "completion": "t4 t5"}])
    ids, labels = (
        column[0]
        for column in tokenize(load_records(DataConfig(path=str(path))), tokenizer, DataConfig(path=str(path)))
    )
    prompt_len = 1 + 3  # <s> and three words
    assert ids[-1] == tokenizer.eos_token_id
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]


def test_text_records_train_on_every_token_and_are_truncated(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": " ".join(f"t{i}" for i in range(50))}])
    cfg = DataConfig(path=str(path), max_seq_len=16)
    input_ids, labels = tokenize(load_records(cfg), tokenizer, cfg)
    assert len(input_ids[0]) == 16 and labels[0] == input_ids[0]


@pytest.mark.parametrize(
    "suffix,writer",
    [
        (".parquet", lambda p, rows: pandas.DataFrame(rows).to_parquet(p)),
        (".txt", lambda p, rows: p.write_text("\n".join(r["text"] for r in rows) + "\n")),
        (".json", lambda p, rows: p.write_text(json.dumps(rows))),
    ],
)
def test_local_formats(tmp_path, tokenizer, suffix, writer):
    path = tmp_path / f"data{suffix}"
    writer(path, [{"text": "t1 t2 t3"}, {"text": "t4 t5"}])
    cfg = DataConfig(path=str(path))
    assert len(tokenize(load_records(cfg), tokenizer, cfg)[0]) == 2


def test_missing_fields_name_what_is_there_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(
        ConfigError, match=r"has fields \['answer', 'question'\].*`text`.*`prompt` and `completion`.*data.text_field"
    ):
        record_kind(load_records(DataConfig(path=str(path))).column_names, DataConfig(path=str(path)))


def test_sampler_is_deterministic_and_world_size_invariant():
    two_ranks = GlobalBatches(100, micro=2, accum=3, world=2, seed=7)
    one_rank = GlobalBatches(100, micro=4, accum=3, world=1, seed=7)
    for step in range(2 * two_ranks.steps_per_epoch + 1):  # crosses two epoch boundaries
        merged = [
            a + b
            for a, b in zip(two_ranks.rank_micro_batches(step, 0), two_ranks.rank_micro_batches(step, 1), strict=True)
        ]
        assert merged == one_rank.rank_micro_batches(step, 0)
    assert GlobalBatches(100, 2, 3, 2, seed=7).step_samples(5) == two_ranks.step_samples(5)
    assert GlobalBatches(100, 2, 3, 2, seed=8).step_samples(5) != two_ranks.step_samples(5)
    epoch = [i for s in range(two_ranks.steps_per_epoch) for i in two_ranks.step_samples(s)]
    assert len(set(epoch)) == len(epoch) == two_ranks.steps_per_epoch * 12  # no sample twice in an epoch


CHAT = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "What is two and two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three and three?"},
    {"role": "assistant", "content": "Six, as it was before."},
]


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [m["content"] for m in CHAT] + ["system user assistant"] * 4
    return build_bpe_tokenizer(texts)


def target_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The contiguous runs of target tokens."""
    runs, previous = [], False
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return runs


def test_chat_records_train_on_every_assistant_turn_and_nothing_else(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    cfg = DataConfig(path=str(path), chat_template=TURNS_TEMPLATE)
    records = load_records(cfg)
    assert record_kind(records.column_names, cfg) == "messages"
    ids, labels = (column[0] for column in tokenize(records, chat_tokenizer, cfg))
    rendered = chat_tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # Token by token: the targets are each assistant turn's words and its closing </s>, in order.
    expected = [chat_tokenizer(f"{m['content']}</s>\n", add_special_tokens=False)["input_ids"] for m in CHAT[2::2]]
    assert target_runs(ids, labels) == expected


def test_conversational_prompt_completion_trains_on_the_completion_turns(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": CHAT[:4], "completion": CHAT[4:]}])
    cfg = DataConfig(path=str(path), chat_template=TURNS_TEMPLATE)
    input_ids, labels = tokenize(load_records(cfg), chat_tokenizer, cfg)
    expected = [chat_tokenizer(f"{CHAT[4]['content']}</s>\n", add_special_tokens=False)["input_ids"]]
    assert target_runs(input_ids[0], labels[0]) == expected  # the prompt's assistant turn is context


def test_chat_data_without_a_template_or_with_an_unstable_one_is_refused(tmp_path, chat_tokenizer):
    import copy

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template. Set `data.chat_template`"):
        tokenize(load_records(DataConfig(path=str(path))), tokenizer, DataConfig(path=str(path)))
    # Renders only the last assistant turn in full, as templates that drop earlier reasoning do.
    unstable = (
        "{% for m in messages %}<s>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}</s>\n"
        "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    cfg = DataConfig(path=str(path), chat_template=unstable)
    with pytest.raises(ConfigError, match="record 0: the chat template renders turn 2 differently"):
        tokenize(load_records(cfg), tokenizer, cfg)


def test_qlaunch_data_shows_counts_masking_and_padding(tmp_path, chat_tokenizer, capsys):
    from launcher import cli

    chat_tokenizer.save_pretrained(tmp_path / "tokenizer")
    long = {"messages": [{"role": "user", "content": "two " * 150}, {"role": "assistant", "content": "Four."}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:3]}, long])
    args = ["--model.path", str(tmp_path / "tokenizer"), "--data.path", str(path), "--data.max_seq_len", "96"]
    template = tmp_path / "turns.jinja"
    template.write_text(TURNS_TEMPLATE)
    assert cli.main(["data", *args, "--data.chat_template", str(template), "--json", "--samples", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # The long record's only assistant turn lies past max_seq_len: dropped, and said why.
    (source,) = summary["sources"]
    assert (source["records_read"], source["records_kept"]) == (3, 2)
    assert source["records_dropped_no_target_within_max_seq_len"] == 1
    assert [[s["text"] for s in sample["sequence"] if s["loss"]] for sample in summary["samples"]] == [
        ["Four.</s>\n", "Six, as it was before.</s>\n"],
        ["Four.</s>\n"],
    ]
    assert 0 < summary["target_tokens"] < summary["tokens"] and 0 < summary["row_efficiency"] <= 1

    assert cli.main(["data", *args, "--data.chat_template", str(template)]) == 0
    text = capsys.readouterr().out
    assert "[[<s>system\nYou answer in few words.</s>\n<s>user\nWhat is two and two?</s>\n<s>assistant\n]]Four." in text
    assert "3 read, 2 kept, 1 dropped (no target token within max_seq_len 96), 0 truncated" in text


def test_pre_tokenized_records_are_taken_as_they_are(tmp_path, tokenizer):
    records = [{"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7]}, {"input_ids": [1, 8, 9]}]
    path = write_jsonl(tmp_path / "tokens.jsonl", records)
    cfg = DataConfig(path=str(path))
    input_ids, labels = tokenize(load_records(cfg), tokenizer, cfg)
    assert input_ids == [[1, 5, 6, 7], [1, 8, 9]]
    assert labels == [[IGNORE_INDEX, IGNORE_INDEX, 6, 7], [1, 8, 9]]  # no labels: the loss on every token

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, len(tokenizer)]}])
    with pytest.raises(ConfigError, match="record 0: `input_ids` holds ids outside the tokenizer's vocabulary"):
        tokenize(load_records(DataConfig(path=str(bad))), tokenizer, DataConfig(path=str(bad)))
