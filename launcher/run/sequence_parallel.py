"""Sequence parallelism (DeepSpeed-Ulysses): each sequence split across the `train.sequence_parallel` ranks of
a group, which all see the same micro batches; the world is data-parallel groups x sequence-parallel ranks.

A rank embeds, projects and computes the loss for its slice of the tokens only, so everything a layer keeps
for backward is 1/N of the unsplit run's. Attention needs every token: before it, one all-to-all turns
(all heads, my tokens) into (my 1/N of the heads, all tokens), the model's own attention (SDPA or eager) runs
on that with a mask made from the whole sequence's position ids (causal, packed samples apart, the layer's
sliding window), and a second all-to-all turns its output back. Rotary embeddings are applied before the
first exchange, from each slice's own position ids, so every token keeps its place.

Why Ulysses and not ring attention: it wraps the attention function transformers already calls
(`AttentionInterface`), so every family's own attention, soft-capping, windows and GQA run unchanged; its two
all-to-alls exist on gloo (CPU ranks) as on NCCL; and it composes with any data-parallel strategy, because
the ranks of a group hold the same weights and only the data differs. Ring attention (torch's
`context_parallel`) needs SDPA's flash/efficient kernels and a device mesh shared with FSDP2. Its limit:
the heads (and key/value heads) must divide by N.

The labels are shifted over the whole sequence before it is split (the last token of one slice predicts the
first of the next), and the loss is normalized by the global batch's target tokens as without it.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ..config import ConfigError
from ..model.loss import IGNORE

ATTENTION = ("sdpa", "eager")
"""transformers attention implementations the split attention wraps."""
PREFIX = "ulysses_"
PER_HEAD_PARAMETERS = {"gpt_oss": "attention sinks"}
"""Families whose attention holds a parameter per head, which a rank holding 1/N of the heads cannot index."""


def refusal(config, size: int) -> str | None:
    """Why this model's attention cannot be split `size` ways (None: it can)."""
    if size == 1:
        return None
    name = type(config).__name__
    if config.model_type in PER_HEAD_PARAMETERS:
        return f"`{name}`'s attention has {PER_HEAD_PARAMETERS[config.model_type]} per head"
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        return (
            f"`{name}` has {heads} attention heads and {kv_heads} key/value heads; each rank of a group takes "
            f"1/{size} of both, so both must divide by `train.sequence_parallel` ({size})"
        )
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ATTENTION:
        return f"attention `{implementation}` is not wrapped (use one of {', '.join(ATTENTION)})"
    return None


def check(config, size: int, model_path: str, model=None) -> None:
    """A ConfigError if this model's attention (and, given `model`, its layers) cannot be split `size` ways."""
    if reason := refusal(config, size) or (size > 1 and model is not None and layers_refusal(model)):
        raise ConfigError(f"`train.sequence_parallel: {size}` cannot split `{model_path}`: {reason}.")


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def layers_refusal(model) -> str | None:
    """Why this model's layers cannot run on 1/N of each sequence: the split wraps attention only, so a layer that
    mixes tokens in another way (a convolution over the sequence: Mamba, linear attention, short convolutions), or
    an attention whose mask the split does not build (Llama-4's chunks), would see its slice alone."""
    from torch import nn

    from ..model.anatomy import decoder_layers

    config = model.config.get_text_config()
    if getattr(config, "attention_chunk_size", None):
        return "its chunked attention (`attention_chunk_size`) needs a mask the split does not build"
    others = sorted({t for t in getattr(config, "layer_types", None) or () if t not in ATTENTION_LAYER_TYPES})
    if others:
        return f"its layers of type {', '.join(others)} mix tokens outside attention, which the split wraps alone"
    modules = dict(model.named_modules())
    for layer in decoder_layers(model):
        convolutions = [n for n, m in modules[layer].named_modules() if isinstance(m, nn.Conv1d)]
        if convolutions:
            return (
                f"its layers convolve over the sequence (`{convolutions[0]}`), outside attention, which the split "
                "wraps alone"
            )
    return None


def check_world(size: int, world: int) -> None:
    """A ConfigError if a world of `world` ranks cannot be made of groups of `size`."""
    if reason := world_refusal(size, world):
        raise ConfigError(reason)


def world_refusal(size: int, world: int) -> str | None:
    """Why a world of `world` ranks cannot be made of groups of `size` (None: it can)."""
    if world % size:
        return (
            f"`train.sequence_parallel: {size}` splits each sequence across {size} ranks, so the world size must "
            f"divide by it; this run has {world} rank(s). Change --nproc/--nodes or `train.sequence_parallel`."
        )
    return None


def local_tokens(max_tokens: int, size: int) -> int:
    """Tokens a rank holds of a micro batch of `max_tokens` tokens split `size` ways."""
    return math.ceil(max_tokens / size)


