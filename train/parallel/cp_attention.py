"""Context-parallel attention in O(s/cp) saved memory per rank: keys/values consumed block by block, each
(query block, key block) pair through PyTorch's SDPA kernel op that also returns the log-sum-exp, the blocks merged
by their log-sum-exps, masks built per block from global positions and document ids, and a backward that calls the
kernel's own backward per block with the merged output and the global log-sum-exp (no score matrix of the whole
sequence is ever kept).

Kernels. On CPU (every dtype, fp64 included) the block op is `aten._scaled_dot_product_flash_attention_for_cpu`
(out, lse) and its `_backward`. The backward is exact per block the way ring-flash-attention and TorchTitan's
context parallel do it: with P_j = exp(S_j - lse) computed from the GLOBAL lse and delta = rowsum(dO * O) from the
MERGED output, the kernel's dq/dk/dv for block j are exactly that block's share of the full gradients. Grouped-query
attention passes no expanded K/V: the r query heads of a key/value head are folded into the query length
((b, g, r * nq, d) against (b, g, nk, d)), so the kernel's dk/dv already sum over the group. Blocks whose pairs are
all visible pass no mask; others pass a (b, 1, r * nq, nk) additive mask (0 / -inf). Which is which, and which key
blocks a query block skips, block_plan decides once per micro-batch on the CPU from the positions and document ids,
so the per-layer loop reads nothing back from the device (on CUDA each read would be a sync per block). A query row with nothing
visible in a block comes back from the kernel with out 0 and lse 0 (NaN on CUDA, possibly), so its out is set to 0
and its lse to -inf before merging. On CUDA the same block loop calls cp_attention_cuda.py's kernel pair:
`_scaled_dot_product_efficient_attention` (attn_bias, compute_log_sumexp; its padded lse sliced, and padded again
with +inf for its backward) and, for bf16/fp16 blocks without a mask, `_scaled_dot_product_flash_attention`.
`kernel="auto"` still means the hand-written block softmax (cp_attention_reference.py) on CUDA, until the gpu-marked
tests of tests/train/test_cp_attention_cuda.py (run by bench/gpu_acceptance.py) have passed on a GPU; `kernel="sdpa"`
selects the CUDA kernels now, `kernel="reference"` the hand-written one anywhere (the bench compares both).

Why an all-gather of K/V rather than a ring of send/recv: the communication volume is the same. Per rank and per
layer a ring moves (cp-1)/cp * S * 2 * kv_heads * head_dim elements forward (K and V pass every rank once) and the
same again for dK/dV in the backward; the all-gather moves exactly that forward and the reduce-scatter of dK/dV
exactly that backward (plus a second all-gather, as a ring backward also re-sends K/V). One collective per tensor
runs at bus bandwidth with no hand-written overlap, and with grouped-query attention K/V are small next to the
queries (Nemotron 3 Super: 2 KV heads x 128 = 512 bytes per token for K and V in bf16, 0.5 GiB at 1M tokens). The
gathered K/V are transient: only this rank's K/V shard, its queries, output and log-sum-exp are saved for the
backward, which gathers K/V again. What the ring would save is that transient (S instead of 2S/cp K/V rows alive
during one layer's attention), which the plan (train/parallel/memory.py) counts.

Per query block only key blocks that can be visible (first key position <= last query position) are computed, so
with the load-balanced token order (token_order.py) every rank does the same work.
"""

from __future__ import annotations

import math

import torch

from .collectives import _all_gather, _reduce_scatter, _size
from .cp_attention_cuda import cuda_block_ops
from .cp_attention_reference import (
    accumulation_dtype,
    reference_attention_blocks,
    reference_attention_blocks_backward,
)

DEFAULT_BLOCK = 1024


