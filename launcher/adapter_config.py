"""The run config's `lora:` section: what adapters train and how they start; launcher.config holds it."""

from __future__ import annotations

from dataclasses import dataclass, field

Rule = tuple[bool, str]
FROM_WEIGHTS = ("pissa", "olora", "loftq")
"""`lora.init` values that start the adapters from the 16-bit weights (launcher/model/decomposed_init.py)."""
INITS = ("default", "gaussian", *FROM_WEIGHTS)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    """Module names (or all-linear: every nn.Linear but the output layer). MoE experts are not modules."""
    target_parameters: list[str] = field(default_factory=list)
    """Parameters to adapt directly, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj] for fused MoE
    experts (peft's target_parameters). peft has no dropout there: lora.dropout then applies to the modules only."""
    init_from: str = ""
    """A PEFT LoRA adapter directory to continue training (its r, alpha and targets replace these); with DPO its
    weights are the reference too (SFT, then DPO from the SFT adapter)."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: adapters scaled by alpha / sqrt(r) instead of alpha / r, so a higher rank still learns."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Ranks of some adapted modules: a module's name, or a regular expression matching the end of its full name
    (peft's rank_pattern: `q_proj`, `layers\\.0\\..*`), to its rank; the others take `r`."""
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    """Alphas of some adapted modules, matched as `rank_pattern`; the others take `alpha`."""
    init: str = "default"
    """How the adapters start: default (peft's: A random, B zero, so training starts from the base), gaussian (A
    Gaussian), pissa or olora (A and B the principal part of each 16-bit weight, by SVD or QR, taken on the source
    rank while it loads; the residual is quantized in its place), loftq (A and B the top singular vectors of each
    weight's 4-bit quantization error, so that the first forward is closer to the 16-bit model's)."""
    adapt_vision: bool = False
    """Vision-language models: all-linear adapts the vision encoder's and projector's linears too (default: the
    language model's only; the vision parts stay frozen)."""
    use_dora: bool = False
    """DoRA: each adapted linear's weight split into a trained magnitude (one value per output feature) and a
    direction that LoRA adapts; every forward dequantizes the 4-bit weight for its norm. Not on `target_parameters`."""

    def rules(self, at: str) -> list[Rule]:
        patterns = [(f"rank_pattern.{k}", v) for k, v in self.rank_pattern.items()]
        patterns += [(f"alpha_pattern.{k}", v) for k, v in self.alpha_pattern.items()]
        return [
            (self.r > 0, f"`{at}r` must be a positive integer, got {self.r}."),
            (self.alpha > 0, f"`{at}alpha` must be positive, got {self.alpha}."),
            (0 <= self.dropout < 1, f"`{at}dropout` must be in [0, 1), got {self.dropout}."),
            (
                self.init in INITS,
                f"`{at}init` is `{self.init}`; choose one of {', '.join(INITS)}.",
            ),
            (
                not (self.init in FROM_WEIGHTS and self.init_from),
                f"`{at}init: {self.init}` with `{at}init_from`: a continued adapter brings its own weights (and a "
                "residual base of its own); drop one of them.",
            ),
            (
                not (self.use_dora and self.target_parameters),
                f"`{at}use_dora` with `{at}target_parameters`: peft has no DoRA for adapted parameters (MoE experts; "
                'peft 0.21: "lora.ParamWrapper does not work with use_dora=True"). Adapt the experts without DoRA, '
                "or leave them out.",
            ),
        ] + [(value > 0, f"`{at}{key}` must be a positive integer, got {value}.") for key, value in patterns]