@dataclass
class SequenceGroups:
    """Which group this rank is in and which slice of each sequence it holds."""

    size: int
    rank: int
    world: int
    group: dist.ProcessGroup | None = None
    split: _Split | None = field(default=None, repr=False)
    """The sequence being trained on, while a forward or its backward runs."""

    @property
    def data_rank(self) -> int:
        return self.rank // self.size

    @property
    def data_world(self) -> int:
        return self.world // self.size

    @property
    def index(self) -> int:
        return self.rank % self.size

    @contextlib.contextmanager
    def splitting(self, batch: dict[str, torch.Tensor], pad_id: int):
        """This rank's slice of `batch` (input_ids, labels, position_ids or attention_mask), to run forward
        and backward on inside the block; the model's attention works on the whole sequence meanwhile."""
        if self.size == 1:
            yield batch
            return
        ids, labels = batch["input_ids"], batch["labels"]
        length = ids.shape[1]
        pad = math.ceil(length / self.size) * self.size - length
        positions = batch.get("position_ids")
        if positions is None:  # right padding: with a causal mask no real token sees it
            positions = torch.arange(length, device=ids.device).expand_as(ids)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, pad + 1, device=ids.device)], 1)
        ids = F.pad(ids, (0, pad), value=pad_id)
        targets = F.pad(labels, (0, 1 + pad), value=IGNORE)[:, 1:]
        documents = (positions == 0).cumsum(1)
        self.split = _Split(self.group, documents if bool((documents != 1).any()) else None)
        width = ids.shape[1] // self.size
        mine = slice(self.index * width, (self.index + 1) * width)
        try:
            yield {
                "input_ids": ids[:, mine],
                "labels": targets[:, mine],
                "shift_labels": targets[:, mine],
                "position_ids": positions[:, mine],
            }
        finally:
            self.split = None


@dataclass
class _Split:
    group: dist.ProcessGroup | None
    documents: torch.Tensor | None
    """Sample number of every token of the whole sequence (packed rows), None for one sample per row."""
    masks: dict = field(default_factory=dict)

    def mask(self, window: int | None, eager: bool, dtype: torch.dtype, length: int, device) -> torch.Tensor | None:
        """The attention mask over the whole sequence (one per window and kind, shared by the layers)."""
        if window is not None and window >= length:
            window = None
        if not eager and window is None and self.documents is None:
            return None  # SDPA's own causal path
        key = (window, eager, dtype)
        if key not in self.masks:
            query = torch.arange(length, device=device)[:, None]
            allowed = (torch.arange(length, device=device)[None, :] <= query)[None]
            if window is not None:
                allowed = allowed & (torch.arange(length, device=device)[None, :] > query - window)
            if self.documents is not None:
                allowed = allowed & (self.documents[:, :, None] == self.documents[:, None, :])
            allowed = allowed[:, None]
            if eager:
                allowed = torch.where(allowed, torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min)
            self.masks[key] = allowed
        return self.masks[key]


class _AllToAll(torch.autograd.Function):
    """Scatter `scatter_dim` across the group, gather `gather_dim`; backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.exchange = (group, gather_dim, scatter_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, *ctx.exchange), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    sent = [chunk.contiguous() for chunk in x.chunk(dist.get_world_size(group), scatter_dim)]
    received = [torch.empty_like(chunk) for chunk in sent]
    dist.all_to_all(received, sent, group=group)
    return torch.cat(received, gather_dim)


def install(model, groups: SequenceGroups) -> None:
    """Makes `model`'s attention layers run split across `groups` while `groups.splitting` is active (and as
    before outside it: generation, eval, the adapter check)."""
    config = model.config
    own = getattr(config, "_attn_implementation", None) or "sdpa"
    name = PREFIX + own

    def attention(module, query, key, value, attention_mask, **kwargs):
        original = _model_eager(module) if own == "eager" else AttentionInterface._global_mapping[own]
        split = groups.split
        if split is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        # (batch, heads, my tokens, head_dim) -> (batch, my heads, all tokens, head_dim)
        query, key, value = (_AllToAll.apply(t, split.group, 1, 2) for t in (query, key, value))
        mask = split.mask(kwargs.get("sliding_window"), own == "eager", query.dtype, query.shape[2], query.device)
        out, _ = original(module, query, key, value, mask, **kwargs)
        # (batch, all tokens, my heads, head_dim) -> (batch, my tokens, heads, head_dim)
        return _AllToAll.apply(out, split.group, 1, 2), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    config._attn_implementation = name


def _model_eager(module):
    """The family's own eager attention (soft-capping, sinks: each modeling file has its own)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def new_groups(size: int) -> SequenceGroups:
    """Groups of `size` consecutive ranks (a node's ranks are consecutive: the all-to-alls stay inside it)."""
    if not dist.is_initialized():
        return SequenceGroups(1, 0, 1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if size == 1:
        return SequenceGroups(1, rank, world)
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return SequenceGroups(size, rank, world, groups[rank // size])
