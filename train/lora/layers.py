"""LoRA on a module without renaming it: the module's class is swapped for a subclass that adds the adapter.

`q_proj` stays `q_proj` (its `weight` keeps its name, so base checkpoints still load and the parallel layer's
name-based plans still find it) and it stays an `nn.Linear` (or whatever Linear subclass precision emulation or
Transformer Engine put there: its forward still computes the base path). The adapter lives next to the weight:

    y = base(x) + scaling * dropout(x) @ A^T @ B^T      A (r, in), B (out, r); B starts at zero, so y = base(x)

Routed experts are stacked parameters (E, out, in); each expert gets its own rank-r pair, folded into the weights
before the grouped GEMM: W_e + scaling * B_e @ A_e (as PEFT's parameter adapters do).

Tensor parallelism (train.parallel.tensor_parallel's plan): a column-parallel layer (q/k/v, in_proj, up) computes
this rank's rows of the output, a row-parallel one (o_proj, out_proj, down) a partial sum over this rank's input
columns. The factors stay whole on every TP rank (they are small; FSDP still shards them over data-parallel ranks);
the forward reads the shard geometry from the weight's DTensor placement (which TP rank, how many) and uses the
matching rows of B or columns of A. `lora_row_blocks` (set by apply_lora) says how the output rows split: one block
for most layers, in_proj's five z | x | B | C | dt blocks of which each rank takes a slice. The runner's all-reduce
of TP-replicated gradients sums the pieces, which is the exact gradient (each rank contributes the part of the
product its shard computed).

Expert parallelism (train.parallel.expert_parallel): the per-expert factors are sharded over the EP group with the
experts (Shard(0), same names), and the adapted weights of this rank's experts go to the EP layer's `run_experts`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from latentforge.kernels.moe import moe_experts

EXPERT_PROJS = ("up_proj", "down_proj")  # in the order PEFT nests its parameter wrappers (up innermost)

_CLASS_CACHE: dict[tuple[type, type], type] = {}

# The mixins only ever sit in front of their host class (`lora_class`); the type checker sees them as subclasses of
# it, so `super().forward`, `weight` and `training` type-check. At runtime they stay plain mixins.
if TYPE_CHECKING:
    from latentforge.model.moe import Experts

    _LinearHost = nn.Linear
    _ExpertsHost = Experts
else:
    _LinearHost = _ExpertsHost = object


def lora_class(mixin: type, base: type) -> type:
    """`LoRA<Base>`: the mixin first in the MRO, so its forward wraps the base class's forward."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"LoRA{base.__name__}", (mixin, base), {"_lora_base_class": base})
    return _CLASS_CACHE[key]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) tensor, differentiable."""
    return t.to_local() if isinstance(t, DTensor) else t


class LoRALinearMixin(_LinearHost):
    """Adds `lora_A` (r, in) and `lora_B` (out, r) to an nn.Linear. Attributes: lora_rank, lora_scaling,
    lora_dropout (probability), lora_name (for error messages)."""

    _lora_base_class: type
    # set by add_lora_linear
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_rank: int
    lora_scaling: float
    lora_dropout: float
    lora_name: str
    lora_row_blocks: list[int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if isinstance(out, DTensor):  # a tensor-parallel layer: this rank's piece of the output
            return out + self._tensor_parallel_delta(x, out)
        return out + self.lora_delta(x).to(out.dtype)

    def lora_delta(
        self, x: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        if isinstance(a, DTensor) or isinstance(b, DTensor):
            raise RuntimeError(
                f"{self.lora_name}: LoRA factors are DTensors at forward time; shard them with FSDP "
                "only (tensor parallelism uses slices of the whole factors)"
            )
        if self.lora_dropout > 0 and self.training:
            x = F.dropout(x, p=self.lora_dropout, training=True)
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.lora_scaling

    def _tensor_parallel_delta(self, x: torch.Tensor, out: DTensor) -> DTensor:
        """The adapter's share of this rank's output piece, placed as `out` (Shard(-1): column-parallel, this
        rank's rows of B; Partial: row-parallel, this rank's columns of A)."""
        from torch.distributed.tensor import Partial

        assert isinstance(x, DTensor), "the tensor-parallel plan hands its Linears DTensor inputs"
        tp, rank, dim = _tp_geometry(self.weight, self.lora_name)
        if dim == 0:
            rows = _rank_rows(self.lora_row_blocks, tp, rank).to(self.lora_B.device)
            x_local = x.to_local(grad_placements=[Partial()])  # the replicated input's gradient: a partial sum
            delta = self.lora_delta(x_local, b=self.lora_B.index_select(0, rows))
        else:
            cols = _rank_rows([self.lora_A.shape[1]], tp, rank).to(self.lora_A.device)
            delta = self.lora_delta(x.to_local(), a=self.lora_A.index_select(1, cols))
        return DTensor.from_local(delta.to(out.dtype), out.device_mesh, out.placements, run_check=False)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        _init_a(self.lora_A, generator)
        self.lora_B.zero_()

    def lora_delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape of the weight (out, in), fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scaling


class LoRAExpertsMixin(_ExpertsHost):
    """Adds `lora_A_{up,down}_proj` (E, r, in) and `lora_B_{up,down}_proj` (E, out, r) to the stacked experts."""

    _lora_base_class: type
    # set by add_lora_experts (the factors themselves go by name: lora_{A,B}_{up,down}_proj)
    lora_rank: int
    lora_scaling: float
    lora_dropout: float
    lora_name: str

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        up, down = (self.lora_adapted_weight(proj) for proj in EXPERT_PROJS)
        run_experts = getattr(self, "run_experts", None)  # expert parallel: this rank's experts, tokens exchanged
        if run_experts is not None:
            return run_experts(x, topk_idx, topk_weight, up, down)
        return moe_experts(x, topk_idx, topk_weight, up, down, alignment=self.alignment, linear_fn=self.linear_fn)

    def lora_adapted_weight(self, proj: str) -> torch.Tensor:
        """W_e + scaling * B_e @ A_e of this rank's experts (all of them without expert parallelism)."""
        weight = _local(getattr(self, proj))
        return weight + self.lora_expert_delta(proj).to(weight.dtype)

    def lora_expert_delta(self, proj: str) -> torch.Tensor:
        a, b = _local(getattr(self, f"lora_A_{proj}")), _local(getattr(self, f"lora_B_{proj}"))
        return torch.bmm(b, a) * self.lora_scaling  # (E, out, r) @ (E, r, in)

    @torch.no_grad()
    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        for proj in EXPERT_PROJS:
            a = getattr(self, f"lora_A_{proj}")
            for e in range(a.shape[0]):
                _init_a(a[e], generator)
            getattr(self, f"lora_B_{proj}").zero_()


