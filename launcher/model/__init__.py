"""The model stage: the base loaded in 4-bit, prepared for k-bit training, LoRA attached; its loss."""
