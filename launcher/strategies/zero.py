"""What DeepSpeed ZeRO-2 and ZeRO-3 share: the plugin, the CPU shim, checkpoints, fp32 partitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from .. import cpu_shims
from ..config import ConfigError
from ..resources import shipped_dir
from . import handoff, portable
from .base import Strategy, torch_optimizer
from .layout import by_group, fp32_partition

CHECKPOINT_TAG = "zero"


class ZeRO(Strategy):
    stage: ClassVar[int]
    casts_parameters = True

    def plugins(self, train, device):
        from accelerate.utils import DeepSpeedPlugin

        # zero3_init_flag off: transformers never builds a quantized model under zero.Init; this
        # launcher partitions it module by module instead (ZeRO3.before_prepare).
        plugin = DeepSpeedPlugin(zero3_init_flag=False)
        ds = plugin.deepspeed_config
        # The run config is the single source of these values; the shipped JSON says "auto".
        ds["train_micro_batch_size_per_gpu"] = train.micro_batch_size
        ds["gradient_accumulation_steps"] = train.grad_accum_steps
        ds["gradient_clipping"] = train.max_grad_norm
        ds.pop("train_batch_size", None)
        self.set_offload(ds.setdefault("zero_optimization", {}), train.offload)
        if train.offload != "none":
            # The launcher's torch AdamW steps the host partition (what the budget models and checkpoints
            # hold); Accelerate would swap in DeepSpeedCPUAdam, a C++ op built at first use.
            ds["zero_force_ds_cpu_optimizer"] = False
        if ds.get("zero_optimization", {}).get("stage") != self.stage:
            raise ConfigError(
                f"The DeepSpeed config says ZeRO stage {ds.get('zero_optimization', {}).get('stage')} but the "
                f"strategy is {self.name}. Use ds_configs/{self.spec.deepspeed_config} or set the matching strategy."
            )
        return {"deepspeed_plugin": plugin}

    def before_prepare(self, model, accelerator):
        # Accelerate fills these "auto" sizes from `model.config.hidden_size`, which a multimodal model's config
        # (Gemma-3's) does not have: its text model's width, by Accelerate's formulas (the budget's too).
        hidden = model.config.get_text_config().hidden_size
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.setdefault("zero_optimization", {})
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
            ("stage3_param_persistence_threshold", 10 * hidden),
        ):
            if zero.get(key) == "auto":
                zero[key] = value
        return super().before_prepare(model, accelerator)

    def set_offload(self, zero: dict[str, Any], mode: str) -> None:
        """`train.offload` onto DeepSpeed's `zero_optimization`: the run config decides, and a JSON that
        offloads otherwise is refused rather than silently overridden."""
        offloading = [
            k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none"
        ]
        asked = "params" if "offload_param" in offloading else "optimizer"
        if offloading and asked != mode:
            raise ConfigError(
                f"The DeepSpeed config sets {' and '.join(offloading)}, which is `train.offload: {asked}`, but the "
                f"run config says `train.offload: {mode}`. Remove the offload sections from the JSON and set "
                "train.offload (--train.offload) instead: the run config is the one place it is decided."
            )
        for key, modes in (("offload_optimizer", ("optimizer", "params")), ("offload_param", ("params",))):
            if mode in modes and mode in self.spec.offload_modes:
                zero[key] = {"device": "cpu", "pin_memory": True}
            else:
                zero.pop(key, None)

    def install_on_cpu(self, accelerator, plugins):
        cpu_shims.mark_deepspeed(accelerator, plugins["deepspeed_plugin"])

    def optimizer_step(self, accelerator, model, optimizer, max_grad_norm):
        # DeepSpeed clips and steps inside `accelerator.backward` (gradient_clipping above); the norm
        # it computed there, over every rank's partition, is the one to report.
        optimizer.step()
        return float(model.get_global_grad_norm()) if accelerator.sync_gradients else None

    def save_trainable(self, model, optimizer, directory):
        # DeepSpeed's own format: each rank writes its optimizer partition. Its `latest` file is not
        # written: checkpoint/store.py names a checkpoint only after every rank has finished.
        with handoff.quant_states_hidden_from_state_dict(model):
            model.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_trainable(self, model, optimizer, directory):
        path, _ = model.load_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}.")

    def read_full_trainable(self, checkpoint_dir):
        return portable.read_deepspeed(Path(checkpoint_dir), CHECKPOINT_TAG)

    def load_full_trainable(self, model, optimizer, full):
        portable.load_into_deepspeed(model, torch_optimizer(optimizer), full)

    def read_trainable(self, directory: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(
            str(directory), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True
        )

    def shipped_zero_config(self) -> dict[str, Any]:
        """The `zero_optimization` section of the shipped DeepSpeed config for this stage."""
        return json.loads((shipped_dir("ds_configs") / self.spec.deepspeed_config).read_text())["zero_optimization"]

    def stored_policy(self, policy, mixed_precision):
        # Under bf16/fp16 DeepSpeed casts every parameter to that dtype (it keeps fp32 master copies).
        return policy.cast_to(mixed_precision)

    def bucket_bytes(self, trainable, grad_dtype, world, hidden_size):
        # The contiguous reduce bucket, allocated whole at the first backward; Accelerate fills "auto"
        # with hidden_size squared.
        size = self.shipped_zero_config().get("reduce_bucket_size", "auto")
        return (hidden_size * hidden_size if size == "auto" else int(size)) * grad_dtype.itemsize

    def held_optimizer(self, trainable, world, rank):
        parts = [fp32_partition(self.partition_numel(group, world, rank)) for group in by_group(trainable)]
        held = {name: sum(part[name] for part in parts) for name in parts[0]} if parts else {}
        if parts:  # DeepSpeed steps one group at a time and frees its fp32 gradients after its step
            held["gradients"] = max(part["gradients"] for part in parts)
        return held

    def partition_numel(self, trainable, world: int, rank: int) -> int:
        """Trainable elements in this rank's fp32 partition, padding included."""
        raise NotImplementedError
