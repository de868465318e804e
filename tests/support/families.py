"""Tiny random-weight models of the decoder families people fine-tune with QLoRA, one list for every test.

Each family is built from its own `transformers` config class (random weights, `save_pretrained`,
loaded back through `from_pretrained` by the runs), with a byte-level BPE tokenizer trained here
with `tokenizers`: transformers 5 picks the tokenizer class from the model type and rebuilds BPE
from vocab + merges, which a word-level vocabulary would not survive.

The dimensions are small but keep what makes each family special: tied embeddings, q/k/v biases,
q/k norms, sliding windows, Gemma's head_dim != hidden / heads, soft-capping and extra norms,
Phi-3's fused projections, and fused 3D expert weights (MoE).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher.demo import write_dataset

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
SPECIAL = ["<pad>", "<s>", "</s>"]
VOCAB = 512


@dataclass(frozen=True)
class Family:
    name: str
    """Test id and README row."""
    what: str
    """What is special about it."""
    config: Callable[[dict], object] | None
    """Builds the family's transformers config from the common settings."""
    tied: bool = False
    moe: bool = False
    run_args: tuple[str, ...] = field(default=())
    """Run-config overrides of this row (none: the defaults)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Strategies that refuse this row before launch -> a part of the one-line reason."""
    pairs: bool = False
    """Its data is preference pairs (support/pairs.py), for a preference objective in `run_args`."""
    layer_forwards: int = 2
    """Forwards of each decoder layer per micro step: forward and recomputation (and DPO's reference forward; KTO's
    reference forward and its two forwards of the KL term)."""
    vision: str = ""
    """A vision-language row: its model, processor and image chat data are support/vision.py's family of this name
    (`config` is not used)."""
    vision_unit_calls: int = 0
    """Forwards of the vision encoder's sharding units per micro step: each checkpointed encoder layer twice (its
    recomputation too), its patch embeddings once."""

    @property
    def data(self) -> str:
        """The file of its assets it trains on."""
        return "vision.jsonl" if self.vision else "data.jsonl"


def _common(tokens: dict, **extra) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        **tokens,
        **extra,
    )


def _llama(tokens, tied):
    from transformers import LlamaConfig

    return LlamaConfig(**_common(tokens, tie_word_embeddings=tied))


def _qwen2(tokens):
    from transformers import Qwen2Config

    return Qwen2Config(**_common(tokens, tie_word_embeddings=True))


def _qwen3(tokens):
    from transformers import Qwen3Config

    return Qwen3Config(**_common(tokens, head_dim=16, tie_word_embeddings=True))


def _mistral(tokens):
    from transformers import MistralConfig

    return MistralConfig(**_common(tokens, sliding_window=16, tie_word_embeddings=False))


def _gemma2(tokens):
    from transformers import Gemma2Config

    return Gemma2Config(
        **_common(
            tokens,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=16,
            tie_word_embeddings=True,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    )


def _gemma3(tokens):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_common(
            tokens,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=16,
            tie_word_embeddings=True,
        )
    )


def _phi3(tokens):
    from transformers import Phi3Config

    return Phi3Config(**_common(tokens, tie_word_embeddings=False))


def _mixtral(tokens):
    from transformers import MixtralConfig

    return MixtralConfig(**_common(tokens, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))


def _qwen3_moe(tokens):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common(
            tokens,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        )
    )


def _qwen2_moe(tokens):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_common(
            tokens,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=96,
            decoder_sparse_step=1,
            tie_word_embeddings=False,
        )
    )


def _olmoe(tokens):
    from transformers import OlmoeConfig

    return OlmoeConfig(**_common(tokens, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False))


def _gpt_oss(tokens):
    from transformers import GptOssConfig

    return GptOssConfig(
        **_common(
            tokens,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
            tie_word_embeddings=False,
        )
    )


def _gpt_neox(tokens):
    from transformers import GPTNeoXConfig

    common = _common(tokens, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    del common["num_key_value_heads"]
    return GPTNeoXConfig(**common)


def _exaone4(tokens):
    from transformers import Exaone4Config

    return Exaone4Config(
        **_common(
            tokens, sliding_window=16, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False
        )
    )


def _glm4_moe(tokens):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        **_common(
            tokens,
            moe_intermediate_size=64,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            tie_word_embeddings=False,
        )
    )