def block_plan(
    q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor, k_doc: torch.Tensor, block: int = DEFAULT_BLOCK
) -> list:
    """[(q0, q1, [(k0, k1, needs_mask), ...]), ...]: the key blocks each query block must visit (causally visible at
    all), each flagged whether some of its (query, key) pairs are hidden (a later position or another document).

    Computed once per micro-batch on the CPU from the position vectors and document ids (q_doc (b, Lq), k_doc
    (b, S)), so the per-layer block loop never reads a value back from the device to choose a kernel call."""
    q_pos, k_pos, q_doc, k_doc = q_pos.cpu(), k_pos.cpu(), q_doc.cpu(), k_doc.cpu()
    k_blocks = [(k0, min(k0 + block, len(k_pos))) for k0 in range(0, len(k_pos), block)]
    k_first = [int(k_pos[k0:k1].min()) for k0, k1 in k_blocks]
    k_last = [int(k_pos[k0:k1].max()) for k0, k1 in k_blocks]
    k_one_doc = [_one_document(k_doc[:, k0:k1]) for k0, k1 in k_blocks]
    plan = []
    for q0 in range(0, len(q_pos), block):
        q1 = min(q0 + block, len(q_pos))
        first, last = int(q_pos[q0:q1].min()), int(q_pos[q0:q1].max())
        q_one_doc = _one_document(q_doc[:, q0:q1])
        visits = []
        for (k0, k1), k_begin, k_end, k_docs in zip(k_blocks, k_first, k_last, k_one_doc):
            if k_begin > last:
                continue  # no key of this block precedes any query of this block
            all_causal = k_end <= first
            same_doc = q_one_doc is not None and k_docs is not None and bool(torch.equal(q_one_doc, k_docs))
            visits.append((k0, k1, not (all_causal and same_doc)))
        plan.append((q0, q1, visits))
    return plan


def _one_document(doc: torch.Tensor) -> torch.Tensor | None:
    """Per batch row the single document id of a span (b,), or None when some row holds more than one."""
    return doc[:, 0] if bool((doc == doc[:, :1]).all()) else None


