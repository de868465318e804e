"""The training loss: next-token cross-entropy computed over chunks of tokens, never over all logits.

transformers' causal-LM forward projects every token onto the whole vocabulary, upcasts the logits to
fp32, keeps the fp32 log-probabilities for backward and then makes two fp32 tensors of the same size
in backward: at 32k tokens and Llama-3's 128,256 words that is 47 GiB, most of a long-context budget.
Here the forward of the causal LM is the model's own decoder followed by the output layer and the loss over at most `train.loss_chunk_tokens` tokens at a time, each chunk under non-reentrant
checkpointing: a chunk's logits exist only while it is computed, in forward and again in backward,
and what forward keeps is the final hidden states and the targets. The output layer is called as a
module, so FSDP's and ZeRO-3's gathering hooks, a LoRA adapter on it and tied embeddings work as in
the model's own forward. The per-token losses are the model's own (the same ops on the same values);
only the order of the sum over tokens differs.

The decoder and the output layer are found through transformers' accessors (`get_decoder()`, `base_model`,
`get_output_embeddings()`), never by attribute name: families call them `model`, `gpt_neox`, `transformer`,
`lm_head` or `embed_out`. A model whose causal-LM forward does more than decoder, output layer and loss (a head
with layers of its own, scaled logits, the router's auxiliary loss) keeps its own loss, and the run says why
(`chunking_refusal`); tests/unit/test_family_coverage.py checks the rule against every causal-LM family
transformers ships.

Forwards without labels (generation, the adapter check) run the model's own forward unchanged. Preference
objectives ask for each sequence's log-probability of its targets (`sequence_logps=True`) through the same
chunks: the per-token values are one float per token, never the logits of the batch.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from ..vision import is_vision_language

IGNORE = -100
"""The label of tokens that are not trained on (prompt, padding), as transformers uses it."""
SCALED_LOGITS = ("logit_scale", "logits_scaling", "lm_head_multiplier")
"""Config fields of families whose forward scales the logits before the loss (Cohere, Granite, Falcon-H1)."""
SOFTCAP = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
"""Config fields of the tanh soft-capping some families apply to the logits (Gemma-2/3, RecurrentGemma, xLSTM), which the
chunked loss applies as they do."""


def logit_softcap(config) -> float | None:
    return next((cap for field in SOFTCAP if (cap := getattr(config, field, None))), None)


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The module of a causal LM that turns input ids into the final hidden states: what `get_decoder()` or
    `base_model` names (a vision-language model's inner model, not its language model), else the one child that holds the input embeddings (Llama-4's causal LM names itself
    in both). It must hold the input embeddings and not be the model or its output layer."""
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    candidates = [model.get_decoder(), model.base_model, *model.children()]
    if is_vision_language(model.config):  # its inner model puts the image features into the language model's input
        candidates.insert(0, model.base_model)
    for candidate in candidates:
        if candidate is model or candidate is output or not isinstance(candidate, PreTrainedModel):
            continue
        if any(module is embeddings for module in candidate.modules()):
            return candidate
    return None