def _qwen3_next(tokens):
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        **_common(
            tokens,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            tie_word_embeddings=False,
        )
    )


def _falcon_h1(tokens):
    from transformers import FalconH1Config

    return FalconH1Config(
        **_common(
            tokens,
            head_dim=16,
            mamba_d_ssm=128,
            mamba_n_heads=8,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=16,
            mamba_chunk_size=16,
            tie_word_embeddings=False,
        )
    )


def _jamba(tokens):
    from transformers import JambaConfig

    return JambaConfig(
        **_common(
            tokens,
            attn_layer_period=2,  # a Mamba-1 layer with a dense MLP, then attention with MoE
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            num_experts=4,
            num_experts_per_tok=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=8,
            tie_word_embeddings=False,
        )
    )


def _llama4(tokens):
    from transformers import Llama4TextConfig

    return Llama4TextConfig(
        **_common(
            tokens,
            head_dim=16,
            intermediate_size_mlp=INTERMEDIATE,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,  # a dense layer, then an MoE one
            no_rope_layer_interval=2,
            attention_chunk_size=16,
            tie_word_embeddings=False,
        )
    )


def _lfm2(tokens):
    from transformers import Lfm2Config

    return Lfm2Config(
        **_common(
            tokens,
            layer_types=["conv", "full_attention"],
            block_auto_adjust_ff_dim=False,
            tie_word_embeddings=True,
        )
    )