class _BlockMask:
    """Which (query, key) pairs are allowed: key position <= query position and the same document."""

    def __init__(self, q_pos, k_pos, q_doc, k_doc):
        self.q_pos, self.k_pos, self.q_doc, self.k_doc = q_pos, k_pos, q_doc, k_doc

    def __call__(self, q0, q1, k0, k1) -> torch.Tensor:
        causal = self.k_pos[None, k0:k1] <= self.q_pos[q0:q1, None]
        same_doc = self.q_doc[:, q0:q1, None] == self.k_doc[:, None, k0:k1]
        return (causal[None] & same_doc)[:, None, None]  # (b, 1, 1, nq, nk): broadcast over kv groups, repeats


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class CpuFlashBlockOps:
    """The block kernel interface of sdpa_attention_blocks on CPU (cp_attention_cuda.EfficientBlockOps on CUDA):
    queries folded to (b, g, r * nq, d) against keys/values (b, g, nk, d); `bias` turns a (b, 1, r * nq, nk)
    boolean of visible pairs into the kernel's additive mask; `forward` gives out (b, g, r * nq, d) and lse
    (b, g, r * nq); `backward_layouts` puts a query block's merged output, its gradient and the merged lse in the
    layouts `backward` reads (once per query block, not per key block)."""

    @staticmethod
    def bias(allowed: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    @staticmethod
    def forward(qb, kb, vb, bias, scale: float):
        return _flash_cpu(qb, kb, vb, 0.0, False, attn_mask=bias, scale=scale)

    @staticmethod
    def backward_layouts(ob: torch.Tensor, dob: torch.Tensor, lse: torch.Tensor):
        return ob, dob, lse.contiguous()

    @staticmethod
    def backward(dob, qb, kb, vb, bias, ob, lse, scale: float):
        return _flash_cpu_backward(dob, qb, kb, vb, ob, lse, 0.0, False, attn_mask=bias, scale=scale)


def block_ops(q: torch.Tensor):
    """The SDPA block kernel for q's device (resolve_kernel has refused the others)."""
    return cuda_block_ops(q) if q.device.type == "cuda" else CpuFlashBlockOps


def _fold_group(x: torch.Tensor) -> torch.Tensor:
    """(b, g, r, n, d) -> (b, g, r * n, d) contiguous: a group's r query heads as one longer query sequence."""
    b, g, r, n, d = x.shape
    return x.reshape(b, g, r * n, d).contiguous()


def _block_bias(mask: _BlockMask, block: tuple, q0: int, q1: int, q_shape: torch.Size, ops, dtype: torch.dtype):
    """(the kernel's additive mask for (b, g, r * nq) queries against nk keys, or None when the plan says every pair
    is visible; (b, 1, r * nq) rows that see a key). The plan's host-side flag decides, so no value is read back from
    the device here."""
    k0, k1, needs_mask = block
    if not needs_mask:
        return None, None
    b, groups, repeats = q_shape[:3]
    allowed = mask(q0, q1, k0, k1)
    nq, nk = allowed.shape[-2:]
    folded = allowed.expand(b, 1, repeats, nq, nk).reshape(b, 1, repeats * nq, nk)
    return ops.bias(folded, groups, dtype), folded.any(-1)


def sdpa_attention_blocks(q, K, V, mask: _BlockMask, plan: list, scale: float):
    """Forward: out (b, g, r, Lq, d) in q's dtype and lse (b, g, r, Lq) fp32 (fp64 for fp64 inputs), one SDPA
    kernel call per block, merged online by log-sum-exp: lse = logaddexp_j lse_j, out = sum_j exp(lse_j - lse) out_j."""
    b, g, r, _, d = q.shape
    ops = block_ops(q)
    acc_dtype = accumulation_dtype(q)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=acc_dtype, device=q.device)
    minus_inf = float("-inf")
    for q0, q1, key_blocks in plan:
        nq = q1 - q0
        qb = _fold_group(q[:, :, :, q0:q1])
        acc = torch.zeros(b, g, r * nq, d, dtype=acc_dtype, device=q.device)
        lse_acc = torch.full((b, g, r * nq), minus_inf, dtype=acc_dtype, device=q.device)
        for key_block in key_blocks:
            k0, k1, _ = key_block
            bias, sees_a_key = _block_bias(mask, key_block, q0, q1, q.shape, ops, q.dtype)
            out_j, lse_j = ops.forward(qb, K[:, :, k0:k1], V[:, :, k0:k1], bias, scale)
            out_j, lse_j = out_j.to(acc_dtype), lse_j.to(acc_dtype)
            if sees_a_key is not None:  # a row with nothing visible: CPU gives out 0 and lse 0, CUDA may give NaN
                lse_j = lse_j.masked_fill(~sees_a_key, minus_inf)
                out_j = out_j.masked_fill(~sees_a_key[..., None], 0.0)
            merged = torch.logaddexp(lse_acc, lse_j)
            shift = merged.masked_fill(merged == minus_inf, 0.0)  # rows with nothing visible yet stay 0 / -inf
            acc = acc * torch.exp(lse_acc - shift)[..., None] + out_j * torch.exp(lse_j - shift)[..., None]
            lse_acc = merged
        out[:, :, :, q0:q1] = acc.reshape(b, g, r, nq, d).to(q.dtype)
        lse[:, :, :, q0:q1] = lse_acc.reshape(b, g, r, nq)  # every query sees itself: finite
    return out, lse


def sdpa_attention_blocks_backward(q, K, V, out, grad_out, lse, mask: _BlockMask, plan: list, scale: float):
    """dq (b, g, r, Lq, d), dK and dV (b, g, S, d), in fp32 (fp64 for fp64 inputs): per block the kernel's backward
    given the merged output and the global lse, which makes each block's gradients its exact share of the total."""
    b, g, r, _, d = q.shape
    ops = block_ops(q)
    acc = accumulation_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dK = torch.zeros(K.shape, dtype=acc, device=q.device)
    dV = torch.zeros(V.shape, dtype=acc, device=q.device)
    for q0, q1, key_blocks in plan:
        nq = q1 - q0
        qb, ob, dob = (_fold_group(x[:, :, :, q0:q1]) for x in (q, out, grad_out))
        ob, dob, lse_b = ops.backward_layouts(ob, dob, lse[:, :, :, q0:q1].reshape(b, g, r * nq))
        dq_b = torch.zeros(b, g, r * nq, d, dtype=acc, device=q.device)
        for key_block in key_blocks:
            k0, k1, _ = key_block
            bias, _ = _block_bias(mask, key_block, q0, q1, q.shape, ops, q.dtype)
            dq_j, dk_j, dv_j = ops.backward(dob, qb, K[:, :, k0:k1], V[:, :, k0:k1], bias, ob, lse_b, scale)
            dq_b += dq_j
            dK[:, :, k0:k1] += dk_j
            dV[:, :, k0:k1] += dv_j
        dq[:, :, :, q0:q1] = dq_b.view(b, g, r, nq, d)
    return dq, dK, dV


