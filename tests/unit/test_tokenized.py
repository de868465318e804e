"""Tokenized data: the per-node cache, mixing several sources by weight, the eval split, and packing
(rows within max_seq_len, and the same loss as the samples unpacked, on several model families)."""

import contextlib
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch

from launcher.config import ConfigError, DataConfig, DataSource, load_config
from launcher.data.batches import GlobalBatches, Rows, pack
from launcher.data.labels import IGNORE_INDEX, target_tokens
from launcher.data.records import features
from launcher.data.tokenized import (
    SourceData,
    TokenizedData,
    load_tokenized,
    tokenized_source,
    tokenizer_fingerprint,
)
from launcher.demo import build_tokenizer
from support.families import BY_NAME


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_texts(path, n: int, offset: int = 0):
    path.write_text(
        "".join(
            json.dumps({"text": " ".join(f"t{(i + j) % 90}" for j in range(3 + i % 7))}) + "\n"
            for i in range(offset, offset + n)
        )
    )
    return path


def every_sample(data: TokenizedData) -> list[tuple[list[int], list[int]]]:
    return [data.sample(i) for i in range(len(data))]


def test_second_start_reads_the_cache_and_sees_the_same_batches(tmp_path, tokenizer):
    cfg = DataConfig(path=str(write_texts(tmp_path / "d.jsonl", 40)), cache_dir=str(tmp_path / "cache"))
    first, _ = load_tokenized(cfg, tokenizer, seed=3)
    second, _ = load_tokenized(cfg, tokenizer, seed=3)
    assert [s.cache_hit for s in first.sources] == [False] and [s.cache_hit for s in second.sources] == [True]
    assert every_sample(first) == every_sample(second) and len(first) == 40
    batches = GlobalBatches(len(first), micro=2, accum=2, world=2, seed=3)
    rows = [Rows(d, packing=False, max_seq_len=512) for d in (first, second)]
    for step in range(3):
        collated = [r.collate(batches.rank_micro_batches(step, 1)[0], pad_id=0) for r in rows]
        assert all(torch.equal(collated[0][k], collated[1][k]) for k in collated[0])
    # Only the Arrow file on disk holds the tokens: the table is memory-mapped, not read into the process.
    assert type(second.sources[0].table.data).__name__ == "MemoryMappedTable"


def test_a_changed_data_file_or_tokenizer_is_tokenized_again(tmp_path, tokenizer):
    import copy

    path = write_texts(tmp_path / "d.jsonl", 20)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    load_tokenized(cfg, tokenizer, seed=0)
    write_texts(path, 21, offset=5)
    changed, _ = load_tokenized(cfg, tokenizer, seed=0)
    assert not changed.sources[0].cache_hit and len(changed) == 21
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["t5 t6"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert not load_tokenized(cfg, other, seed=0)[0].sources[0].cache_hit
    longer = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_seq_len=4)
    assert not load_tokenized(longer, tokenizer, seed=0)[0].sources[0].cache_hit
    assert load_tokenized(cfg, tokenizer, seed=0)[0].sources[0].cache_hit


def test_a_record_refused_mid_way_leaves_no_entry_behind(tmp_path, tokenizer):
    path = tmp_path / "tokens.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 5]}) + "\n" + json.dumps({"input_ids": [1, len(tokenizer)]}) + "\n")
    with pytest.raises(ConfigError, match="record 1: `input_ids` holds ids outside the tokenizer's vocabulary"):
        load_tokenized(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), tokenizer, seed=0)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def _tokenize_in_child(path: str, cache: str, results) -> None:
    source = DataSource(path=path)
    data = tokenized_source(source, build_tokenizer(), DataConfig(path=path, cache_dir=cache), "same tokenizer")
    results.put(data.cache_hit)


def test_one_process_per_node_tokenizes_the_others_wait_and_read(tmp_path):
    path = write_texts(tmp_path / "d.jsonl", 2000)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [
        context.Process(target=_tokenize_in_child, args=(str(path), str(tmp_path / "cache"), results)) for _ in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert sorted(results.get(timeout=5) for _ in children) == [False, True, True]
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]


def test_chat_records_tokenized_by_several_workers_match_one(tmp_path):
    from support.families import TURNS_TEMPLATE
    from support.families import build_tokenizer as build_bpe_tokenizer

    words = [f"w{i}" for i in range(40)]
    tokenizer = build_bpe_tokenizer([" ".join(words)] * 4)
    chats = [
        {"messages": [{"role": "user", "content": " ".join(words[i : i + 5])}, {"role": "assistant", "content": w}]}
        for i, w in enumerate(words)
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    results = []
    for workers in (1, 2):
        cfg = DataConfig(
            path=str(path),
            chat_template=TURNS_TEMPLATE,
            tokenize_workers=workers,
            cache_dir=str(tmp_path / f"c{workers}"),
        )
        data, _ = load_tokenized(cfg, tokenizer, seed=0)
        results.append(every_sample(data))
        assert len(list((tmp_path / f"c{workers}").glob("*/*.arrow"))) == workers
    assert results[0] == results[1] and len(results[0]) == len(chats)


def test_sources_mix_by_weight_deterministically(tmp_path, tokenizer):
    a = DataSource(path=str(write_texts(tmp_path / "a.jsonl", 10)), weight=2.0)
    b = DataSource(path=str(write_texts(tmp_path / "b.jsonl", 30, offset=50)), weight=0.5)
    cfg = DataConfig(datasets=[a, b], cache_dir=str(tmp_path / "cache"))
    train, held = load_tokenized(cfg, tokenizer, seed=1)
    assert held is None and len(train) == 2 * 10 + 15
    assert np.bincount(train.parts).tolist() == [20, 15]
    assert sorted(np.bincount(train.rows[train.parts == 0]).tolist()) == [2] * 10  # each record of a twice
    assert len(set(train.rows[train.parts == 1].tolist())) == 15  # a seeded half of b, none twice
    assert every_sample(load_tokenized(cfg, tokenizer, seed=1)[0]) == every_sample(train)
    assert load_tokenized(cfg, tokenizer, seed=2)[0].rows.tolist() != train.rows.tolist()


def test_eval_split_is_held_out_from_training(tmp_path, tokenizer):
    path = write_texts(tmp_path / "d.jsonl", 50)
    cfg = DataConfig(path=str(path), eval_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    train, held = load_tokenized(cfg, tokenizer, seed=0)
    assert (len(train), len(held)) == (45, 5)
    assert not set(train.rows.tolist()) & set(held.rows.tolist())
    eval_file = DataConfig(path=str(path), eval_path=str(write_texts(tmp_path / "e.jsonl", 7)), cache_dir=cfg.cache_dir)
    train, held = load_tokenized(eval_file, tokenizer, seed=0)
    assert (len(train), len(held)) == (50, 7)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data.path": "a.jsonl", "data.datasets": [{"path": "b.jsonl"}]}, "Both `data.path` and `data.datasets`"),
        ({"data.datasets": [{"path": "b.jsonl", "weight": 0}]}, r"`data.datasets\[0\].weight` must be positive"),
        ({"data.eval_fraction": 1.0}, "must be in \\[0, 1\\)"),
        ({"data.eval_fraction": 0.1, "data.eval_path": "e.jsonl"}, "not both"),
    ],
)
def test_bad_data_options_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, list(overrides.items()))


