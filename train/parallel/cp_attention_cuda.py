"""The CUDA block kernel of context-parallel attention (cp_attention.py): one (query block, key block) pair through
`aten._scaled_dot_product_efficient_attention` (fp32 / bf16 / fp16, additive attn_bias for masked blocks, the
log-sum-exp with compute_log_sumexp=True) and its `_backward`; with bf16 / fp16 on sm80+ the blocks the plan marks
unmasked go to `aten._scaled_dot_product_flash_attention` (+ `_backward`) instead, the faster kernel that takes no
bias.

What these ops need that the CPU op does not (read from PyTorch's attention.cu / attention_backward.cu and the
xformers kernels they wrap; checked on CPU against the ops' schemas with meta tensors and against fakes that keep
the CUDA layouts, tests/train/test_cp_attention_cuda.py; verified on a GPU by the gpu-marked tests there):
- Equal query and key/value head counts (the efficient kernel checks it): grouped-query heads go in folded, the r
  query heads of a key/value head as one longer query sequence, as on CPU. is_causal would then be wrong (it masks
  by row index, and a folded row's index is not its position), so every mask is an attn_bias built from positions.
- attn_bias in the query's dtype, of shape (b, heads, Lq, Lk) with a contiguous last dimension and a row stride
  that is a multiple of 16 elements (the kernel's alignment): allocated (b, 1, Lq, Lk rounded up to 16), sliced to
  Lk and expanded over the heads with stride 0 (what F.scaled_dot_product_attention's preprocess_mask does).
- The efficient forward's lse is (b, heads, Lq rounded up to 32) fp32 with +inf in the padding (kAlignLSE): sliced
  to Lq after the forward; its backward reads that padded layout without bounds checks, so the merged global lse
  goes back in padded with +inf (exp(s - inf) = 0 for the padding rows; on ROCm the lse is not padded, either way).
  Flash's lse is (b, heads, Lq) fp32, and its backward takes that compact layout.
- A query row that sees no key of a block (its bias row all -inf) may come back as NaN (0 / 0 in the kernel's
  softmax) rather than CPU's 0: the caller overwrites such rows (out 0, lse -inf) from the plan's mask.
- The efficient backward reads `out` with the row stride heads * head_dim whatever its strides say (it derives
  o_strideM instead of reading it): the merged output goes in with the memory layout of a contiguous (b, Lq, heads,
  head_dim), as its forward writes it (and the gradient too, which both kernels would otherwise copy per block).
- No dropout: philox seed/offset and the flash rng state are read only when dropout_p > 0; the backward passes
  empty stand-ins. grad_input_mask = (q, k, v, not the bias).
- fp64 has no CUDA kernel here, and head_dim must be a multiple of 8 (the aligned kernels bf16 needs).
"""

from __future__ import annotations

import torch

LSE_ALIGNMENT = 32  # the efficient kernel's kAlignLSE: its lse rows are padded to this many entries
BIAS_ROW_ALIGNMENT = 16  # elements: attn_bias rows start on this boundary (the kernel's bias strideM alignment)
HEAD_DIM_ALIGNMENT = 8
FLASH_MAX_HEAD_DIM = 256
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NO_BIAS_GRAD = [True, True, True, False]  # grad_input_mask: dq, dk, dv, not d(attn_bias)

# the ops, looked up here so that CPU tests can put fakes with the CUDA layouts in their place
_efficient = torch.ops.aten._scaled_dot_product_efficient_attention.default
_efficient_backward = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default
_flash = torch.ops.aten._scaled_dot_product_flash_attention.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def unpad_lse(lse: torch.Tensor, length: int) -> torch.Tensor:
    """The efficient kernel's (b, h, Lq rounded up to 32) lse as (b, h, Lq): a view without the padding (on ROCm
    the lse is not padded and this is the whole tensor)."""
    return lse[..., :length]


