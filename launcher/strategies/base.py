"""The strategy interface: what a sharding strategy is (`StrategySpec`) and what it does (`Strategy`).

The rest of the launcher asks a strategy, never tests its name. Each strategy file holds, side by side:
  * runtime hooks: the dtypes weights are kept in (`dtype_policy`), the Accelerate plugin
    (`plugins`, `install_on_cpu`), the weight handoff around `accelerator.prepare`
    (`before_prepare`, `after_prepare`, driven by the one `shard` template below), what each rank
    holds afterwards (`local_shards`, `gather_trainable`) and checkpoint I/O;
  * byte-layout hooks, which the memory budget asks before any tensor exists: how many bytes of each
    parameter, gradient and optimizer state a rank holds, padding included (`held_weights`,
    `held_gradients`, `held_optimizer`), which dtypes parameters are stored and computed in, and
    what it gathers and buffers while training (`gathered_bytes`, `bucket_bytes`).
The defaults describe one whole copy on every rank, which is what one process and DDP hold.
"""

from __future__ import annotations

import tempfile
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Offload, RunConfig, TrainConfig
from ..dtypes import DtypePolicy
from . import handoff, portable
from .layout import ADAM_STATES, OPTIMIZER_STATE_COMPONENTS, TensorSpec, whole

OFFLOAD_MODES: tuple[str, ...] = typing.get_args(Offload)
"""`train.offload`: nothing, the optimizer state, or the parameters (frozen base and adapters) with it."""
PARAM_COMPONENTS = ("base_4bit", "frozen_dense", "experts", "biases", "norms", "lora", "shard_padding")
"""The weight components that are parameters (the quantization constants and buffers are not)."""
OFFLOAD_OPTIMIZER = ("optimizer", OPTIMIZER_STATE_COMPONENTS)
OFFLOAD_PARAMS = ("params", PARAM_COMPONENTS + OPTIMIZER_STATE_COMPONENTS)


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy is, for every module that needs to know."""

    name: str
    accelerate_config: str
    """File under accelerate_configs/ (and accelerate_configs/multinode/)."""
    deepspeed_config: str | None
    """File under ds_configs/ that `accelerate launch` is given, or None."""
    checkpoint_format: str
    """"dcp" (torch.distributed.checkpoint) or "deepspeed" (DeepSpeed's own)."""
    reshardable_checkpoints: bool
    """A checkpoint resumes on another world size."""
    shards_base: bool
    """The frozen base weights are split across ranks."""
    shards_adapter_state: bool
    """Adapter gradients and optimizer states are split across ranks."""
    offload: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """The `train.offload` modes it runs besides "none", each with the budget components it keeps in host RAM."""
    offload_note: str = "it keeps everything on the GPU"
    """Why the modes it lacks are missing: the message that refuses them."""
    sequence_parallel: bool = False
    """It runs `train.sequence_parallel` above 1 (tested against an unsplit run)."""

    @property
    def offload_modes(self) -> tuple[str, ...]:
        return ("none",) + tuple(mode for mode, _ in self.offload)

    def offloaded(self, mode: str) -> tuple[str, ...]:
        """Budget components that live in host RAM under `mode`."""
        return dict(self.offload).get(mode, ())


@dataclass
class LocalShard:
    """The part of one parameter a rank holds: elements [start, start + numel) of the flattened full tensor."""

    name: str
    local: torch.Tensor
    start: int
    full_numel: int
    trainable: bool


def clean_fqn(name: str) -> str:
    """A parameter's or module's name without the wrappers' prefixes (FSDP1 units, DDP's `module.`)."""
    from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE

    name = name.replace(f"{FSDP_WRAPPED_MODULE}.", "").removesuffix(f".{FSDP_WRAPPED_MODULE}")
    return name[len("module.") :] if name.startswith("module.") else name


def module_path(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found in model")


def torch_optimizer(optimizer):
    """The torch optimizer inside Accelerate's and DeepSpeed's wrappers."""
    while not type(optimizer).__module__.startswith("torch.optim"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_numel(optimizer) -> int:
    """Elements of optimizer state (e.g. Adam's two moments) this rank holds."""
    total = 0
    for state in torch_optimizer(optimizer).state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel()
    return total


class Strategy:
    spec: ClassVar[StrategySpec]
    linear_saves_input: ClassVar[bool] = False
    """Every nn.Linear saves its input for backward, even when its weight is frozen."""
    optimizer_after_wrap: ClassVar[bool] = False
    """The optimizer is built on the wrapped model (the library replaces the parameters)."""
    stores_4bit_as_compute_dtype: ClassVar[bool] = False
    """The packed 4-bit data must be stored as the compute dtype, whatever `quant.storage_dtype: auto` keeps
    elsewhere (FSDP1 flattens it with its linear's bias, which bitsandbytes keeps in the compute dtype)."""
    casts_parameters: ClassVar[bool] = False
    """Under mixed precision the library casts every parameter, the packed 4-bit data included, to the
    autocast dtype: a no-op only where that data is stored in it."""

    @property
    def name(self) -> str:
        return self.spec.name

    def refusal(self, cfg: RunConfig) -> str | None:
        """Why this strategy cannot run `cfg`, or None: checked before any process starts."""
        return None

    def model_refusal(self, model: nn.Module) -> str | None:
        """Why this strategy cannot shard `model` (the meta skeleton, before LoRA), or None: checked before any
        process starts."""
        return None

    # --- Runtime -------------------------------------------------------------------------------

    def dtype_policy(self, compute_dtype: torch.dtype, mixed_precision: bool) -> DtypePolicy:
        # FSDP2 and ZeRO shard each tensor on its own, so dtypes may differ: the packed 4-bit data is
        # stored as the compute dtype (a float dtype, which FSDP2 and ZeRO-3 shard and cast without
        # touching the bits, since the cast to the compute dtype is a no-op), norms and adapters stay
        # fp32. Embeddings and lm_head take the compute dtype under mixed precision (autocast bridges
        # the fp32 activations) and fp32 without it, where lm_head must match the fp32 hidden states.
        dense = compute_dtype if mixed_precision else torch.float32
        return DtypePolicy(
            quant_storage=compute_dtype,
            norm=torch.float32,
            dense=dense,
            adapter=torch.float32,
            bias=compute_dtype,
            experts=compute_dtype,
        )

    def plugins(self, train: TrainConfig, device: torch.device) -> dict[str, Any]:
        """Keyword arguments for `Accelerator(...)`: the plugin this strategy runs under, if any."""
        return {}

    def install_on_cpu(self, accelerator, plugins: dict[str, Any]) -> None:
        """CPU shim: mark the CPU Accelerator with this strategy's plugin (see launcher/cpu_shims.py)."""

    def before_prepare(self, model: nn.Module, accelerator) -> Any:
        """Before wrapping: give every rank what it needs of the source rank's weights; returns what
        `after_prepare` needs."""
        handoff.broadcast_quant_states(model, accelerator.device)
        return None

    def prepare_context(self, accelerator):
        """A context around `accelerator.prepare` (a CPU shim for FSDP1)."""
        from contextlib import nullcontext

        return nullcontext()

    def after_prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, accelerator, handed: Any) -> None:
        """After wrapping: fill what the wrapper allocated, and point `optimizer` at the wrapped parameters."""

    def shard(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], accelerator):
        """Wraps the model for this strategy; every rank ends with its shard of the source rank's weights.
        Returns (wrapped model, Accelerate's optimizer, the torch optimizer inside it)."""
        handed = self.before_prepare(model, accelerator)
        with self.prepare_context(accelerator):
            if self.optimizer_after_wrap:
                model = accelerator.prepare(model)
                optimizer = make_optimizer(model)
                prepared = accelerator.prepare(optimizer)
            else:
                optimizer = make_optimizer(model)
                model, prepared = accelerator.prepare(model, optimizer)
        self.after_prepare(model, optimizer, accelerator, handed)
        return model, prepared, optimizer

    def optimizer_step(self, accelerator, model: nn.Module, optimizer, max_grad_norm: float) -> float | None:
        """Clips (max_grad_norm > 0) and steps; returns the gradient norm over every rank's gradients,
        before clipping, on the step that updates (None on an accumulation step)."""
        norm = None
        if accelerator.sync_gradients:
            limit = max_grad_norm if max_grad_norm > 0 else float("inf")  # inf: measures, never scales
            total = accelerator.clip_grad_norm_(model.parameters(), limit)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        optimizer.step()
        return norm

    def local_shards(self, model: nn.Module) -> Iterator[LocalShard]:
        for name, param in model.named_parameters():
            yield LocalShard(name, param.detach(), 0, param.numel(), param.requires_grad)

    def gather_trainable(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full values of the trainable parameters, on CPU (a collective: every rank calls it)."""
        return {clean_fqn(n): p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    # --- Checkpoints (torch.distributed.checkpoint; DeepSpeed overrides) ----------------------

    def save_trainable(self, model: nn.Module, optimizer, directory) -> None:
        """Adapter and optimizer state, each rank writing its own shards (a collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._trainable_state(model, optimizer), checkpoint_id=str(directory))

    def load_trainable(self, model: nn.Module, optimizer, directory) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._trainable_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(
            model,
            torch_optimizer(optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=StateDictOptions(strict=False),
        )

    def read_full_trainable(self, checkpoint_dir: Path) -> portable.FullTrainable:
        """A checkpoint this strategy wrote, whole: what a run that cannot load it natively loads."""
        return portable.read_dcp(Path(checkpoint_dir) / "trainable")

    def load_full_trainable(self, model: nn.Module, optimizer, full: portable.FullTrainable) -> None:
        portable.load_into_torch(model, torch_optimizer(optimizer), full)

    def _trainable_state(self, model, optimizer) -> dict:
        """The adapter (and nothing of the frozen base) and its optimizer state, keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optimizer_state = get_state_dict(
            model, torch_optimizer(optimizer), options=StateDictOptions(ignore_frozen_params=True)
        )
        trainable = {clean_fqn(n) for n, p in model.named_parameters() if p.requires_grad}
        # bitsandbytes adds its quantization constants to the state dict as extra, non-parameter entries.
        return {"model": {k: v for k, v in model_state.items() if k in trainable}, "optimizer": optimizer_state}

    def read_trainable(self, directory: Path) -> dict[str, torch.Tensor]:
        """The full adapter weights of a checkpoint's `trainable/` folder, read in one process.

        DCP unpickles the non-tensor items itself: the caller checks them first (launcher.safe_load)."""
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(directory), f"{tmp}/state.pt")
            return torch.load(f"{tmp}/state.pt", weights_only=True)["model"]

    # --- Byte layout (launcher.memory asks these before any tensor exists) ---------------------

    def stored_policy(self, policy: DtypePolicy, mixed_precision: torch.dtype | None) -> DtypePolicy:
        """dtypes the parameters are stored in while training (`mixed_precision`: the autocast dtype, or None)."""
        return policy

    def compute_policy(self, policy: DtypePolicy, mixed_precision: torch.dtype | None) -> DtypePolicy:
        """dtypes the parameters have inside forward and backward."""
        stored = self.stored_policy(policy, mixed_precision)
        return stored.cast_to(mixed_precision) if self.casts_parameters else stored

    def held_weights(self, tensors: list[TensorSpec], world: int, rank: int) -> dict[str, int]:
        return whole(tensors)

    def held_gradients(self, trainable: list[TensorSpec], world: int, rank: int) -> int:
        return sum(t.numel * t.itemsize for t in trainable)

    def held_optimizer(self, trainable: list[TensorSpec], world: int, rank: int) -> dict[str, int]:
        """Gradients the optimizer steps with, master copies it updates, its states (AdamW)."""
        return {
            "gradients": self.held_gradients(trainable, world, rank),
            "master_weights": 0,
            "optimizer_states": ADAM_STATES * sum(t.numel * t.itemsize for t in trainable),
        }

    def gathered_bytes(self, tensors: list[TensorSpec], compute: DtypePolicy, world: int, hidden_size: int) -> int:
        """Full parameters gathered from the other ranks while a forward or backward runs."""
        return 0

    def bucket_bytes(self, trainable: list[TensorSpec], grad_dtype: torch.dtype, world: int, hidden_size: int) -> int:
        """Gradient communication buffers."""
        return 0