@torch.no_grad()
def _init_a(a: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
    # PyTorch's nn.Linear default (kaiming-uniform, a=sqrt(5)), as PEFT initialises lora_A
    if a.device.type == "meta":
        return
    bound = 1.0 / math.sqrt(a.shape[-1])
    values = torch.empty(a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    a.copy_(values.to(a.dtype))


def add_lora_linear(
    module: nn.Linear,
    name: str,
    rank: int,
    scaling: float,
    dropout: float,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
    row_blocks: Optional[Sequence[int]] = None,
) -> None:
    """Adapt `module` in place. `row_blocks`: how its output rows split over tensor-parallel ranks (each rank a
    slice of every block; default one block)."""
    weight = module.weight
    out_features, in_features = weight.shape
    module.__class__ = lora_class(LoRALinearMixin, type(module))
    assert isinstance(module, LoRALinearMixin)  # tells the type checker about the class swap
    module.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=dtype))
    module.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=dtype))
    module.lora_rank, module.lora_scaling, module.lora_dropout, module.lora_name = rank, scaling, dropout, name
    module.lora_row_blocks = list(row_blocks or [out_features])
    if sum(module.lora_row_blocks) != out_features:
        raise ValueError(f"{name}: row blocks {module.lora_row_blocks} do not add up to its {out_features} rows")
    module.reset_lora_parameters(generator)