KERNELS = {
    "sdpa": (sdpa_attention_blocks, sdpa_attention_blocks_backward),
    "reference": (reference_attention_blocks, reference_attention_blocks_backward),
}
SDPA_DEVICES = ("cpu", "cuda")
# "auto" picks "sdpa" on CPU and "reference" on CUDA until a GPU run of tests/train/test_cp_attention_cuda.py (the
# gpu-marked tests, part of bench/gpu_acceptance.py) has verified the CUDA block kernel; a process may set it
# (the bench does)
DEFAULT_KERNEL = "auto"


def resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel == "auto":
        return "sdpa" if device.type == "cpu" else "reference"
    if kernel not in KERNELS:
        raise ValueError(f"context_attention: kernel {kernel!r} is not one of auto, {', '.join(KERNELS)}")
    if kernel == "sdpa" and device.type not in SDPA_DEVICES:
        raise ValueError(f"context_attention: the SDPA block kernel runs on CPU and CUDA, not on {device.type}")
    return kernel


def _gather_keys(x, group):
    return x if _size(group) == 1 else _all_gather(x, 2, group)


def _scatter_key_grads(x, group):
    return x if _size(group) == 1 else _reduce_scatter(x, 2, group)


class _ContextAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, plan, group, kernel):
        scale = 1.0 / math.sqrt(q.shape[-1])
        K, V = _gather_keys(k, group), _gather_keys(v, group)
        out, lse = KERNELS[kernel][0](q, K, V, mask, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)  # this rank's shard only: K, V are gathered again
        ctx.mask, ctx.plan, ctx.group, ctx.scale, ctx.kernel = mask, plan, group, scale, kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        K, V = _gather_keys(k, ctx.group), _gather_keys(v, ctx.group)
        backward = KERNELS[ctx.kernel][1]
        dq, dK, dV = backward(q, K, V, out, grad_out.contiguous(), lse, ctx.mask, ctx.plan, ctx.scale)
        del K, V
        dk, dv = _scatter_key_grads(dK, ctx.group), _scatter_key_grads(dV, ctx.group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def context_attention(
    q, k, v, q_pos, k_pos, q_doc, k_doc, group, plan=None, block: int = DEFAULT_BLOCK, kernel: str | None = None
):
    """Causal, document-masked grouped-query attention of this rank's queries against every CP rank's keys.

    q (b, heads, Lq, d); k, v (b, kv_heads, Lk, d) this rank's shard; q_pos (Lq,) and q_doc (b, Lq) the queries'
    global positions and document ids; k_pos (S,) and k_doc (b, S) those of the keys of all ranks in rank order
    (what an all-gather over `group` returns; with `group` None or of one rank, S = Lk). `kernel`: "sdpa",
    "reference" or "auto" (None: DEFAULT_KERNEL). Returns (b, heads, Lq, d).
    """
    b, heads, length, d = q.shape
    groups = k.shape[1]
    if heads % groups:
        raise ValueError(f"context_attention: {heads} query heads are not a multiple of {groups} key/value heads")
    expected = k.shape[2] * _size(group)
    if k_pos.shape[0] != expected or k_doc.shape[-1] != expected:
        raise ValueError(f"context_attention: {k_pos.shape[0]} key positions for {expected} gathered keys")
    if plan is None:
        plan = block_plan(q_pos, k_pos, q_doc, k_doc, block)
    chosen = resolve_kernel(DEFAULT_KERNEL if kernel is None else kernel, q.device)
    mask = _BlockMask(q_pos, k_pos, q_doc, k_doc)
    q5 = q.view(b, groups, heads // groups, length, d)
    return _ContextAttention.apply(q5, k, v, mask, plan, group, chosen).view(b, heads, length, d)
