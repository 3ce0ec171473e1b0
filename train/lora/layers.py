"""LoRA on a module without renaming it: the module's class is swapped for a subclass that adds the adapter.

`q_proj` stays `q_proj` (its `weight` keeps its name, so base checkpoints still load and the parallel layer's
name-based plans still find it) and it stays an `nn.Linear` (or whatever Linear subclass precision emulation or
Transformer Engine put there: its forward still computes the base path). The adapter lives next to the weight:

    y = base(x) + scaling * dropout(x) @ A^T @ B^T      A (r, in), B (out, r); B starts at zero, so y = base(x)

Routed experts are stacked parameters (E, out, in); each expert gets its own rank-r pair, folded into the weights
before the grouped GEMM: W_e + scaling * B_e @ A_e (as PEFT's parameter adapters do).

Tensor parallelism (train.parallel's runner): a sharded layer runs its own forward on this rank's shard of the
weight (`call_linear`), so the adapter must use the matching rows of B (column-parallel: q/k/v, in_proj, up) or
columns of A (row-parallel: o_proj, out_proj, down). The factors themselves stay whole on every TP rank (they are
small; FSDP still shards them over data-parallel ranks): the rows/columns this rank computes are recorded on the
layer (`lora_tp_rows` / `lora_tp_cols`), the forward slices, and the runner's all-reduce of TP-replicated gradients
sums the pieces, which is the exact gradient (each rank contributes the part of the product its shard computed).
Nobody has to call anything for that: `apply_lora` puts a forward pre-hook (`_tp_slices_hook`) on the mixer holding
each adapted Linear (the block's `mixer`: the parallel forwards call the shared expert's layers without calling
the shared expert module itself), which records them on the first forward after the layer's weight became a
TP-sharded DTensor (the mixer still sees the DTensor there; inside the parallel forward the layer only sees its
local shard).
`attach_tp_slices(model_parts)` does the same eagerly (before a torch.compile'd first step, say).

Expert parallelism (train.parallel.expert_parallel): the per-expert factors are sharded over the EP group with the
experts (Shard(0), same names), and the adapted weights of this rank's experts go to the EP layer's `run_experts`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from latentforge.kernels.moe import moe_experts

EXPERT_PROJS = ("up_proj", "down_proj")  # in the order PEFT nests its parameter wrappers (up innermost)

_CLASS_CACHE: dict = {}


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


def mamba_in_proj_rows(mixer: nn.Module):
    """The rows of a tensor-parallel Mamba mixer's `in_proj` weight this TP rank computes, or None.

    Its rows are five blocks (z | x | B | C | dt) of which each rank takes its heads' / groups' slice, so they are
    not one contiguous chunk; train.parallel.mixers.parallelize_mixers stores them on the mixer as `_lf_in_rows`
    (a 1-D long tensor) when it shards the mixer. This is the one place LoRA reads that attribute."""
    return getattr(mixer, "_lf_in_rows", None)


class LoRALinearMixin:
    """Adds `lora_A` (r, in) and `lora_B` (out, r) to an nn.Linear. Attributes: lora_rank, lora_scaling,
    lora_dropout (probability), lora_name (for error messages)."""

    _lora_base_class: type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.lora_delta(x).to(out.dtype)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._local_factors()
        if self.lora_dropout > 0 and self.training:
            x = F.dropout(x, p=self.lora_dropout, training=True)
        return F.linear(F.linear(x.to(a.dtype), a), b) * self.lora_scaling

    def _local_factors(self):
        """A and B restricted to the rows / columns of the weight this call runs with (all of them without TP)."""
        a, b = self.lora_A, self.lora_B
        if isinstance(a, DTensor) or isinstance(b, DTensor):
            raise RuntimeError(f"{self.lora_name}: LoRA factors are DTensors at forward time; shard them with FSDP "
                               "only (tensor parallelism slices whole factors, see train.lora.attach_tp_slices)")
        out_features, in_features = self.weight.shape  # this rank's shard under tensor parallelism
        if b.shape[0] != out_features:
            b = b.index_select(0, self._tp_index("lora_tp_rows", out_features))
        if a.shape[1] != in_features:
            a = a.index_select(1, self._tp_index("lora_tp_cols", in_features))
        return a, b

    def _tp_index(self, attr: str, size: int) -> torch.Tensor:
        index = getattr(self, attr, None)
        if index is None or index.numel() != size:
            raise RuntimeError(
                f"{self.lora_name}: the layer runs with a {tuple(self.weight.shape)} shard of its weight but its "
                f"adapter does not know which {'rows' if 'rows' in attr else 'columns'} that is: it is recorded by "
                "a forward pre-hook on the layer's mixer (installed by apply_lora), or by "
                "train.lora.attach_tp_slices(runner.model_parts) after build_runner. Was the adapter added after "
                "the model was parallelised, or the layer called on its own?")
        return index

    @torch.no_grad()
    def reset_lora_parameters(self, generator=None):
        _init_a(self.lora_A, generator)
        self.lora_B.zero_()

    def lora_delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, shape of the weight (out, in), fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.lora_scaling


class LoRAExpertsMixin:
    """Adds `lora_A_{up,down}_proj` (E, r, in) and `lora_B_{up,down}_proj` (E, out, r) to the stacked experts."""

    _lora_base_class: type

    def forward(self, x, topk_idx, topk_weight):
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
    def reset_lora_parameters(self, generator=None):
        for proj in EXPERT_PROJS:
            a = getattr(self, f"lora_A_{proj}")
            for e in range(a.shape[0]):
                _init_a(a[e], generator)
            getattr(self, f"lora_B_{proj}").zero_()


@torch.no_grad()
def _init_a(a: torch.Tensor, generator=None):
    # PyTorch's nn.Linear default (kaiming-uniform, a=sqrt(5)), as PEFT initialises lora_A
    if a.device.type == "meta":
        return
    bound = 1.0 / math.sqrt(a.shape[-1])
    values = torch.empty(a.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
    a.copy_(values.to(a.dtype))


def add_lora_linear(module: nn.Linear, name: str, rank: int, scaling: float, dropout: float,
                    dtype: torch.dtype = torch.float32, generator=None, hook_on: nn.Module = None) -> None:
    """Adapt `module` in place; `hook_on` (the mixer holding it, called as a module in every forward) gets the
    tensor-parallel slicing hook."""
    weight = module.weight
    out_features, in_features = weight.shape
    module.__class__ = lora_class(LoRALinearMixin, type(module))
    module.lora_A = nn.Parameter(torch.empty(rank, in_features, device=weight.device, dtype=dtype))
    module.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=dtype))
    module.lora_rank, module.lora_scaling, module.lora_dropout, module.lora_name = rank, scaling, dropout, name
    module.reset_lora_parameters(generator)
    if hook_on is not None:
        _install_tp_hook(hook_on)


def add_lora_experts(module: nn.Module, name: str, rank: int, scaling: float, dtype: torch.dtype = torch.float32,
                     generator=None) -> None:
    module.__class__ = lora_class(LoRAExpertsMixin, type(module))
    for proj in EXPERT_PROJS:
        experts, out_features, in_features = getattr(module, proj).shape
        device = getattr(module, proj).device
        setattr(module, f"lora_A_{proj}", nn.Parameter(torch.empty(experts, rank, in_features, device=device,
                                                                   dtype=dtype)))
        setattr(module, f"lora_B_{proj}", nn.Parameter(torch.zeros(experts, out_features, rank, device=device,
                                                                   dtype=dtype)))
    module.lora_rank, module.lora_scaling, module.lora_dropout, module.lora_name = rank, scaling, 0.0, name
    module.reset_lora_parameters(generator)


def is_lora_module(module: nn.Module) -> bool:
    return isinstance(module, (LoRALinearMixin, LoRAExpertsMixin))


def lora_param_names(module: nn.Module) -> list:
    if isinstance(module, LoRALinearMixin):
        return ["lora_A", "lora_B"]
    if isinstance(module, LoRAExpertsMixin):
        return [f"lora_{ab}_{proj}" for proj in EXPERT_PROJS for ab in "AB"]
    return []


@torch.no_grad()
def merge_and_remove(module: nn.Module, hook_on: nn.Module = None) -> None:
    """Fold the adapter into the base weight and turn the module back into its base class."""
    if isinstance(module, LoRALinearMixin):
        module.weight.add_(module.lora_delta_weight().to(module.weight.dtype))
    elif isinstance(module, LoRAExpertsMixin):
        for proj in EXPERT_PROJS:
            weight = getattr(module, proj)
            weight.add_(module.lora_expert_delta(proj).float().to(weight.dtype))
    else:
        raise TypeError(f"{type(module).__name__} carries no LoRA adapter")
    remove(module, hook_on)


def remove(module: nn.Module, hook_on: nn.Module = None) -> None:
    """Drop the adapter without merging: the module is its base class again (`hook_on`: the module carrying its
    TP hook, which goes too when no adapted Linear is left under it)."""
    for name in lora_param_names(module):
        delattr(module, name)
    for attr in ("lora_rank", "lora_scaling", "lora_dropout", "lora_name", "lora_tp_rows", "lora_tp_cols"):
        module.__dict__.pop(attr, None)
    module.__class__ = module._lora_base_class
    if hook_on is not None and not any(isinstance(m, LoRALinearMixin) for m in hook_on.modules()):
        for key, hook in list(hook_on._forward_pre_hooks.items()):
            if hook is _tp_slices_hook:
                del hook_on._forward_pre_hooks[key]


# ----- tensor parallelism: which rows / columns of the factors this rank's weight shard needs ------------------
def _install_tp_hook(owner: nn.Module) -> None:
    # a module-level function (not a closure or a handle): survives copy.deepcopy and pickling of the model
    if not any(hook is _tp_slices_hook for hook in owner._forward_pre_hooks.values()):
        owner.register_forward_pre_hook(_tp_slices_hook)


def _tp_slices_hook(owner: nn.Module, args) -> None:
    """Forward pre-hook on a mixer holding adapted Linears: record the TP slices of those whose weight is
    TP-sharded and that have none yet (afterwards a few attribute checks per forward)."""
    for parent in owner.modules():
        for name, child in parent.named_children():
            if isinstance(child, LoRALinearMixin) and child.__dict__.get("lora_tp_rows") is None \
                    and child.__dict__.get("lora_tp_cols") is None:
                _attach_one(parent, name, child)


def _attach_one(parent: nn.Module, name: str, module: nn.Module) -> bool:
    """Record on `module` which rows (column-parallel) or columns (row-parallel) of its weight this TP rank
    computes; False when its weight is not sharded over a `tp` mesh dimension."""
    weight = module._parameters.get("weight")
    if not isinstance(weight, DTensor):
        return False
    mesh = weight.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        return False  # FSDP-only sharding: the forward sees the whole weight
    dim = names.index("tp")
    placement = weight.placements[dim]
    if not placement.is_shard():
        return False
    tp, coord = mesh.size(dim), mesh.get_local_rank(dim)
    device = module.lora_B.device if not isinstance(module.lora_B, DTensor) else module.lora_B.to_local().device
    if placement.dim in (0, -2):
        rows = None
        if name == "in_proj":
            rows = mamba_in_proj_rows(parent)
            if rows is None:
                raise RuntimeError(f"{module.lora_name}: a tensor-parallel in_proj without the row index of its "
                                   "Mamba mixer (train.parallel.mixers sets it when it shards the mixer)")
        if rows is None:  # a contiguous Shard(0) chunk, as distribute_tensor cuts it
            rows = torch.arange(weight.shape[0]).chunk(tp)[coord]
        module.lora_tp_rows = rows.to(device)
    else:
        module.lora_tp_cols = torch.arange(weight.shape[1]).chunk(tp)[coord].to(device)
    return True


def attach_tp_slices(model_parts: list) -> int:
    """Eagerly record the TP slices of every adapted tensor-parallel Linear (the forward pre-hook does it lazily
    otherwise); idempotent. Returns how many layers are tensor-parallel."""
    count = 0
    for part in model_parts:
        for parent in part.modules():
            for name, child in parent.named_children():
                if isinstance(child, LoRALinearMixin):
                    child.__dict__.pop("lora_tp_rows", None)
                    child.__dict__.pop("lora_tp_cols", None)
                    count += _attach_one(parent, name, child)
    return count