def add_lora_experts(
    module: nn.Module,
    name: str,
    rank: int,
    scaling: float,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> None:
    module.__class__ = lora_class(LoRAExpertsMixin, type(module))
    assert isinstance(module, LoRAExpertsMixin)  # tells the type checker about the class swap
    for proj in EXPERT_PROJS:
        experts, out_features, in_features = getattr(module, proj).shape
        device = getattr(module, proj).device
        setattr(
            module, f"lora_A_{proj}", nn.Parameter(torch.empty(experts, rank, in_features, device=device, dtype=dtype))
        )
        setattr(
            module, f"lora_B_{proj}", nn.Parameter(torch.zeros(experts, out_features, rank, device=device, dtype=dtype))
        )
    module.lora_rank, module.lora_scaling, module.lora_dropout, module.lora_name = rank, scaling, 0.0, name
    module.reset_lora_parameters(generator)


def is_lora_module(module: nn.Module) -> bool:
    return isinstance(module, (LoRALinearMixin, LoRAExpertsMixin))


def lora_param_names(module: nn.Module) -> list[str]:
    if isinstance(module, LoRALinearMixin):
        return ["lora_A", "lora_B"]
    if isinstance(module, LoRAExpertsMixin):
        return [f"lora_{ab}_{proj}" for proj in EXPERT_PROJS for ab in "AB"]
    return []


@torch.no_grad()
def merge_and_remove(module: nn.Module) -> None:
    """Fold the adapter into the base weight and turn the module back into its base class."""
    if isinstance(module, LoRALinearMixin):
        module.weight.add_(module.lora_delta_weight().to(module.weight.dtype))
    elif isinstance(module, LoRAExpertsMixin):
        for proj in EXPERT_PROJS:
            weight = getattr(module, proj)
            weight.add_(module.lora_expert_delta(proj).float().to(weight.dtype))
    else:
        raise TypeError(f"{type(module).__name__} carries no LoRA adapter")
    remove(module)


def remove(module: nn.Module) -> None:
    """Drop the adapter without merging: the module is its base class again."""
    if not isinstance(module, (LoRALinearMixin, LoRAExpertsMixin)):
        raise TypeError(f"{type(module).__name__} carries no LoRA adapter")
    for name in lora_param_names(module):
        delattr(module, name)
    for attr in ("lora_rank", "lora_scaling", "lora_dropout", "lora_name", "lora_row_blocks"):
        module.__dict__.pop(attr, None)
    module.__class__ = module._lora_base_class


# ----- tensor parallelism: which rows / columns of the factors this rank's weight shard needs ------------------
def _tp_geometry(weight: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(TP size, this rank's TP coordinate, sharded weight dim 0 or 1) of a tensor-parallel Linear's weight."""
    if not isinstance(weight, DTensor):
        raise RuntimeError(f"{name}: a DTensor output but a plain weight; LoRA supports tensor-parallel Linears only")
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise RuntimeError(
            f"{name}: a DTensor output but the weight is not split over a 'tp' mesh dimension "
            f"(mesh {names}); LoRA supports tensor-parallel Linears and FSDP-sharded ones only"
        )
    tp_dim = names.index("tp")
    placement = weight.placements[tp_dim]
    if not isinstance(placement, Shard):
        raise RuntimeError(f"{name}: the weight is {placement} over 'tp', not split; LoRA expects a TP plan's Shard")
    return mesh.size(tp_dim), mesh.get_local_rank(tp_dim), 0 if placement.dim in (0, -2) else 1


def _rank_rows(blocks: list[int], tp: int, rank: int) -> torch.Tensor:
    from latentforge.train.parallel.tensor_parallel import rank_rows

    return rank_rows(blocks, tp, rank)


def tensor_parallel_adapters(model_parts: Sequence[nn.Module]) -> int:
    """How many adapted Linears of `model_parts` are split over a tensor-parallel mesh (read from placements)."""
    count = 0
    for part in model_parts:
        for module in part.modules():
            weight = module._parameters.get("weight") if isinstance(module, LoRALinearMixin) else None
            if isinstance(weight, DTensor) and "tp" in (weight.device_mesh.mesh_dim_names or ()):
                count += 1
    return count