def in_memory(samples: list[tuple[list[int], list[int]]]) -> TokenizedData:
    from datasets import Dataset

    table = Dataset.from_dict(
        {
            "input_ids": [ids for ids, _ in samples],
            "labels": [labels for _, labels in samples],
            "targets": [target_tokens(labels) for _, labels in samples],
            "truncated": [False] * len(samples),
        },
        features=features(),
    )
    source = SourceData(DataSource(path="memory"), table, len(samples), 0, 0, "", False)
    return TokenizedData([source], np.zeros(len(samples), dtype=np.int64), np.arange(len(samples)))


def test_packing_fills_rows_within_max_seq_len_with_every_sample_once():
    lengths = np.random.default_rng(0).integers(5, 100, size=500)
    rows = pack(lengths, capacity=128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert max(lengths[row].sum() for row in rows) <= 128
    assert lengths.sum() / (len(rows) * 128) > 0.95
    assert pack(lengths, 128) == rows


def test_a_packed_row_restarts_positions_and_ignores_each_samples_first_token():
    data = in_memory([([1, 5, 6], [1, 5, 6]), ([1, 7], [IGNORE_INDEX, 7]), ([1, 8, 9, 4], [1, 8, 9, 4])])
    packed = Rows(data, packing=True, max_seq_len=8)
    assert len(packed) == 2 and packed.targets(range(2)) == int(data.targets.sum()) == 6
    batch = packed.collate([0, 1], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: the positions mark samples
    # Best fit, longest first: samples 2 (4 tokens) and 0 (3) share a row, kept in data order; 1 starts the next.
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 8, 9, 4], [1, 7, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]
    expected = [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 8, 9, 4], [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 5]
    assert batch["labels"].tolist() == expected
    unpacked = Rows(data, packing=False, max_seq_len=8).collate([0, 1], pad_id=0)
    assert unpacked["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_a_packed_row_has_the_loss_of_its_samples_unpacked(family):
    """Sliding windows (gemma3, mistral: 16 tokens) and biases (qwen2) included: attention stays inside each sample."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = BY_NAME[family].config({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (30, 7, 21, 12, 40):
        ids = torch.randint(3, config.vocab_size, (length,), generator=generator).tolist()
        samples.append((ids, [IGNORE_INDEX] * (length // 3) + ids[length // 3 :]))
    data = in_memory(samples)
    packed, unpacked = Rows(data, packing=True, max_seq_len=128), Rows(data, packing=False, max_seq_len=128)
    assert len(packed) == 1

    def loss_sum(rows: Rows, indices: list[int]) -> float:
        with torch.no_grad():
            return model(**rows.collate(indices, pad_id=0), num_items_in_batch=1, use_cache=False).loss.item()

    separately = sum(loss_sum(unpacked, [i]) for i in range(len(samples)))
    assert loss_sum(packed, [0]) == pytest.approx(separately, rel=1e-5)
    assert loss_sum(unpacked, list(range(len(samples)))) == pytest.approx(separately, rel=1e-5)


def test_a_cache_that_cannot_be_written_costs_the_next_start_not_this_one(tmp_path, tokenizer, capsys):
    """A full disk (a filled tmpfs; the tests run as root) or a cache path that is a file: tokenized in memory
    with a note, the same samples as a cached start."""
    import subprocess

    data = str(write_texts(tmp_path / "d.jsonl", 40))
    expected, _ = load_tokenized(DataConfig(path=data, cache_dir=str(tmp_path / "roomy")), tokenizer, seed=3)
    full = tmp_path / "full"
    full.mkdir()
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)]).returncode == 0
    try:
        with contextlib.suppress(OSError), (full / "filler").open("wb") as filler:
            filler.write(b"x" * 2**20)
        blocked = tmp_path / "a-file"
        blocked.write_text("not a directory")
        for cache in (full / "cache", blocked):
            capsys.readouterr()
            got, _ = load_tokenized(DataConfig(path=data, cache_dir=str(cache)), tokenizer, seed=3)
            assert every_sample(got) == every_sample(expected) and not got.sources[0].cache_hit
            assert f"could not write the tokenized data into the cache {cache}" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(full)], check=False)
