"""Compile every Triton kernel of kernels/ for an H100 (sm_90) without a GPU.

Triton lowers to PTX and runs the bundled ptxas on any machine, so type errors, shape errors and
unsupported ops of the real GPU path surface in CPU-only CI (the interpreter does not catch those).
Run as a script (it must not see TRITON_INTERPRET=1): prints registers and spills per kernel.
"""

from __future__ import annotations

import os
import sys

BF16, F32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"


def _specs():
    import latentforge.kernels.conv1d_triton as conv
    import latentforge.kernels.cross_entropy_triton as ce
    import latentforge.kernels.moe_triton as moe
    import latentforge.kernels.rmsnorm_triton as rms
    import latentforge.kernels.ssd_triton as ssd

    ssd_cfg = dict(Q=128, BLOCK=64, BLOCK_P=64, BLOCK_N=128, PREC="tf32")
    specs = [
        (
            rms._group_rms_fwd,
            dict(X=BF16, Z=BF16, W=F32, Y=BF16, RSTD=F32, eps="fp32"),
            dict(HAS_Z=True, BLOCK_S=1024, ROWS_PER_PROG=4),
        ),
        (
            rms._group_rms_bwd,
            dict(X=BF16, Z=BF16, W=F32, RSTD=F32, DY=BF16, DX=BF16, DZ=BF16, DW_PART=F32),
            dict(HAS_Z=True, BLOCK_S=1024, ROWS_PER_PROG=4),
        ),
        (
            conv._conv_fwd_kernel,
            dict(X=BF16, W=F32, BIAS=F32, INIT=BF16, SEQ=I32, Y=BF16, DY=BF16, DACC=F32, DW_PART=F32, DB_PART=F32),
            dict(HAS_BIAS=True, HAS_INIT=True, HAS_SEQ=True, SILU=True, BACKWARD=False, K=4, BLOCK_T=32, BLOCK_C=64),
        ),
        (
            conv._conv_fwd_kernel,
            dict(X=BF16, W=F32, BIAS=F32, INIT=BF16, SEQ=I32, Y=BF16, DY=BF16, DACC=F32, DW_PART=F32, DB_PART=F32),
            dict(HAS_BIAS=True, HAS_INIT=True, HAS_SEQ=True, SILU=True, BACKWARD=True, K=4, BLOCK_T=32, BLOCK_C=64),
        ),
        (
            conv._conv_dx_kernel,
            dict(DACC=F32, W=F32, SEQ=I32, DX=BF16),
            dict(HAS_SEQ=True, K=4, BLOCK_T=32, BLOCK_C=64),
        ),
        (ce._lse_loss_kernel, dict(LOGITS=F32, LABELS=I64, LSE=F32, LOSS=F32), dict(BLOCK_V=4096)),
        (ce._softmax_grad_kernel, dict(LOGITS=F32, LABELS=I64, LSE=F32, SCALE=F32, DLOGITS=BF16), dict(BLOCK_V=4096)),
        (moe._gather_rows_kernel, dict(SRC=BF16, IDX=I32, DST=BF16), dict(BLOCK_R=32, BLOCK_D=128)),
        (
            moe._combine_kernel,
            dict(Y_SORTED=BF16, ROWS=I32, W=F32, OUT=BF16),
            dict(HAS_W=True, BLOCK_T=16, BLOCK_D=128),
        ),
        (
            moe._combine_bwd_kernel,
            dict(DOUT=BF16, Y_SORTED=BF16, ROWS=I32, W=F32, DY_SORTED=BF16, DW=F32),
            dict(HAS_W=True, BLOCK_D=1024),
        ),
    ]
    gemm_ptrs = dict(A=BF16, W=BF16, OUT=BF16, H=BF16, ACT=BF16, ROW_W=F32, DROW_W=F32, TABLE=I32)
    for epi in (moe.EPI_NONE, moe.EPI_UP, moe.EPI_DACT):
        specs.append(
            (
                moe._grouped_gemm_kernel,
                gemm_ptrs,
                dict(EPILOGUE=epi, HAS_ROW_W=True, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
            )
        )
    specs.append(
        (
            moe._grouped_wgrad_kernel,
            dict(DOUT=BF16, A=BF16, DW=BF16, TABLE=I32),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        )
    )
    specs += [
        (
            ssd._chunk_outer_kernel,
            dict(U=BF16, V=BF16, WT=F32, OUT=F32),
            dict(Q=128, BLOCK=64, BLOCK_P=64, BLOCK_N=128, PREC="tf32"),
        ),
        (
            ssd._state_passing_fwd_kernel,
            dict(S=F32, DECAY=F32, INIT=F32, HST=F32, FINAL=F32),
            dict(HAS_INIT=True, BLOCK=1024),
        ),
        (
            ssd._state_passing_bwd_kernel,
            dict(DHY=F32, HST=F32, DECAY=F32, DFINAL=F32, DS=F32, DINIT=F32, DDECAY_PART=F32),
            dict(BLOCK=1024),
        ),
        (
            ssd._chunk_scan_fwd_kernel,
            dict(X=BF16, DT=F32, ACUM=F32, WREAD=F32, Bm=BF16, Cm=BF16, HST=F32, D=F32, SEQ=I32, Y=BF16),
            dict(HAS_SEQ=True, HAS_D=True, **ssd_cfg),
        ),
        (
            ssd._chunk_scan_bwd_j_kernel,
            dict(
                X=BF16,
                DT=F32,
                ACUM=F32,
                WSTATE=F32,
                Bm=BF16,
                Cm=BF16,
                DY=BF16,
                DS=F32,
                D=F32,
                SEQ=I32,
                DX=BF16,
                DB_H=F32,
                DDT=F32,
                DACUM_J=F32,
                DWSTATE=F32,
            ),
            dict(HAS_SEQ=True, HAS_D=True, COMPUTE_DB=False, **ssd_cfg),
        ),
        (
            ssd._chunk_scan_bwd_j_kernel,
            dict(
                X=BF16,
                DT=F32,
                ACUM=F32,
                WSTATE=F32,
                Bm=BF16,
                Cm=BF16,
                DY=BF16,
                DS=F32,
                D=F32,
                SEQ=I32,
                DX=BF16,
                DB_H=F32,
                DDT=F32,
                DACUM_J=F32,
                DWSTATE=F32,
            ),
            dict(HAS_SEQ=True, HAS_D=True, COMPUTE_DB=True, **ssd_cfg),
        ),
        (
            ssd._chunk_scan_bwd_i_kernel,
            dict(
                X=BF16,
                DT=F32,
                ACUM=F32,
                WREAD=F32,
                Bm=BF16,
                Cm=BF16,
                DY=BF16,
                HST=F32,
                SEQ=I32,
                DC_H=F32,
                DACUM_I=F32,
                DWREAD=F32,
            ),
            dict(HAS_SEQ=True, **ssd_cfg),
        ),
    ]
    return specs


def compile_all(arch: int = 90):
    """Yields (kernel name, constexprs, compiled kernel) for each kernel compiled for sm_<arch>, with the
    num_warps its launcher uses (the module's NUM_WARPS table, default 4)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    for fn, ptrs, constexprs in _specs():
        signature = {}
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            else:
                signature[p.name] = ptrs.get(p.name, "i32")
        src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))
        module = sys.modules[fn.fn.__module__]
        num_warps = getattr(module, "NUM_WARPS", {}).get(fn.__name__, 4)
        yield fn.__name__, constexprs, triton.compile(src, target=target, options=dict(num_warps=num_warps))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_compile: unset TRITON_INTERPRET (it must compile real kernels)", file=sys.stderr)
        return 2
    for name, consts, compiled in compile_all():
        ptx = compiled.asm["ptx"]
        print(
            f"{name:32s} ok  ptx {len(ptx) // 1024:5d} KiB  cubin {len(compiled.asm['cubin']) // 1024:4d} KiB  "
            f"{ {k: v for k, v in consts.items() if k in ('EPILOGUE', 'BACKWARD')} }"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
