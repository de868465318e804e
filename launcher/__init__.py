"""qlora-launcher: multi-GPU QLoRA with FSDP2, FSDP1, ZeRO-2, ZeRO-3 or DDP, and a memory budget per rank."""

__version__ = "0.1.0"
