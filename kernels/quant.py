"""Bit-exact emulation of the low-precision training formats of Transformer Engine (TE 2.x).

Every quantizer returns a :class:`Quantized`: the element values exactly as the low-precision format
stores them (held in fp32), the decode scale of each block and, for NVFP4, the per-tensor decode
scale. ``dequantize()`` gives the fp32 tensor a GEMM on the low-precision data would see.

Formats and their scale rules (each follows TE's kernels / reference quantizers):

* FP8 per tensor, current scaling: ``scale = fp8_max / amax`` (fp32), ``amax == 0 -> 1``,
  ``inf -> fp32 max``; data ``= sat_rne(x * scale)``; decode ``1 / scale``.
* FP8 per tensor, delayed scaling: the same, with ``scale`` taken from an amax history of the last
  ``history_len`` steps (``DelayedScaler``), ``scale = fp8_max / max(history) / 2**margin``.
* FP8 block scaling (``Float8BlockScaling``): 1x128 or 128x128 tiles, power-of-two fp32 scales
  (the current-scaling scale rounded down to a power of two).
* MXFP8: blocks of 32 along the last dim, E4M3 values, E8M0 scale
  ``2**ceil_e8m0(amax * (1/448))`` (the exponent rounds up, as TE's ``float_to_e8m0``).
* NVFP4: E2M1 values in blocks of 16 (or 16x16 tiles for weights), an E4M3 scale per block and an
  fp32 per-tensor scale: ``S_enc = 448*6 / amax``; block scale ``e4m3(block_amax * (S_enc * (1/6)))``;
  values ``e2m1(x / (block_scale / S_enc))``, round-to-nearest-even or stochastic.
  ``rht16`` is the 16x16 random Hadamard transform TE applies to the wgrad operands.

FP8 casts saturate (TE casts with ``satfinite``) and round to nearest even.

The emulated recipes (``make_recipe``) quantize the operands of the three GEMMs of a linear layer the
way TE's recipes do; ``quantized_linear`` is the autograd function that runs them.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0
FP32_MAX = torch.finfo(torch.float32).max

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": E4M3_MAX, "e5m2": E5M2_MAX}

# every E2M1 magnitude, in code order 0..7
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# TE's fixed sign vector for the wgrad random Hadamard transform (NVFP4BlockScaling)
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)

NVFP4_BLOCK = 16
MXFP8_BLOCK = 32
FP8_BLOCK = 128

RECIPES = ("bf16", "fp8_current", "fp8_delayed", "fp8_block", "mxfp8", "nvfp4")


# ----------------------------------------------------------------------------------------------
# element casts


def _check_fp8_format(fmt: str) -> None:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"unknown FP8 format {fmt!r}: use one of {sorted(FP8_DTYPES)}")


def cast_fp8(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """Round fp32 values to the FP8 grid: nearest even, saturating at +-max (NaN stays NaN)."""
    _check_fp8_format(fmt)
    limit = FP8_MAX[fmt]
    # clamp first: torch's e5m2 cast overflows to inf, TE's satfinite cast does not
    return x.float().clamp(-limit, limit).to(FP8_DTYPES[fmt]).float()


def round_e2m1(
    x: torch.Tensor, *, stochastic: bool = False, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Round already-scaled fp32 values to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at 6.

    Nearest-even by default (ties go to the even code: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4).
    ``stochastic`` rounds up with probability (a - lo) / (hi - lo): unbiased, E[q] = x inside the range.
    """
    x = x.float()
    a = x.abs().clamp(max=E2M1_MAX)
    # spacing of the grid around a: 0.5 below 2, 1 in [2, 4), 2 in [4, 6]
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    if stochastic:
        lo = torch.floor(a / step) * step
        gen_device = generator.device if generator is not None else a.device
        u = torch.rand(a.shape, generator=generator, device=gen_device, dtype=torch.float32).to(a.device)
        q = lo + step * (u < (a - lo) / step).float()
    else:
        q = torch.round(a / step) * step  # torch.round is round-half-to-even
    return torch.copysign(q, x)


