"""The chunked loss equals the model's own: loss and every gradient, per family, chunk sizes that do
and do not divide the tokens, masked targets, packing, tied embeddings and Gemma's soft-capping."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from launcher.model.loss import chunking_refusal, install_loss
from support.families import BY_NAME

TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES = ["llama", "qwen2", "gemma2", "mixtral", "gpt-oss"]


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BY_NAME[family].config(TOKENS)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def batch(packed: bool) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 20:] = -100  # padding
    out = {"input_ids": ids, "labels": labels}
    if packed:  # two samples per row, positions restarting at the boundary
        out["position_ids"] = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    return out


def loss_and_grads(model, inputs: dict, num_items) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**inputs, num_items_in_batch=num_items, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [7, 16, 4096])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_chunked_loss_and_gradients_equal_the_model_s_own(family, chunk, packed):
    model, inputs = tiny(family), batch(packed)
    num_items = float((inputs["labels"][:, 1:] != -100).sum())
    own_loss, own_grads = loss_and_grads(model, inputs, num_items)
    install_loss(model, chunk, max_tokens=inputs["input_ids"].numel())
    loss, grads = loss_and_grads(model, inputs, num_items)
    torch.testing.assert_close(loss, own_loss, rtol=1e-6, atol=0)
    assert grads.keys() == own_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, own_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_mean_reduction_without_num_items_and_forwards_without_labels():
    model, inputs = tiny("llama"), batch(False)
    own = model(**inputs).loss
    logits = model(input_ids=inputs["input_ids"]).logits
    install_loss(model, 5, max_tokens=48)
    torch.testing.assert_close(model(**inputs).loss, own, rtol=1e-6, atol=0)
    assert torch.equal(model(input_ids=inputs["input_ids"]).logits, logits)


def test_the_chunks_keep_no_logits_for_backward():
    """What forward saves for backward: with chunks, nothing of size tokens x vocabulary."""
    model, inputs = tiny("llama"), batch(False)
    vocab_bytes = inputs["input_ids"].numel() * model.config.vocab_size * 4

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def largest_saved() -> int:
        sizes = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                sizes.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        return max(sizes)

    assert largest_saved() >= vocab_bytes
    install_loss(model, 8, max_tokens=48)
    assert largest_saved() < vocab_bytes / 3


def test_families_that_scale_their_logits_keep_their_own_loss():
    from transformers import CohereConfig, MixtralConfig

    def refusal(config):
        with torch.device("meta"):
            return chunking_refusal(AutoModelForCausalLM.from_config(config))

    assert "logit_scale" in refusal(CohereConfig(logit_scale=0.0625))
    assert "load-balancing" in refusal(MixtralConfig(output_router_logits=True))
    assert refusal(BY_NAME["gemma2"].config(TOKENS)) is None


def test_every_micro_batch_calls_the_output_layer_as_often():
    """ZeRO-3 gathers the output layer at each call: a short micro batch (a rank's last, a short packed row)
    must make as many calls as a full one, or the ranks' collectives no longer pair up."""
    model, calls = tiny("llama"), []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    install_loss(model, 7, max_tokens=48)
    for length in (24, 9, 2):
        calls.clear()
        ids = torch.randint(3, 512, (2, length))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == 2 * 7  # 7 chunks, each computed in forward and again in backward