def chunking_refusal(model: nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this causal LM's own (None: it can)."""
    config = model.config.get_text_config()
    name = type(model).__name__
    for field in SCALED_LOGITS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            return f"`{name}` scales its logits (`{field}`)"
    if getattr(config, "output_router_logits", False):
        return f"`{name}` adds the router's load-balancing loss (`output_router_logits: true`)"
    if reason := _other_loss(model):
        return f"`{name}` {reason}"
    output = model.get_output_embeddings()
    if not isinstance(getattr(output, "base_layer", output), nn.Linear):  # a LoRA adapter wraps an adapted one
        return f"`{name}` has no linear output layer (`get_output_embeddings()` gives {type(output).__name__})"
    decoder = decoder_of(model)
    if decoder is None:
        return f"`{name}` names no decoder (`get_decoder()`, `base_model`) that holds its input embeddings"
    inside = {id(p) for module in (decoder, output) for p in module.parameters()}
    outside = sorted({n.rpartition(".")[0] for n, p in model.named_parameters() if id(p) not in inside})
    if outside:
        return f"`{name}` computes its logits through more than its output layer ({', '.join(outside[:3])})"
    return None


def _other_loss(model: nn.Module) -> str | None:
    """Why this model's loss is not transformers' causal-LM loss (shifted labels, summed cross-entropy over the
    counted tokens), which the chunks compute: older heads (BART's, Marian's, ...) take the labels unshifted."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return "has a forward whose source cannot be read to see which loss it computes"
    if "self.loss_function(" not in source:
        return "computes a loss of its own (not transformers' causal-LM loss)"
    from transformers.loss.loss_utils import LOSS_MAPPING

    loss_type = getattr(model, "loss_type", None)
    causal = loss_type is None or LOSS_MAPPING.get(loss_type) is LOSS_MAPPING["ForCausalLM"]  # vision-language heads
    if getattr(model, "_loss_function", None) is not None or not causal:
        return f"computes the loss `{loss_type or 'set on the model'}`, not the causal-LM loss"
    return None


def loss_chunk_tokens(model: nn.Module, train) -> int:
    """Tokens per chunk this model's loss runs with (`train.loss_chunk_tokens`), 0 for its own loss."""
    return 0 if chunking_refusal(model) else train.loss_chunk_tokens


def own_loss_note(model: nn.Module, train) -> str | None:
    """What a run whose model keeps its own loss prints at start (None: the loss is chunked as asked)."""
    if not train.loss_chunk_tokens or not (reason := chunking_refusal(model)):
        return None
    return f"the loss runs over all logits at once (the model's own), not in chunks: {reason}."


def chunk_count(max_tokens: int, chunk_tokens: int) -> int:
    """Chunks per micro batch: the same on every rank whatever its micro batch's length, because ZeRO-3
    gathers the output layer at each of its calls (a rank with one chunk more waits in a collective that
    the others never start)."""
    return max(1, math.ceil(max_tokens / chunk_tokens))


@dataclass
class SequenceLogps(ModelOutput):
    """What the forward returns with `sequence_logps=True`: each sequence's log-probability of its target tokens."""

    sequence_logps: torch.Tensor | None = None


def install_loss(model: nn.Module, chunk_tokens: int, max_tokens: int) -> None:
    """Makes `model`'s (a transformers causal LM's) forward with labels compute its loss in `chunk_count` chunks of at
    most `chunk_tokens` tokens for micro batches of up to `max_tokens` tokens (0: the model's own loss), and, called
    with `sequence_logps=True`, return each sequence's summed log-probability of its targets instead (`SequenceLogps`:
    through the same chunks, or from the model's own logits where it keeps its own loss)."""
    chunks = chunk_count(max_tokens, chunk_tokens) if chunk_tokens else 0
    own_forward = model.forward
    decoder = decoder_of(model) if chunks else None
    softcap = logit_softcap(model.config.get_text_config())

    def forward(self, *args, sequence_logps: bool = False, **kwargs):
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if (labels is None and shift_labels is None) or not (chunks or sequence_logps):
            return own_forward(*args, **kwargs)
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        if not chunks:
            return SequenceLogps(sequence_logps=target_logps(own_forward(*args, **kwargs).logits, shift_labels).sum(-1))
        hidden = decoder(*args, **kwargs)[0]
        head = self.get_output_embeddings()
        if sequence_logps:
            return SequenceLogps(sequence_logps=chunked_sequence_logps(head, hidden, shift_labels, chunks, softcap))
        return CausalLMOutputWithPast(
            loss=chunked_cross_entropy(head, hidden, shift_labels, num_items, chunks, softcap)
        )

    model.forward = types.MethodType(forward, model)


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-probability of each target under `logits` (fp32), 0 where the target is IGNORE."""
    return -F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)


def chunked_sequence_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunks: int, softcap: float | None = None
) -> torch.Tensor:
    """Each sequence's summed log-probability of its targets (`targets`: (batch, length), already shifted), the
    logits made `chunks` pieces at a time as `chunked_cross_entropy` makes them."""
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    per_token = torch.cat(
        [
            checkpoint(_chunk_logps, head, h, t, softcap, use_reentrant=False)
            for h, t in zip(flat_hidden.tensor_split(chunks), flat_targets.tensor_split(chunks), strict=True)
        ]
    )
    return per_token.view(targets.shape).sum(-1)


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    return target_logps(_softcapped(head(hidden), softcap), targets)


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def chunked_cross_entropy(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    num_items: float | torch.Tensor | None,
    chunks: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` against `targets` (already shifted; IGNORE is not counted) in `chunks`
    nearly equal pieces (some empty when there are fewer tokens), summed and divided by `num_items`, or
    averaged over the counted tokens when it is None, as transformers does."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    total = sum(
        checkpoint(_chunk_loss_sum, head, h, t, softcap, use_reentrant=False)
        for h, t in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), strict=True)
    )
    if num_items is None:
        return total / (targets != IGNORE).sum()
    if torch.is_tensor(num_items):
        num_items = num_items.to(total.device)
    return total / num_items


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    return F.cross_entropy(_softcapped(head(hidden), softcap).float(), targets, ignore_index=IGNORE, reduction="sum")
