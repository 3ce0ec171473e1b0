"""The model's configuration: one dataclass, validated on construction, built from a pattern string.

The pattern holds one symbol per layer (SPEC section 1): `M` Mamba-2, `*` attention, `E` LatentMoE, `-` dense MLP.
Megatron's `|` (pipeline cut) is accepted and remembered as a stage boundary; `/` is rejected here (the MTP part is
configured by `mtp_depths`, since its block is always `*E`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Union

from .errors import UserError

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


@dataclass
class ModelConfig:
    pattern: str = "M*E-"
    hidden_size: int = 64
    vocab_size: int = 512

    # attention (GQA, no positional encoding)
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16

    # Mamba-2
    mamba_num_heads: int = 8
    mamba_head_dim: int = 16
    mamba_groups: int = 2
    ssm_state_size: int = 16
    conv_kernel: int = 4
    chunk_size: int = 16
    time_step_min: float = 1e-3
    time_step_max: float = 1e-1
    time_step_floor: float = 1e-4
    a_init_range: tuple = (1.0, 16.0)

    # LatentMoE
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 32
    moe_latent_size: Optional[int] = 32  # None: experts at full hidden (nano)
    shared_expert_intermediate_size: int = 64
    routed_scaling_factor: float = 2.5
    expert_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 1e-4

    # dense MLP (`-` layers)
    mlp_intermediate_size: int = 128

    # multi-token prediction: one shared `*E` block applied at depths 1..mtp_depths
    mtp_depths: int = 0
    mtp_loss_weight: float = 0.3

    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Megatron-style scaling of the output projections by 1/sqrt(2 * n_layers) at init
    scale_output_init: bool = True

    # filled from `pattern` by __post_init__ (not user-settable)
    layer_types: list = field(default_factory=list, init=False, repr=False)
    pipeline_cuts: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.a_init_range = tuple(self.a_init_range)
        self.layer_types, self.pipeline_cuts = parse_pattern(self.pattern)
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def layer_pattern(self) -> str:
        """The pattern without pipeline cuts (as Hugging Face's `hybrid_override_pattern`)."""
        inverse = {v: k for k, v in LAYER_KINDS.items()}
        return "".join(inverse[t] for t in self.layer_types)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_d_inner + 2 * self.mamba_groups * self.ssm_state_size

    @property
    def mamba_in_proj_size(self) -> int:
        return 2 * self.mamba_d_inner + 2 * self.mamba_groups * self.ssm_state_size + self.mamba_num_heads

    @property
    def expert_dim(self) -> int:
        """The width the routed experts read and write: the latent size, or hidden without a latent."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    def count(self, kind: str) -> int:
        return sum(1 for t in self.layer_types if t == kind)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: Union[Mapping[str, Any], "ModelConfig", None]) -> "ModelConfig":
        """The recipe's `model` node checked field by field (an instance passes unchanged, None: defaults)."""
        from latentforge.model.schema import from_dict

        return from_dict(cls, values, "model", ConfigError)

    # ----- validation --------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        for name in (
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "mamba_num_heads",
            "mamba_head_dim",
            "mamba_groups",
            "ssm_state_size",
            "conv_kernel",
            "chunk_size",
            "num_experts",
            "top_k",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "mlp_intermediate_size",
        ):
            need(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        need(self.num_layers > 0, "model.pattern has no layers; use symbols M, *, E, -")
        if "attention" in self.layer_types or self.mtp_depths:
            need(
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention",
            )
        if "mamba" in self.layer_types:
            need(
                self.mamba_num_heads % self.mamba_groups == 0,
                f"model.mamba_num_heads ({self.mamba_num_heads}) must be a multiple of model.mamba_groups "
                f"({self.mamba_groups}): each head reads one B/C group",
            )
            need(self.conv_kernel >= 2, f"model.conv_kernel must be >= 2, got {self.conv_kernel}")
        if "moe" in self.layer_types or self.mtp_depths:
            need(
                self.top_k <= self.num_experts,
                f"model.top_k ({self.top_k}) cannot exceed model.num_experts ({self.num_experts})",
            )
            if self.moe_latent_size is not None:
                need(
                    0 < self.moe_latent_size <= self.hidden_size,
                    f"model.moe_latent_size ({self.moe_latent_size}) must be in (0, hidden_size="
                    f"{self.hidden_size}]; use null for experts at full hidden width",
                )
        need(self.mtp_depths >= 0, f"model.mtp_depths must be >= 0, got {self.mtp_depths}")
        need(
            len(self.a_init_range) == 2 and 0 < self.a_init_range[0] <= self.a_init_range[1],
            f"model.a_init_range must be (low, high) with 0 < low <= high, got {self.a_init_range}",
        )


def parse_pattern(pattern: str) -> tuple[list[str], list[int]]:
    """Pattern string -> (layer kinds, indices of the layers that start a new pipeline stage)."""
    kinds, cuts = [], []
    for position, symbol in enumerate(pattern):
        if symbol == "|":
            if kinds and (not cuts or cuts[-1] != len(kinds)):
                cuts.append(len(kinds))
            continue
        if symbol == "/":
            raise ConfigError(
                f"model.pattern: '/' at position {position} starts Megatron's MTP part; LatentForge configures MTP "
                "with model.mtp_depths (the MTP block is always '*E'): remove the '/...' suffix"
            )
        if symbol not in LAYER_KINDS:
            raise ConfigError(
                f"model.pattern: unknown symbol {symbol!r} at position {position}; use M (Mamba-2), * (attention), "
                "E (MoE), - (MLP), or | (pipeline cut)"
            )
        kinds.append(LAYER_KINDS[symbol])
    if cuts and cuts[-1] == len(kinds):
        cuts.pop()
    return kinds, cuts


def config_summary(cfg: ModelConfig) -> dict:
    return asdict(cfg)
