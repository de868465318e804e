"""The non-reentrant checkpointing checks can fail: a reentrant model is caught by both of them."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launcher.model.build import assert_non_reentrant
from support.graph_utils import graph_node_types


def tiny_llama():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.enable_input_require_grads()
    return model


@pytest.mark.parametrize("reentrant", [False, True])
def test_graph_and_guard_tell_reentrant_apart(reentrant):
    model = tiny_llama().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    loss = model(input_ids=torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss
    assert ("CheckpointFunctionBackward" in graph_node_types(loss)) == reentrant
    if reentrant:
        with pytest.raises(RuntimeError, match="reentrant"):
            assert_non_reentrant(model)
    else:
        assert_non_reentrant(model)