def pad_lse(lse: torch.Tensor) -> torch.Tensor:
    """(b, h, Lq) fp32 lse in the layout the efficient backward reads: contiguous (b, h, Lq rounded up to 32),
    +inf in the padding as the forward writes it."""
    b, h, length = lse.shape
    padded = torch.full((b, h, round_up(length, LSE_ALIGNMENT)), float("inf"), dtype=torch.float32, device=lse.device)
    padded[..., :length] = lse
    return padded


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """(b, h, m, d) with the memory of a contiguous (b, m, h, d), as the kernels write their outputs: the efficient
    backward reads `out` with a row stride it assumes to be h * d (not taken from the tensor)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def aligned_bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (0 where allowed, -inf where hidden) for the efficient kernel from `allowed` (b, 1, Lq, Lk)
    bool: shape (b, heads, Lq, Lk), rows BIAS_ROW_ALIGNMENT-aligned in memory, heads broadcast with stride 0."""
    b, _, nq, nk = allowed.shape
    storage = torch.zeros(b, 1, nq, round_up(nk, BIAS_ROW_ALIGNMENT), dtype=dtype, device=allowed.device)
    bias = storage[..., :nk].masked_fill_(~allowed, float("-inf"))
    return bias.expand(b, heads, nq, nk)


def check_inputs(q: torch.Tensor) -> None:
    """One clear error for what the CUDA kernels cannot take (instead of the kernel's 'no kernel found')."""
    if q.dtype not in CUDA_DTYPES:
        raise ValueError(
            f"context_attention: the CUDA SDPA block kernel takes float32, bfloat16 or float16, not "
            f"{str(q.dtype).replace('torch.', '')} (kernel='reference' takes any dtype)"
        )
    if q.shape[-1] % HEAD_DIM_ALIGNMENT:
        raise ValueError(
            f"context_attention: the CUDA SDPA block kernel needs head_dim a multiple of {HEAD_DIM_ALIGNMENT}, "
            f"not {q.shape[-1]} (kernel='reference' takes any)"
        )


def flash_supported(q: torch.Tensor) -> bool:
    """Whether unmasked blocks can take the flash kernel: bf16 / fp16, head_dim <= 256, compute capability >= 8.0."""
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return False
    return q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) >= (8, 0)


class EfficientBlockOps:
    """The block kernel interface cp_attention's block loop calls (see CpuFlashBlockOps there): inputs folded to
    (b, g, r * nq, d) against (b, g, nk, d); `forward` returns out (b, g, r * nq, d) and lse (b, g, r * nq) fp32."""

    def __init__(self, flash_for_unmasked: bool):
        self.flash_for_unmasked = flash_for_unmasked

    @staticmethod
    def bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
        return aligned_bias(allowed, heads, dtype)

    def forward(self, qb, kb, vb, bias, scale: float):
        if bias is None and self.flash_for_unmasked:
            out, lse, *_ = _flash(qb, kb, vb, 0.0, False, False, scale=scale)
        else:
            out, lse, _, _ = _efficient(qb, kb, vb, bias, True, 0.0, False, scale=scale)
        return out, unpad_lse(lse, qb.shape[2])  # flash's lse is not padded: the slice is all of it

    def backward_layouts(self, ob: torch.Tensor, dob: torch.Tensor, lse: torch.Tensor):
        """The merged output and its gradient in the kernels' (b, m, g, d) memory layout, and the merged lse
        (b, g, r * nq) in both layouts: compact for flash, padded for the efficient kernel."""
        compact = lse.to(torch.float32).contiguous()
        # ROCm's efficient kernels write and read the lse unpadded (its backward views it as (b * heads, Lq))
        return kernel_layout(ob), kernel_layout(dob), (compact, compact if torch.version.hip else pad_lse(compact))

    def backward(self, dob, qb, kb, vb, bias, ob, lse_layouts, scale: float):
        compact, padded = lse_layouts
        unused = torch.empty((), dtype=torch.int64, device=qb.device)  # philox seed / offset: no dropout
        if bias is None and self.flash_for_unmasked:
            nq, nk = qb.shape[2], kb.shape[2]
            return _flash_backward(
                dob, qb, kb, vb, ob, compact, None, None, nq, nk, 0.0, False, unused, unused, scale=scale
            )
        dq, dk, dv, _ = _efficient_backward(
            dob, qb, kb, vb, bias, ob, padded, unused, unused, 0.0, NO_BIAS_GRAD, False, scale=scale
        )
        return dq, dk, dv


def cuda_block_ops(q: torch.Tensor) -> EfficientBlockOps:
    check_inputs(q)
    return EfficientBlockOps(flash_for_unmasked=flash_supported(q))
