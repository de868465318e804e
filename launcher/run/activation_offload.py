"""Activation offload (`train.activation_offload`): what forward saves for backward waits in host RAM.

With non-reentrant checkpointing, what a training forward saves is each decoder layer's input, the final
hidden states and the loss's targets: the `activations` row of the budget, which grows with the context
length and the number of layers. These hooks copy each such tensor into host RAM as it is saved (pinned on
CUDA) and bring it back to the device when backward needs it, so the GPU holds one layer's input at a time
during backward instead of all of them. The layers recomputed in backward save their tensors through
checkpointing's own hooks, on the device, as without offload. Weights (parameters, gathered or not) are
never copied: backward reads them where they are.

The copies are not overlapped with compute (no side stream): on a GPU they cost a PCIe round trip of the
`activations` bytes per micro batch. On CPU ranks the "host" is the same memory, but the copy is made all
the same, so the tests exercise the exact code path a GPU run takes.
"""

from __future__ import annotations

import torch
from torch import nn


class ActivationOffload:
    def __init__(self, device: torch.device):
        self.pin = device.type == "cuda"

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter) or tensor.device.type == "meta":
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=self.pin)
        host.copy_(tensor, non_blocking=self.pin)
        return tensor.device, host

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin)

    def install(self, model: nn.Module) -> None:
        """Every forward of `model` runs inside these hooks (the first step's memory probe chains to them)."""
        hooks = []

        def started(module, args):
            hooks.append(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
            hooks[-1].__enter__()

        def finished(module, args, output):
            hooks.pop().__exit__(None, None, None)

        model.register_forward_pre_hook(started)
        model.register_forward_hook(finished)
