"""LoRA settings: the Hydra group `lora` (recipes/lora/*.yaml), one dataclass validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional
from latentforge.model.errors import UserError

# SPEC section 4 module names: attention q/k/v/o, the Mamba input projection, the MoE shared expert. Not the Mamba
# out_proj: stock PEFT refuses it (below), and the default adapter must load with PEFT onto transformers'
# NemotronHForCausalLM (and so in vLLM). Add "out_proj" to lora.targets to adapt it anyway (a warning says so).
DEFAULT_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "in_proj",
    "shared_experts.up_proj",
    "shared_experts.down_proj",
]
# Module leaf names PEFT (0.21, peft.tuners.tuners_utils._check_lora_target_modules_mamba) refuses for LoRA in a
# Mamba-family model (model_type nemotron_h among them), whatever the pattern or target_parameters route: in
# transformers' training forward the fused kernel mamba2_split_conv1d_scan_combined receives out_proj.weight and
# conv1d.weight as tensors, so an adapter wrapped around those modules would be silently skipped.
PEFT_REFUSED = ("out_proj", "conv1d")
BASE_DTYPES = ("float32", "bfloat16", "float16")


class LoRAConfigError(UserError, ValueError):
    """A LoRA setting that cannot work; the message names the field and the fix."""


class PEFTCompatibilityWarning(UserWarning):
    """The adapter trains and merges here, but stock PEFT will not load it (see PEFT_REFUSED)."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input only (the base path never sees it)
    use_rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilised LoRA)
    # Module-name patterns. A plain name matches a module whose name ends with it at a dot boundary
    # ("q_proj", "shared_experts.up_proj"); anything else is a regular expression that must match the full name
    # ("backbone\.layers\.[0-3]\.mixer\.q_proj").
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    routed_experts: bool = False  # also adapt every routed expert's up/down projection (one adapter per expert)
    include_mtp: bool = False  # adapt the MTP block too (Hugging Face NemotronH has no MTP: PEFT ignores those)
    base_dtype: Optional[str] = None  # hold the frozen base in this dtype (bfloat16 halves its memory); null: as is
    init_seed: Optional[int] = None  # adapter A init seed (null: the global RNG)

    def __post_init__(self) -> None:
        self.targets = list(self.targets or [])
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise LoRAConfigError(message)

        need(isinstance(self.rank, int) and self.rank > 0, f"lora.rank must be a positive integer, got {self.rank}")
        need(self.alpha > 0, f"lora.alpha must be positive, got {self.alpha}")
        need(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        need(
            bool(self.targets) or self.routed_experts,
            "lora.targets is empty and lora.routed_experts is false: nothing would be adapted. "
            f"Use e.g. lora.targets={DEFAULT_TARGETS}",
        )
        need(
            self.base_dtype is None or self.base_dtype in BASE_DTYPES,
            f"lora.base_dtype must be one of {BASE_DTYPES} or null, got {self.base_dtype!r}",
        )
        need(
            not (self.routed_experts and self.dropout > 0),
            "lora.routed_experts needs lora.dropout=0: the expert adapters are folded into the stacked expert "
            "weights, where an input dropout cannot apply (PEFT's parameter adapters have the same limit). "
            "Set lora.dropout=0 or lora.routed_experts=false",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LoRAConfig":
        from latentforge.model.schema import from_dict

        return from_dict(cls, values, "lora", LoRAConfigError)