def e8m0_biased_exponent(v: torch.Tensor) -> torch.Tensor:
    """TE's float_to_e8m0: the biased exponent of a non-negative fp32, rounded up (toward +inf).

    0 -> 0, NaN -> 255, inf -> 254 (satfinite); fp32 subnormals <= 2**-127 round to 0.
    """
    v = v.float().contiguous()
    bits = v.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    round_up = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    out = exponent + round_up.to(torch.int32)
    out = torch.where(v == 0, torch.zeros_like(out), out)
    out = torch.where(torch.isinf(v), torch.full_like(out, 0xFE), out)
    out = torch.where(torch.isnan(v), torch.full_like(out, 0xFF), out)
    return out


def _e8m0_to_float(biased: torch.Tensor) -> torch.Tensor:
    """2**(biased - 127) exactly (2**-127 is an fp32 subnormal); 255 is NaN."""
    bits = torch.where(biased == 0, torch.full_like(biased, 0x00400000), biased << 23)
    out = bits.to(torch.int32).view(torch.float32)
    return torch.where(biased == 0xFF, torch.full_like(out, float("nan")), out)


def _e8m0_reciprocal(biased: torch.Tensor) -> torch.Tensor:
    """TE's exp2f_rcp: the multiplier used when quantizing (1 for a zero exponent, as in TE)."""
    bits = ((254 - biased).clamp(min=0) << 23).to(torch.int32)
    return torch.where(biased == 0, torch.ones_like(bits, dtype=torch.float32), bits.view(torch.float32))


# ----------------------------------------------------------------------------------------------
# quantized tensors


