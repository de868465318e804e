"""Sequence parallelism without a process group: how a batch is split, and the whole-sequence attention mask
the split attention builds, against transformers' own on the same packed rows, for several families (SDPA,
a sliding window, eager soft-capped attention, GQA). The exchanges themselves run on 2 ranks in
tests/integration/test_sequence_parallel.py."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.model.loss import IGNORE
from launcher.run import sequence_parallel
from launcher.run.sequence_parallel import SequenceGroups, _Split, install, local_tokens, refusal, world_refusal
from support.families import BY_NAME, VOCAB


def packed_positions(lengths: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in lengths])


def test_a_rows_slices_join_into_the_padded_row_with_labels_shifted_across_them():
    ids = torch.arange(1, 12).repeat(2, 1)  # 11 tokens: padded to 12 for 2 ranks
    labels = ids.clone()
    labels[:, 0] = IGNORE
    positions = packed_positions([[5, 6], [11]])
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    slices = []
    for rank in range(2):
        groups = SequenceGroups(2, rank, 4)
        assert (groups.data_rank, groups.data_world, groups.index) == (0, 2, rank)
        with groups.splitting(batch, pad_id=0) as mine:
            slices.append(mine)
            assert groups.split.documents is not None  # row 0 holds two samples
        assert groups.split is None
    joined = {key: torch.cat([s[key] for s in slices], 1) for key in slices[0]}
    assert joined["input_ids"].shape == (2, 12) and joined["input_ids"][:, -1].eq(0).all()
    # Each token's target is the next token of the whole row, the last one's is nothing.
    assert joined["shift_labels"][:, :10].equal(ids[:, 1:]) and joined["shift_labels"][:, 10:].eq(IGNORE).all()
    assert joined["position_ids"][1].tolist() == list(range(12))  # the padding continues the last sample
    assert joined["position_ids"][0].tolist() == [*range(5), *range(7)]


def test_one_sample_per_row_needs_no_mask_and_one_rank_changes_nothing():
    ids = torch.arange(8).repeat(1, 1)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with SequenceGroups(2, 1, 2).splitting(batch, pad_id=0) as mine:
        assert mine["position_ids"].tolist() == [[4, 5, 6, 7]]
    groups = SequenceGroups(2, 0, 2)
    with groups.splitting(batch, pad_id=0):
        assert groups.split.documents is None
        assert groups.split.mask(None, False, torch.float32, 8, "cpu") is None  # SDPA's own causal path
    with SequenceGroups(1, 0, 1).splitting(batch, pad_id=0) as same:
        assert same is batch


FAMILY_ROWS = [
    ("llama", [[25, 15], [10, 30]]),  # GQA, SDPA
    ("mistral", [[25, 15], [10, 30]]),  # sliding window 16 inside samples longer than it
    ("gemma2", [[25, 15], [40]]),  # eager, soft-capped, alternating windows
    ("qwen3", [[40], [40]]),  # one sample per row: SDPA's causal path
]


@pytest.mark.parametrize("family,lengths", FAMILY_ROWS, ids=[f for f, _ in FAMILY_ROWS])
def test_the_split_attention_sees_what_the_models_own_attention_sees(monkeypatch, family, lengths):
    """With a group of one rank the exchanges are the identity: what is left is the mask over the whole sequence
    (causal, packed samples apart, each layer's window), which must give the model's own logits."""
    monkeypatch.setattr(sequence_parallel, "_all_to_all", lambda x, group, scatter, gather: x)
    config = BY_NAME[family].config(dict(bos_token_id=1, eos_token_id=2, pad_token_id=0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    positions = packed_positions(lengths)
    ids = torch.randint(3, VOCAB, positions.shape)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        groups = SequenceGroups(1, 0, 1)
        install(model, groups)
        assert model.config._attn_implementation.startswith(sequence_parallel.PREFIX)
        documents = (positions == 0).cumsum(1)
        groups.split = _Split(None, documents if bool((documents != 1).any()) else None)
        got = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        groups.split = None
        unsplit = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unsplit, expected, rtol=0, atol=0)


def test_models_and_worlds_that_cannot_be_split_are_named():
    llama = BY_NAME["llama"].config({})  # 4 heads, 2 key/value heads
    assert refusal(llama, 1) is None and refusal(llama, 2) is None
    assert "2 key/value heads" in refusal(llama, 4)
    assert "sinks" in refusal(BY_NAME["gpt-oss"].config({}), 2)
    assert world_refusal(2, 4) is None and "3 rank(s)" in world_refusal(2, 3)
    assert local_tokens(4097, 2) == 2049
