"""The peer recipe: transformers' Trainer + peft QLoRA, as in peft's multi-GPU QLoRA examples.

Run under `accelerate launch --config_file accelerate_configs/X.yaml bench/peer_train.py RESULT_DIR
--config run.yaml [--section.key value ...]`. It reads the same run config as the launcher, so model,
data, sequence length, batch, LoRA shape, lr schedule, seed and steps are identical, and writes one
JSON per rank to RESULT_DIR with what bench/compare.py measures.
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

from launcher.config import load_config, parse_overrides
from launcher.data.loading import load_training_data
from launcher.dtypes import DTYPE_BY_NAME
from launcher.memory.measure import gradient_bytes, optimizer_state_bytes
from launcher.run.accelerator import compute_dtype as resolved_compute_dtype
from launcher.strategies import torch_optimizer

RESULT_DIR = Path(sys.argv[1])
cfg = load_config(sys.argv[3], parse_overrides(sys.argv[4:])) if sys.argv[2] == "--config" else sys.exit("usage")
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
cuda = torch.cuda.is_available()
# As the launcher resolves `quant.compute_dtype: auto`: bf16 under the GPU's autocast, else what the CPU runs natively.
compute_dtype = DTYPE_BY_NAME[
    resolved_compute_dtype(cfg.quant.compute_dtype, "bf16" if cuda and cfg.train.mixed_precision != "no" else "no")
]

tokenizer, data, _ = load_training_data(cfg.model, cfg.data, cfg.train, WORLD)
step_tokens: list[int] = []


class TokenizedRecords(torch.utils.data.Dataset):
    def __len__(self):
        return len(data)

    def __getitem__(self, i):
        return i


def collator(indices):
    batch = data.collate(indices, tokenizer.pad_token_id)
    step_tokens.append(data.tokens(indices))
    return batch


class Measure(TrainerCallback):
    """Gradients are counted as the launcher counts its own: in the torch optimizer's step pre-hook, once
    per storage (under DeepSpeed the model's `.grad` stay empty; its partitions hold the gradients)."""

    def __init__(self):
        self.step_times: list[float] = []
        self.grad_bytes = 0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.hook = torch_optimizer(optimizer).register_step_pre_hook(self._count_gradients)

    def _count_gradients(self, optimizer, args, kwargs):
        self.grad_bytes = gradient_bytes(optimizer)
        self.hook.remove()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.time())


model = AutoModelForCausalLM.from_pretrained(
    cfg.model.path,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    ),
    dtype=compute_dtype,
    device_map={"": int(os.environ.get("LOCAL_RANK", "0")) if cuda else "cpu"},
)
model = prepare_model_for_kbit_training(
    model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
)
model = get_peft_model(
    model,
    LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    ),
)
measure = Measure()
trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=str(RESULT_DIR / "trainer"),
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_schedule if cfg.train.lr_schedule != "constant" else "constant_with_warmup",
        warmup_steps=cfg.train.warmup_steps,
        max_steps=cfg.train.max_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and cfg.train.mixed_precision != "no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    ),
    train_dataset=TokenizedRecords(),
    data_collator=collator,
    callbacks=[measure],
)
trainer.train()

losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
RESULT_DIR.mkdir(parents=True, exist_ok=True)
(RESULT_DIR / f"rank{RANK}.json").write_text(
    json.dumps(
        {
            "rank": RANK,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "step_unix_times": measure.step_times,
            "step_tokens": step_tokens[: len(measure.step_times)],
            "final_loss": losses[-1] if losses else None,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "grad_bytes": measure.grad_bytes,
            "optimizer_state_bytes": optimizer_state_bytes(torch_optimizer(trainer.optimizer)),
        }
    )
)
