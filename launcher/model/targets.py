"""What `all-linear` adapts, decided from what each module is and does, not from its name.

A candidate is every linear projection (`nn.Linear`, 4-bit or not, and transformers' `Conv1D`, GPT-2's) but the
output layer. One forward on fake tensors (fake_run.py, one decoder layer of each kind) shows what each does:
  * a router or gate is left out: a module that returns something other than a tensor (Llama-4's router derives
    from `nn.Linear` and returns a tuple), or whose output goes, through casts, views and elementwise ops only (a
    sigmoid, a bias), into a softmax or a top-k (routing weights), or into a sigmoid as one value per token
    (Qwen2-MoE's shared-expert gate);
  * a module that never runs in the forward is left out (an adapter there would get no gradient);
  * a module whose output goes into integer results (top-k indices, masks) and that the logits do not depend on
    through differentiable ops is left out (DeepSeek-V3.2's sparse-attention indexer: its scores only pick the
    top-k keys), as an adapter there would get no gradient;
  * a module whose output is not shaped as `input @ weight.T` is left out: it derives from `nn.Linear` but computes
    something else (DeepSeek-V4's grouped output projection, block-diagonal over head groups), which an adapter's
    `B(A(input))` cannot be added to;
  * a module whose weight the model reads outside the module's forward is left out (Mamba's `dt_proj`: the mixer
    multiplies by the weight itself, which would bypass an adapter), and kept 16-bit (`read_outside_forward`: in 4
    bits the model would multiply by the packed bytes);
  * a module peft refuses for the architecture is left out (Mamba's `out_proj`, whose fused kernels read the weight
    directly): peft's own check decides.
MoE experts, fused into 3D parameters since transformers 5, are not modules: `lora.target_parameters` adapts them.

peft (0.21) takes some names MoE experts had before transformers 5 (`gate_proj`, `up_proj`, `down_proj`, Mixtral's
`w1`..`w3`) for the fused experts of some families, even where a dense layer or a shared expert has a linear of that
name (peft issue 3711). Those linears are named in full, and `keep_named_modules` makes peft keep a target that
names a module of the model in full as that module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import vision
from ..config import LoraConfig
from .roles import READ_OUTSIDE, probe


@dataclass
class Resolution:
    """`all-linear` on one model: what is adapted and what is left out, and why."""

    targets: list[str]
    """Full module paths of the linears to adapt."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Full module path -> why it is not adapted."""
    unprobed: str = ""
    """Why the modules' roles could not be seen ("": they were)."""


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def resolve(model: nn.Module, lora: LoraConfig) -> Resolution:
    """The modules `lora.target_modules` adapts on `model` (loaded or on meta, k-bit prepared or not, before LoRA):
    `all-linear` resolved here; a list as peft matches it (exact name or a dotted suffix)."""
    if lora.target_modules == "all-linear":
        return resolve_all_linear(model, lora.adapt_vision)
    if isinstance(lora.target_modules, str):  # a regular expression over full names, as peft reads it
        pattern = re.compile(lora.target_modules)
        return Resolution([n for n, m in model.named_modules() if is_projection(m) and pattern.fullmatch(n)])
    names = [n for n, _ in model.named_modules()]
    return Resolution([n for n in names for t in lora.target_modules if n == t or n.endswith("." + t)])


def peft_targets(model: nn.Module, resolution: Resolution) -> list[str]:
    """`resolution.targets` as peft's `target_modules`: the leaf name where it names exactly those modules and peft
    keeps it (readable, and what plain peft reloads), the full name otherwise (a leaf shared with a module left out,
    or one peft takes for fused experts)."""
    chosen = set(resolution.targets)
    by_leaf: dict[str, list[str]] = {}
    for name, _ in model.named_modules():
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    remapped = remapped_by_peft(model, sorted({n.rpartition(".")[2] for n in chosen}))
    names = []
    for leaf, modules in sorted(by_leaf.items()):
        mine = [m for m in modules if m in chosen]
        if not mine:
            continue
        names += mine if len(mine) < len(modules) or leaf in remapped else [leaf]
    return names


