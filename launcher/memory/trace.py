"""Activations traced, not modelled per family: the budget's skeleton runs a training forward on fake tensors.

The meta skeleton (the LoRA-wrapped 4-bit model as a rank without weights builds it) runs the forward of one micro
batch at the run's batch and sequence length on fake tensors (model/fake_run.py: real shapes, dtypes and device
types, no memory, no GPU). What autograd saves for backward is recorded with `saved_tensors_hooks`, storage by
storage and leaving out the parameters' own, exactly as training measures it (launcher/memory/measure.py), and
attributed to the decoder layer that was running; what the layers receive besides their hidden states (rotary cos
and sin, masks) is made once and counts once. The families' own code runs: their norms, attention (SDPA's CPU or
CUDA kernel, eager, soft-capping, sinks, sliding windows), MLPs, routers and experts, linear attention, state-space
and convolution layers, the chunked loss, peft's LoRA, non-reentrant checkpointing. A new family needs no formula.

Besides fake_run's stand-ins, the run's own:
  * ZeRO-3's linear (`linear_saves_input`) saves its input and weight, as DeepSpeed's does;
  * on CUDA, dropout keeps a bool mask (the fused kernel's); on the CPU the scaled noise, as there;
  * sequence parallelism's all-to-alls exchange chunks of the shapes they would receive.

Each kind of layer runs once, and its bytes count once per layer of that kind. Traced twice, with and without
checkpointing: what a recomputed layer saves in backward is its forward's saves without checkpointing, less its
input (which the checkpoint already keeps) and its dequantized 4-bit experts (`experts_dequantized`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import DtypePolicy
from ..model.anatomy import decoder_layers
from ..model.fake_run import DEQUANTIZED, Patch, Storages, cut_or_whole, fake_run, kernel_device, layer_kinds
from ..model.loss import install_loss
from ..vision import ImageInputs


@dataclass(frozen=True)
class TraceRun:
    """What the traced forward and backward depend on besides the model."""

    batch: int
    seq: int
    """Tokens of a row this rank holds (with sequence parallelism, 1/split of the row)."""
    checkpointing: bool
    loss_chunk: int
    """Tokens per chunk of the chunked loss, 0 for the model's own loss."""
    device: str
    """cpu or cuda: which kernels' saves the trace follows."""
    autocast: torch.dtype | None
    linear_saves_input: bool
    split: int = 1
    images: ImageInputs | None = None
    """A vision-language model's image inputs of the micro batch (None: text only)."""


@dataclass(frozen=True)
class Saved:
    """Bytes saved for backward by one micro batch's forward."""

    outside: int
    """Outside the decoder layers: the embeddings, the final norm and the loss."""
    layers: tuple[int, ...]
    """Per decoder layer, in order."""
    recompute: tuple[int, ...]
    """Per decoder layer, what it saves when recomputed in backward under checkpointing (0 without)."""

    @property
    def total(self) -> int:
        return self.outside + sum(self.layers)


def trace_saved(skeleton: nn.Module, compute: DtypePolicy, run: TraceRun, kinds: list | None = None) -> Saved:
    """What one micro batch of `run` saves on a rank whose parameters have `compute`'s dtypes inside forward
    (`kinds`: `layer_kinds` of the skeleton, if known)."""
    layers = decoder_layers(skeleton)
    kinds = kinds or layer_kinds(skeleton, layers)
    kept, traced = cut_or_whole(
        skeleton, layers, kinds, lambda kept: (kept, _trace(skeleton, compute, run, layers, kept))
    )
    # Each layer counts as the kept layer it stands for: itself, or the first of its kind.
    position = [kept.index(i if i in kept else kinds.index(kinds[i])) for i in range(len(layers))]
    recompute = (
        _trace(skeleton, compute, _without_checkpointing(run), layers, kept).recompute
        if run.checkpointing
        else (0,) * len(kept)
    )
    return Saved(
        outside=traced.outside,
        layers=tuple(traced.layers[p] for p in position),
        recompute=tuple(recompute[p] for p in position),
    )


def _without_checkpointing(run: TraceRun) -> TraceRun:
    return TraceRun(**{**run.__dict__, "checkpointing": False})


@dataclass(frozen=True)
class _Traced:
    outside: int
    layers: tuple[int, ...]
    """Per traced (representative) layer."""
    recompute: tuple[int, ...]


def _trace(skeleton: nn.Module, compute: DtypePolicy, run: TraceRun, layers: list[str], kept: list[int]) -> _Traced:
    device = kernel_device(run.device)
    with (
        _checkpointing(skeleton, run.checkpointing),
        _chunked_loss(skeleton, run),
        fake_run(skeleton, layers, kept, device, compute, _patches(run)) as (traced_layers, fakes),
    ):
        recorder = _Recorder(traced_layers, list(fakes.values()))
        ids = torch.zeros((run.batch, run.seq), dtype=torch.long, device=device)
        images = run.images.forward_inputs(ids) if run.images else {}
        autocast = torch.autocast(device, dtype=run.autocast) if run.autocast else contextlib.nullcontext()
        # Forward only: what training measures is what its forward saves (backward's recomputations keep their
        # tensors inside the checkpoints).
        with recorder.hooks(), autocast, torch.autograd.graph.saved_tensors_hooks(recorder.pack, recorder.unpack):
            skeleton(input_ids=ids, labels=ids, use_cache=False, **images)
    return recorder.result(len(kept))