FAMILIES = [
    Family("llama", "untied embeddings (Llama-2/3 8B+)", lambda t: _llama(t, False)),
    Family("llama-tied", "tied embeddings (Llama-3.2 1B/3B)", lambda t: _llama(t, True), tied=True),
    Family("qwen2", "q/k/v biases, tied", _qwen2, tied=True),
    Family("qwen3", "q/k norms, tied", _qwen3, tied=True),
    Family("mistral", "sliding window", _mistral),
    Family("gemma2", "tied, soft-capping, pre/post norms, head_dim != hidden/heads", _gemma2, tied=True),
    Family("gemma3", "tied, q/k norms, pre/post norms, head_dim != hidden/heads", _gemma3, tied=True),
    Family("phi3", "fused qkv and gate_up projections", _phi3),
    Family("mixtral", "MoE: 4 experts, top-2, fused 3D expert weights", _mixtral, moe=True),
    Family("qwen3-moe", "MoE: 4 experts, top-2, q/k norms", _qwen3_moe, moe=True),
    Family("qwen2-moe", "MoE: 4 routed experts and a gated shared expert (Qwen2-57B-A14B)", _qwen2_moe, moe=True),
    Family("olmoe", "MoE: 4 experts, top-2, q/k norms over all heads", _olmoe, moe=True),
    Family("gpt-oss", "MoE: expert biases, attention sinks, alternating sliding window", _gpt_oss, moe=True),
    Family(
        "mixtral-experts",
        "Mixtral with the experts adapted too (`lora.target_parameters`)",
        _mixtral,
        moe=True,
        run_args=("--lora.target_parameters", "[mlp.experts.gate_up_proj, mlp.experts.down_proj]"),
        refused={"fsdp1": "reads the adapter weights outside their modules' forward"},
    ),
    Family(
        "llama-tied-dpo",
        "DPO (sigmoid) on pairs: chosen and rejected in one forward, the reference is the adapter switched off",
        lambda t: _llama(t, True),
        tied=True,
        run_args=("--train.objective", "dpo", "--dpo.beta", "0.5"),
        pairs=True,
        layer_forwards=3,
    ),
    Family(
        "qwen3-moe-orpo",
        "ORPO on pairs (the chosen NLL plus the odds-ratio term, no reference) on an MoE, its adapters from PiSSA",
        _qwen3_moe,
        moe=True,
        run_args=("--train.objective", "orpo", "--lora.init", "pissa"),
        pairs=True,
    ),
    Family(
        "qwen2-kto",
        "KTO on pairs split into labelled completions; the KL term from mismatched ones, before each step",
        _qwen2,
        tied=True,
        run_args=("--train.objective", "kto", "--kto.beta", "0.5"),
        pairs=True,
        layer_forwards=5,
    ),
    Family(
        "llama-tied-variants",
        "DoRA, rsLoRA, a rank and an alpha pattern, LoRA+ (the B matrices at twice the learning rate)",
        lambda t: _llama(t, True),
        tied=True,
        run_args=(
            "--lora.use_dora",
            "true",
            "--lora.use_rslora",
            "true",
            "--lora.rank_pattern",
            "{q_proj: 4, down_proj: 8}",
            "--lora.alpha_pattern",
            "{v_proj: 8}",
            "--train.loraplus_lr_ratio",
            "2",
        ),  # fmt: skip
    ),
    Family(
        "qwen2-dora-pissa",
        "DoRA (the 4-bit weight dequantized for its norm) and PiSSA (adapters from the 16-bit weights, the residual "
        "quantized) beside q/k/v biases",
        _qwen2,
        tied=True,
        run_args=("--lora.use_dora", "true", "--lora.init", "pissa", "--lora.rank_pattern", "{o_proj: 4}"),
    ),
    Family("gpt-neox", "a plain (non-gated) MLP, LayerNorm, parallel residual, partial rotary", _gpt_neox),
    Family("exaone4", "norms after the attention and the MLP, sliding and full layers", _exaone4),
    Family("glm4-moe", "MoE: a dense first layer, a shared expert, sigmoid routing (GLM-4.5)", _glm4_moe, moe=True),
    Family("qwen3-next", "hybrid: gated delta-rule linear attention and full attention, MoE", _qwen3_next, moe=True),
    Family("falcon-h1", "hybrid: Mamba-2 beside attention in every layer", _falcon_h1),
    Family(
        "llama4",
        "MoE: a router deriving from nn.Linear, a shared expert, chunked attention, NoPE layers",
        _llama4,
        moe=True,
    ),
    Family("lfm2", "hybrid: gated short convolutions beside attention, tied", _lfm2, tied=True),
    Family("jamba", "hybrid: Mamba-1 (dt_proj kept 16-bit) beside attention, MoE", _jamba, moe=True),
    Family(
        "gemma3-vision",
        "vision: SigLIP tower and pooling projector kept 16-bit, bidirectional attention over an image, tied",
        None,
        tied=True,
        vision="gemma3",
        vision_unit_calls=2 * 2 + 1,
    ),
    Family(
        "llava",
        "vision: CLIP tower and MLP projector kept 16-bit, a Llama decoder",
        None,
        vision="llava",
        vision_unit_calls=2 * 2 + 1,
    ),
    Family(
        "paddleocr-vl",
        "vision: NaViT-style SigLIP (Qwen2-VL's flat patches, image_grid_thw, M-RoPE), an ERNIE-4.5 decoder, tied",
        None,
        tied=True,
        vision="paddleocr_vl",
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


# A chat template for these tokenizers (<s> and </s> are special tokens): each turn is "<s>ROLE\nCONTENT</s>\n".
TURNS_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def corpus(data_path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in data_path.read_text().splitlines()]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE trained on `texts`, with <pad>, <s> (prepended to every sequence) and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_family(family: Family, root: Path, seed: int = 0) -> Path:
    """Writes `root/base` (model + tokenizer) and `root/data.jsonl` (a vision row: also its processor and
    `root/vision.jsonl` with its images); returns `root`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family.vision:
        from support.vision import VISION_BY_NAME, build_vision_family

        return build_vision_family(VISION_BY_NAME[family.vision], root, seed)

    root.mkdir(parents=True, exist_ok=True)
    data = write_dataset(root / "data.jsonl", records=64, words=30)
    texts = corpus(data)
    tokenizer = build_tokenizer(texts)
    tokens = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family.config(tokens))
    model.to(torch.bfloat16).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    # transformers picks the tokenizer class from the model type (Qwen2's splits digits apart): whatever
    # it picks must give real ids that decode back to the text.
    reloaded = AutoTokenizer.from_pretrained(root / "base")
    ids = reloaded(texts[0])["input_ids"]
    if len(ids) < 10 or max(ids) >= VOCAB or reloaded.decode(ids, skip_special_tokens=True) != texts[0]:
        raise RuntimeError(f"{family.name}: {type(reloaded).__name__} does not tokenize the data after from_pretrained")
    if family.pairs:
        from support.pairs import write_pairs

        write_pairs(data, records=64, seed=seed)
    return root