def remapped_by_peft(model: nn.Module, leaves: list[str]) -> set[str]:
    """The names peft's transformers-5 conversion takes for fused MoE experts on this model (peft issue 3711)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils.transformers_weight_conversion import (
        convert_peft_config_for_transformers,
        get_model_conversion_mapping,
    )

    conversions = get_model_conversion_mapping(model)
    remapped = set()
    for leaf in leaves:
        trial = PeftLoraConfig(target_modules=[leaf])
        try:
            convert_peft_config_for_transformers(trial, model=model, conversions=conversions)
        except ValueError:  # a part of a fused expert weight named without the others
            remapped.add(leaf)
            continue
        if leaf not in (trial.target_modules or ()):
            remapped.add(leaf)
    return remapped


def keep_named_modules() -> None:
    """peft (0.21) converts the targets of some MoE families for transformers 5 by leaf name, so a linear named in
    full (`model.layers.0.mlp.gate_proj`, a dense layer) becomes the fused experts' parameter (peft issue 3711,
    fixed upstream in peft PR 3715). Here a target that names a module of the model in full stays that module."""
    import peft.utils.transformers_weight_conversion as conversion

    if getattr(conversion, "_qlaunch_fixed", False):
        return
    convert = conversion._convert_peft_config_moe

    def _convert_peft_config_moe(peft_config, model):
        targets = peft_config.target_modules
        names = {name for name, _ in model.named_modules()}
        named = set() if isinstance(targets, str) else {t for t in targets or () if "." in t and t in names}
        if named:
            peft_config.target_modules = set(targets) - named
        convert(peft_config, model)
        if named:
            peft_config.target_modules = set(peft_config.target_modules or ()) | named

    conversion._convert_peft_config_moe = _convert_peft_config_moe
    conversion._qlaunch_fixed = True


def describe_left_out(left_out: dict[str, str]) -> str:
    """`{module: why}` in a line: the leaf names, grouped by why."""
    grouped: dict[str, set[str]] = {}
    for name, why in left_out.items():
        grouped.setdefault(why, set()).add(name.rpartition(".")[2])
    return "; ".join(f"{', '.join(sorted(leaves))} ({why})" for why, leaves in sorted(grouped.items()))


def resolve_all_linear(model: nn.Module, adapt_vision: bool = False) -> Resolution:
    """`all-linear` on `model` (a transformers causal LM or vision-language model, on meta or loaded, before LoRA).
    A vision-language model's vision parts are adapted with `adapt_vision` (every linear there: the probe's forward
    is text-only), else left out."""
    output = model.get_output_embeddings()
    candidates = [name for name, m in model.named_modules() if is_projection(m) and m is not output]
    parts = vision.vision_parts(model)
    seen_by_vision = [c for c in candidates if vision.in_vision_part(c, parts)]
    candidates = [c for c in candidates if c not in seen_by_vision]
    left_out = dict.fromkeys(_refused_by_peft(model, candidates), "peft refuses it for this architecture")
    if not adapt_vision:
        left_out.update(dict.fromkeys(seen_by_vision, "vision part; lora.adapt_vision adapts it"))
    adapted_vision = seen_by_vision if adapt_vision else []
    try:
        roles = probe(model, [c for c in candidates if c not in left_out])
    except Exception as error:  # noqa: BLE001 - a forward fake tensors cannot run: every candidate is adapted
        first = (str(error).strip().splitlines() or [""])[0][:160]
        return Resolution(
            [c for c in candidates if c not in left_out] + adapted_vision,
            left_out,
            f"its forward did not run on fake tensors ({type(error).__name__}: {first}), so routers and gates "
            "could not be told from projections: every linear layer is adapted",
        )
    for name, role in roles.items():
        if role != "projection":
            left_out[name] = role
    return Resolution([c for c in candidates if c not in left_out] + adapted_vision, left_out)


def read_outside_forward(model: nn.Module) -> list[str]:
    """The linears of `model` (unquantized, on meta or loaded) whose weight the model reads outside their forward;
    none where the forward does not run on fake tensors."""
    output = model.get_output_embeddings()
    candidates = [name for name, m in model.named_modules() if is_projection(m) and m is not output]
    try:
        roles = probe(model, candidates)
    except Exception:  # noqa: BLE001 - resolve_all_linear says why the probe did not run
        return []
    return [name for name, role in roles.items() if role == READ_OUTSIDE]


def _refused_by_peft(model: nn.Module, candidates: list[str]) -> list[str]:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba

    config = LoraConfig(target_modules=["unused"])
    refused = []
    for name in candidates:
        try:
            _check_lora_target_modules_mamba(config, model, name.rpartition(".")[2])
        except ValueError:
            refused.append(name)
    return refused


def adapted_parameter_names(model: nn.Module, targets: list[str]) -> list[str]:
    """`lora.target_parameters` as full names: peft matches a parametrized parameter (a 4-bit expert) by its
    full name only, where it accepts a suffix of any other."""
    names = {
        f"{path}.{name}"
        for path, module in model.named_modules()
        for name in [*module._parameters, *(getattr(module, "parametrizations", None) or {})]
        if name != "original"
    }
    return sorted(n for n in names for t in targets if n == t or n.endswith("." + t))


def peft_lora_config(model: nn.Module, lora: LoraConfig, resolution: Resolution | None = None):
    """The peft config `attach_lora` adapts `model` with (`resolution`: `resolve(model, lora)`, if known). A
    ValueError where peft cannot map the names MoE experts had before transformers 5 (a part of a fused weight
    without the others)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils.transformers_weight_conversion import (
        convert_peft_config_for_transformers,
        get_model_conversion_mapping,
    )

    keep_named_modules()
    resolution = resolution or resolve(model, lora)
    targets = peft_targets(model, resolution) if resolution.targets else lora.target_modules
    if isinstance(lora.target_modules, list) and resolution.targets:
        # Names of no module go to peft as they are: names experts had before transformers 5 become parameter
        # targets there, others its error.
        names = [n for n, _ in model.named_modules()]
        targets += [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        # PiSSA, OLoRA and LoftQ come from the 16-bit weights on the source rank (decomposed_init.py), which installs them.
        init_lora_weights={"default": True, "gaussian": "gaussian"}.get(lora.init, False),
        rank_pattern=dict(lora.rank_pattern),
        alpha_pattern=dict(lora.alpha_pattern),
        # peft refuses dropout on adapted parameters; attach_lora sets it on the adapted modules.
        lora_dropout=0.0 if lora.target_parameters else lora.dropout,
        target_modules=targets,
        target_parameters=lora.target_parameters or None,
        # A 4-bit expert's parametrization list is a module named like the parameter (`...experts.
        # parametrizations.down_proj`), which peft's suffix match would take for the `down_proj` linears.
        exclude_modules=sorted(
            {
                f"parametrizations.{name}"
                for _, m in model.named_modules()
                for name in getattr(m, "parametrizations", {})
            }
        )
        or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # get_peft_model's first step, done here (it is idempotent) so that the parameter targets it adds are
    # named in full: the names experts had before transformers 5 fused them (Mixtral's w1/w2/w3, DeepSeek's
    # gate/up/down_proj) become parameter targets.
    convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))
    config.target_parameters = adapted_parameter_names(model, sorted(config.target_parameters or ())) or None
    return config