@dataclass
class Quantized:
    """Low-precision tensor, emulated.

    data: fp32 tensor of shape (M, K) holding exact format values (FP8 or E2M1 grid values).
    scale_inv: decode scale per block, shape (ceil(M / block[0]), ceil(K / block[1])), fp32;
        per-tensor formats use block = (M, K) and a (1, 1) scale.
    global_scale_inv: NVFP4 only, the per-tensor decode scale amax / (6 * 448) (0-dim fp32).
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int]
    global_scale_inv: Optional[torch.Tensor] = None

    def block_scales(self) -> torch.Tensor:
        """The decode scale broadcast to every element, shape of ``data``."""
        m, k = self.data.shape
        s = self.scale_inv
        if s.numel() == 1:
            return s.reshape(1, 1).expand(m, k)
        s = s.repeat_interleave(self.block[0], dim=0).repeat_interleave(self.block[1], dim=1)
        return s[:m, :k]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = self.data * self.block_scales()
        if self.global_scale_inv is not None:
            out = out * self.global_scale_inv
        return out.to(dtype)

    def t(self) -> "Quantized":
        """Transpose (valid without requantizing for per-tensor and square-tile formats only)."""
        if self.scale_inv.numel() != 1 and self.block[0] != self.block[1]:
            raise ValueError(f"a {self.block} block-scaled tensor must be requantized, not transposed")
        return Quantized(self.data.t(), self.scale_inv.t(), (self.block[1], self.block[0]), self.global_scale_inv)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"quantizers take a 2-D tensor (rows, cols), got shape {tuple(x.shape)}")
    return x.float()


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    m, k = x.shape
    pad_r, pad_c = (-m) % rows, (-k) % cols
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x


def _tile_amax(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Max |x| of each (rows x cols) tile of a padded 2-D tensor -> (M / rows, K / cols)."""
    m, k = x.shape
    return x.abs().reshape(m // rows, rows, k // cols, cols).amax(dim=(1, 3))


def _expand_tiles(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return s.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)


def compute_fp8_scale(amax: torch.Tensor, fmt: str, *, pow2: bool = False, margin: int = 0) -> torch.Tensor:
    """TE's compute_scale_from_amax: fp8_max / amax, 1 when amax is 0 or inf, fp32 max on overflow,
    optionally rounded down to a power of two."""
    amax = amax.float()
    scale = torch.tensor(FP8_MAX[fmt], dtype=torch.float32, device=amax.device) / amax
    if margin:
        scale = scale / (2.0**margin)
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    if pow2:
        # keep only the exponent bits: 2**floor(log2(scale))
        scale = (scale.contiguous().view(torch.int32) & 0x7F800000).view(torch.float32)
    bad = (amax == 0) | torch.isinf(amax) | torch.isnan(amax)
    return torch.where(bad, torch.ones_like(scale), scale)


def quantize_fp8_with_scale(x: torch.Tensor, scale: torch.Tensor, fmt: str = "e4m3") -> Quantized:
    """Per-tensor FP8 with a given scale (delayed scaling uses last steps' scale)."""
    x = _as_2d(x)
    scale = scale.float().reshape(())
    data = cast_fp8(x * scale, fmt)
    return Quantized(data, torch.reciprocal(scale).reshape(1, 1), (x.shape[0], x.shape[1]))


def quantize_fp8_tensorwise(x: torch.Tensor, fmt: str = "e4m3") -> Quantized:
    """Per-tensor FP8, current scaling (Float8CurrentScaling)."""
    x = _as_2d(x)
    amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    return quantize_fp8_with_scale(x, compute_fp8_scale(amax, fmt), fmt)


def quantize_fp8_block(
    x: torch.Tensor, tile: tuple[int, int] = (1, FP8_BLOCK), fmt: str = "e4m3", *, pow2: bool = True
) -> Quantized:
    """FP8 with one fp32 scale per tile (Float8BlockScaling: 1x128 activations/grads, 128x128 weights)."""
    if tile not in ((1, FP8_BLOCK), (FP8_BLOCK, FP8_BLOCK)):
        raise ValueError(f"FP8 block tiles are (1, 128) or (128, 128), got {tile}")
    x = _as_2d(x)
    m, k = x.shape
    xp = _pad_to(x, *tile)
    scale = compute_fp8_scale(_tile_amax(xp, *tile), fmt, pow2=pow2)
    data = cast_fp8(xp * _expand_tiles(scale, *tile), fmt)[:m, :k]
    return Quantized(data, torch.reciprocal(scale), tile)


def quantize_mxfp8(x: torch.Tensor, fmt: str = "e4m3") -> Quantized:
    """MXFP8: 1x32 blocks along the last dim, FP8 values, E8M0 (power of two) scales."""
    x = _as_2d(x)
    m, k = x.shape
    xp = _pad_to(x, 1, MXFP8_BLOCK)
    rcp = torch.tensor(1.0 / FP8_MAX[fmt], dtype=torch.float32, device=x.device)
    biased = e8m0_biased_exponent(_tile_amax(xp, 1, MXFP8_BLOCK) * rcp)
    data = cast_fp8(xp * _expand_tiles(_e8m0_reciprocal(biased), 1, MXFP8_BLOCK), fmt)[:m, :k]
    return Quantized(data, _e8m0_to_float(biased), (1, MXFP8_BLOCK))


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    two_d: bool = False,
    stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Quantized:
    """NVFP4: E2M1 values, one E4M3 scale per 1x16 block (16x16 tile when ``two_d``), fp32 tensor scale.

    Follows TE's NVFP4 reference quantizer: ``S_enc = 448*6 / amax`` (1 if that is 0, capped at fp32
    max), block decode scale ``e4m3(min(block_amax * (S_enc * (1/6)), 448))``, element encode scale
    ``1 / (block_scale * (1 / S_enc))``; the GEMM multiplies back by ``amax / (6*448)``.
    """
    x = _as_2d(x)
    m, k = x.shape
    tile = (NVFP4_BLOCK, NVFP4_BLOCK) if two_d else (1, NVFP4_BLOCK)
    xp = _pad_to(x, *tile)
    dev = x.device
    amax = xp.abs().amax() if xp.numel() else torch.zeros((), device=dev)
    s_enc = torch.tensor(E4M3_MAX * E2M1_MAX, dtype=torch.float32, device=dev) / amax
    s_enc = torch.clamp(s_enc, max=FP32_MAX)
    s_enc = torch.where(s_enc == 0, torch.ones_like(s_enc), s_enc)
    s_dec = torch.reciprocal(s_enc)
    multiplier = s_enc * torch.reciprocal(torch.tensor(E2M1_MAX, dtype=torch.float32, device=dev))
    block_scale = torch.clamp(_tile_amax(xp, *tile) * multiplier, max=FP32_MAX)
    block_scale = cast_fp8(block_scale, "e4m3")  # positive, saturates at 448
    encode = torch.clamp(torch.reciprocal(block_scale * s_dec), max=FP32_MAX)
    scaled = (xp * _expand_tiles(encode, *tile)).clamp(-E2M1_MAX, E2M1_MAX)
    data = round_e2m1(scaled, stochastic=stochastic, generator=generator)[:m, :k]
    global_dec = amax.float() / (E4M3_MAX * E2M1_MAX)
    return Quantized(data, block_scale, tile, global_dec)


# ----------------------------------------------------------------------------------------------
# random Hadamard transform


def hadamard16(
    *, random_signs: bool = True, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The 16x16 RHT matrix TE uses: diag(signs) @ Sylvester Hadamard / 4 (orthogonal, entries +-1/4)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if random_signs:
        h = torch.tensor(RHT_SIGNS, dtype=torch.float64)[:, None] * h
    return (h / 4.0).to(device=device, dtype=dtype)


def rht16(x: torch.Tensor, *, inverse: bool = False, random_signs: bool = True) -> torch.Tensor:
    """Apply the block-diagonal 16x16 RHT along the last dim (length must be a multiple of 16)."""
    n = x.shape[-1]
    if n % 16:
        raise ValueError(f"RHT needs the last dim to be a multiple of 16, got {n}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard16(random_signs=random_signs, device=x.device, dtype=dtype)
    if inverse:
        h = h.t()
    return (x.to(dtype).reshape(-1, 16) @ h).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# delayed scaling state


class DelayedScaler:
    """Per-tensor delayed scaling as TE's DelayedScaling: quantize with the scale derived from the amax
    history, then record this tensor's amax and update the scale for the next call.

    The history holds the last ``history_len`` amaxes; ``algo`` is "max" or "most_recent". TE updates
    scales once per autocast exit; here one update follows every quantization, which is the same when
    a module runs once per step.
    """

    def __init__(self, fmt: str, history_len: int = 1024, margin: int = 0, algo: str = "max"):
        _check_fp8_format(fmt)
        if algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {algo!r}")
        if history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {history_len}")
        self.fmt, self.history_len, self.margin, self.algo = fmt, history_len, margin, algo
        self.amax_history: Optional[torch.Tensor] = None
        self.scale: Optional[torch.Tensor] = None

    def _state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(amax history, scale) on ``device``: fresh on first use or when the tensors move device."""
        if self.amax_history is None or self.scale is None or self.amax_history.device != device:
            self.amax_history = torch.zeros(self.history_len, dtype=torch.float32, device=device)
            self.scale = torch.ones((), dtype=torch.float32, device=device)
        return self.amax_history, self.scale

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> Quantized:
        x = _as_2d(x)
        hist, scale = self._state(x.device)
        q = quantize_fp8_with_scale(x, scale, self.fmt)
        amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
        self._update(hist, scale, amax)
        return q

    def _update(self, hist: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor) -> None:
        hist[0] = amax
        chosen = hist.max() if self.algo == "max" else hist[0].clone()
        # TE rolls the window left and clears the slot the next amax goes to
        hist.copy_(torch.roll(hist, -1, 0))
        hist[0] = 0.0
        new = compute_fp8_scale(chosen, self.fmt, margin=self.margin)
        keep_old = (chosen <= 0) | ~torch.isfinite(chosen)
        self.scale = torch.where(keep_old, scale, new)

    def state_dict(self) -> dict:
        return {"amax_history": self.amax_history, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.amax_history, self.scale = state["amax_history"], state["scale"]


# ----------------------------------------------------------------------------------------------
# emulated recipes: how each of the three GEMM operands of a linear layer is quantized
#
#   fprop  y  = x  @ w.T      uses x "row" (blocks along K) and w "row" (blocks along K)
#   dgrad  dx = dy @ w        uses dy "row" (along N) and w "col" (w.T quantized along N)
#   wgrad  dw = dy.T @ x      uses dy "col" and x "col" (dy.T, x.T quantized along the tokens M)
#
# Each method returns fp32 dequantized tensors: (row (M, K), col (K, M) or None).

Operands = tuple[torch.Tensor, Optional[torch.Tensor]]


class EmulatedRecipe:
    """High precision: no quantization (the BF16 recipe)."""

    name = "bf16"

    def quantize_input(self, x: torch.Tensor, need_col: bool) -> Operands:
        return x.float(), (x.float().t() if need_col else None)

    def quantize_weight(self, w: torch.Tensor, need_col: bool) -> Operands:
        return w.float(), (w.float().t() if need_col else None)

    def quantize_grad(self, dy: torch.Tensor, need_col: bool) -> Operands:
        return dy.float(), (dy.float().t() if need_col else None)


class Fp8CurrentRecipe(EmulatedRecipe):
    """Float8CurrentScaling: per-tensor scales from this tensor's amax; HYBRID = E4M3 fwd, E5M2 grads."""

    name = "fp8_current"

    def __init__(self, fp8_format: str = "hybrid"):
        if fp8_format not in ("hybrid", "e4m3"):
            raise ValueError(f"fp8_format must be 'hybrid' or 'e4m3', got {fp8_format!r}")
        self.fwd_fmt = "e4m3"
        self.bwd_fmt = "e5m2" if fp8_format == "hybrid" else "e4m3"

    def _quantize(self, t: torch.Tensor, fmt: str, role: str) -> Quantized:
        return quantize_fp8_tensorwise(t, fmt)

    def _both(self, t: torch.Tensor, fmt: str, role: str, need_col: bool) -> Operands:
        # a per-tensor scale commutes with the transpose: the col copy is the same data transposed
        deq = self._quantize(t, fmt, role).dequantize()
        return deq, (deq.t() if need_col else None)

    def quantize_input(self, x: torch.Tensor, need_col: bool) -> Operands:
        return self._both(x, self.fwd_fmt, "input", need_col)

    def quantize_weight(self, w: torch.Tensor, need_col: bool) -> Operands:
        return self._both(w, self.fwd_fmt, "weight", need_col)

    def quantize_grad(self, dy: torch.Tensor, need_col: bool) -> Operands:
        return self._both(dy, self.bwd_fmt, "grad", need_col)


class Fp8DelayedRecipe(Fp8CurrentRecipe):
    """DelayedScaling: per-tensor scales from the amax history (one history per operand)."""

    name = "fp8_delayed"

    def __init__(
        self, fp8_format: str = "hybrid", amax_history_len: int = 1024, margin: int = 0, amax_compute_algo: str = "max"
    ):
        super().__init__(fp8_format)
        self.scalers = {
            "input": DelayedScaler(self.fwd_fmt, amax_history_len, margin, amax_compute_algo),
            "weight": DelayedScaler(self.fwd_fmt, amax_history_len, margin, amax_compute_algo),
            "grad": DelayedScaler(self.bwd_fmt, amax_history_len, margin, amax_compute_algo),
        }

    def _quantize(self, t: torch.Tensor, fmt: str, role: str) -> Quantized:
        return self.scalers[role].quantize(t)


class Fp8BlockRecipe(EmulatedRecipe):
    """Float8BlockScaling: E4M3, power-of-two scales, 1x128 activations and grads, 128x128 weights."""

    name = "fp8_block"

    def __init__(self, pow2_scales: bool = True):
        self.pow2 = pow2_scales

    def _vec(self, t: torch.Tensor) -> torch.Tensor:
        return quantize_fp8_block(t, (1, FP8_BLOCK), pow2=self.pow2).dequantize()

    def quantize_input(self, x: torch.Tensor, need_col: bool) -> Operands:
        return self._vec(x), (self._vec(x.t()) if need_col else None)

    def quantize_weight(self, w: torch.Tensor, need_col: bool) -> Operands:
        deq = quantize_fp8_block(w, (FP8_BLOCK, FP8_BLOCK), pow2=self.pow2).dequantize()
        return deq, (deq.t() if need_col else None)

    def quantize_grad(self, dy: torch.Tensor, need_col: bool) -> Operands:
        return self.quantize_input(dy, need_col)  # grads take the 1x128 activation tiling


class Mxfp8Recipe(EmulatedRecipe):
    """MXFP8BlockScaling: E4M3 everywhere, 1x32 blocks; the col copy is requantized from high precision."""

    name = "mxfp8"

    def _both(self, t: torch.Tensor, need_col: bool) -> Operands:
        return quantize_mxfp8(t).dequantize(), (quantize_mxfp8(t.t()).dequantize() if need_col else None)

    def quantize_input(self, x: torch.Tensor, need_col: bool) -> Operands:
        return self._both(x, need_col)

    def quantize_weight(self, w: torch.Tensor, need_col: bool) -> Operands:
        return self._both(w, need_col)

    def quantize_grad(self, dy: torch.Tensor, need_col: bool) -> Operands:
        return self._both(dy, need_col)


class Nvfp4Recipe(EmulatedRecipe):
    """NVFP4BlockScaling: 1x16 blocks (16x16 for weights), RHT on both wgrad operands, stochastic
    rounding on the gradient (dgrad and wgrad copies)."""

    name = "nvfp4"

    def __init__(
        self,
        rht: bool = True,
        stochastic_rounding: bool = True,
        two_d_weights: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        self.rht, self.sr, self.two_d, self.generator = rht, stochastic_rounding, two_d_weights, generator

    def _col(self, t: torch.Tensor, stochastic: bool) -> torch.Tensor:
        """t (M, K) -> (K, M') quantized along M, after the RHT; M' = M rounded up to 16 when RHT."""
        tt = t.float().t()
        if self.rht:
            tt = rht16(_pad_to(tt, 1, 16))
        return quantize_nvfp4(tt, stochastic=stochastic, generator=self.generator).dequantize()

    def quantize_input(self, x: torch.Tensor, need_col: bool) -> Operands:
        return quantize_nvfp4(x).dequantize(), (self._col(x, False) if need_col else None)

    def quantize_weight(self, w: torch.Tensor, need_col: bool) -> Operands:
        if self.two_d:
            deq = quantize_nvfp4(w, two_d=True).dequantize()
            return deq, (deq.t() if need_col else None)
        col = quantize_nvfp4(w.t()).dequantize() if need_col else None
        return quantize_nvfp4(w).dequantize(), col

    def quantize_grad(self, dy: torch.Tensor, need_col: bool) -> Operands:
        row = quantize_nvfp4(dy, stochastic=self.sr, generator=self.generator).dequantize()
        return row, (self._col(dy, self.sr) if need_col else None)


def make_recipe(name: str, **options: Any) -> EmulatedRecipe:
    """A fresh emulated recipe (stateful for fp8_delayed: use one per linear layer)."""
    factories: dict[str, Callable[..., EmulatedRecipe]] = {
        "bf16": EmulatedRecipe,
        "fp8_current": Fp8CurrentRecipe,
        "fp8_delayed": Fp8DelayedRecipe,
        "fp8_block": Fp8BlockRecipe,
        "mxfp8": Mxfp8Recipe,
        "nvfp4": Nvfp4Recipe,
    }
    if name not in factories:
        raise ValueError(f"unknown precision recipe {name!r}: use one of {', '.join(RECIPES)}")
    return factories[name](**options)


# ----------------------------------------------------------------------------------------------
# the emulated linear


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: EmulatedRecipe
    ) -> torch.Tensor:
        k = x.shape[-1]
        x2d = x.reshape(-1, k)
        x_row, x_col = recipe.quantize_input(x2d, need_col=weight.requires_grad)
        w_row, w_col = recipe.quantize_weight(weight, need_col=x.requires_grad)
        y = x_row @ w_row.t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x_col, w_col)
        ctx.recipe, ctx.x_shape, ctx.has_bias = recipe, x.shape, bias is not None
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x_col, w_col = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy_row, dy_col = ctx.recipe.quantize_grad(dy2d, need_col=need_dw)
        dx = dw = db = None
        if need_dx:
            dx = (dy_row @ w_col.t()).to(ctx.x_dtype).reshape(ctx.x_shape)
        if need_dw:
            dw = (dy_col @ x_col.t()).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2d.float().sum(0).to(ctx.w_dtype)
        return dx, dw, db, None


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: EmulatedRecipe
) -> torch.Tensor:
    """y = x @ weight.T (+ bias) with the fprop, dgrad and wgrad GEMM operands quantized by ``recipe``.

    GEMMs run in fp32 on the dequantized operands (as a tensor core accumulates in fp32); the output
    and the gradients come back in the input / weight dtypes.
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if type(recipe) is EmulatedRecipe:  # bf16: nothing to quantize
        return F.linear(x, weight, bias)
    if x.numel() == 0:
        return F.linear(x, weight, bias)
    return _QuantizedLinearFn.apply(x, weight, bias, recipe)


class ExpertGemm:
    """``linear_fn(x, w) -> x @ w.T`` for the routed experts (``latentforge.kernels.moe``), emulating one recipe.

    Stateful recipes (fp8_delayed) keep one state per expert weight, keyed by the weight's shape and
    storage offset in the stacked expert parameter.
    """

    def __init__(self, name: str, **options: Any):
        self.name, self.options = name, options
        self._recipes: dict[Hashable, EmulatedRecipe] = {}

    def recipe_for(self, w: torch.Tensor) -> EmulatedRecipe:
        key = (tuple(w.shape), w.storage_offset()) if self.name == "fp8_delayed" else None
        if key not in self._recipes:
            self._recipes[key] = make_recipe(self.name, **self.options)
        return self._recipes[key]

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, w, None, self.recipe_for(w))

    def __repr__(self) -> str:
        return f"ExpertGemm({self.name!r}, emulated)"


def quantization_error(x: torch.Tensor, name: str, **options: Any) -> float:
    """Relative Frobenius error of quantizing x (as a forward input) with a recipe; a diagnostic."""
    deq, _ = make_recipe(name, **options).quantize_input(x.reshape(-1, x.shape[-1]), need_col=False)
    ref = x.reshape(-1, x.shape[-1]).float()
    return float((deq - ref).norm() / ref.norm().clamp_min(1e-30))


__all__ = [
    "E4M3_MAX",
    "E5M2_MAX",
    "E2M1_MAX",
    "E2M1_VALUES",
    "RECIPES",
    "Quantized",
    "cast_fp8",
    "round_e2m1",
    "e8m0_biased_exponent",
    "compute_fp8_scale",
    "quantize_fp8_tensorwise",
    "quantize_fp8_with_scale",
    "quantize_fp8_block",
    "quantize_mxfp8",
    "quantize_nvfp4",
    "hadamard16",
    "rht16",
    "DelayedScaler",
    "EmulatedRecipe",
    "make_recipe",
    "quantized_linear",
    "ExpertGemm",
    "quantization_error",
]