class _Recorder:
    """Saved tensors by storage, attributed to the decoder layer running when they were saved."""

    def __init__(self, layers: list[nn.Module], weights: list[torch.Tensor]):
        self.layers = layers
        self.weights = Storages()
        for weight in weights:
            self.weights.note(weight)
        self.saved = Storages()
        """Each saved storage's entry in `entries`."""
        self.entries: list[tuple[int, int | None, bool]] = []
        """(bytes, layer or None, whether its layer saves it again when recomputed), a storage each."""
        self.inputs = Storages()
        """Each layer's input -> the layer."""
        self.shared = Storages()
        """The other tensors the layers receive."""
        self.running: int | None = None

    def pack(self, tensor: torch.Tensor):
        if tensor not in self.weights and tensor not in self.saved:
            # What a layer receives besides its hidden states (rotary cos and sin, the mask) is made once for all
            # layers: it counts once, outside them.
            owner = None if tensor in self.shared else self.running
            recomputed = owner is not None and self.inputs.get(tensor) != owner and tensor not in DEQUANTIZED
            self.saved.note(tensor, len(self.entries))
            self.entries.append((tensor.untyped_storage().nbytes(), owner, recomputed))
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(self._started, index), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._finished))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _started(self, index: int, module, args, kwargs):
        self.running = index
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden not in self.inputs:
            self.inputs.note(hidden, index)
        others = [*args[1:], *(v for k, v in kwargs.items() if k != "hidden_states" or args)]
        for tensor in torch.utils._pytree.tree_leaves(others):
            if isinstance(tensor, torch.Tensor):
                self.shared.note(tensor)

    def _finished(self, module, args, output):
        self.running = None

    def result(self, count: int) -> _Traced:
        layers, recompute, outside = [0] * count, [0] * count, 0
        for nbytes, layer, recomputed in self.entries:
            if layer is None:
                outside += nbytes
                continue
            layers[layer] += nbytes
            if recomputed:
                recompute[layer] += nbytes
        return _Traced(outside, tuple(layers), tuple(recompute))


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """The skeleton's layers checkpointed (non-reentrant, as prepared) or not, for this trace."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    before = [m.gradient_checkpointing for m in layers]
    model.train()
    for module, value in zip(layers, before, strict=True):
        module.gradient_checkpointing = value and enabled
    try:
        yield
    finally:
        for module, value in zip(layers, before, strict=True):
            module.gradient_checkpointing = value


@contextlib.contextmanager
def _chunked_loss(skeleton: nn.Module, run: TraceRun) -> Iterator[None]:
    """The chunked loss the ranks install (none for the model's own loss), for this trace."""
    base = skeleton.get_base_model() if hasattr(skeleton, "get_base_model") else skeleton
    if not run.loss_chunk:
        yield
        return
    had = "forward" in vars(base)
    # Two chunks save what any number saves (each chunk's checkpoint keeps views of the same hidden states and
    # targets), at a fraction of the trace's time on long sequences.
    tokens = run.batch * run.seq
    install_loss(base, max(run.loss_chunk, -(-tokens // 2)), tokens)
    try:
        yield
    finally:
        if not had:
            del base.forward


class _SavingLinear(torch.autograd.Function):
    """DeepSpeed ZeRO-3's linear: saves its input and weight whether or not the weight is trained."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _plain_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(grad.dtype))
        grad_w = (
            grad.reshape(-1, grad.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1])) if weight.requires_grad else None
        )
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if bias is not None and bias.requires_grad else None
        return grad_x, grad_w, grad_b


_plain_linear = F.linear


def _zero3_linear(x, weight, bias=None):
    return _SavingLinear.apply(x, weight, bias)


def _bool_mask_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    if not training or p == 0:
        return x
    return torch.ops.aten.native_dropout(x, p, True)[0]


def _exchange(x: torch.Tensor, size: int, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    sent = [chunk.contiguous() for chunk in x.chunk(size, scatter_dim)]
    return torch.cat([torch.empty_like(chunk) for chunk in sent], gather_dim)


def _patches(run: TraceRun) -> tuple[Patch, ...]:
    from ..run import sequence_parallel

    patches: list[Patch] = []
    if run.linear_saves_input:
        patches.append((F, "linear", _zero3_linear))
    if run.device == "cuda":
        patches.append((F, "dropout", _bool_mask_dropout))
    if run.split > 1:
        patches.append((sequence_parallel, "_all_to_all", lambda x, group, s, g: _exchange(x, run.split, s, g)))
    return tuple(patches)
