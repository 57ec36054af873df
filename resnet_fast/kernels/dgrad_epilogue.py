"""The dgrad epilogue, shared by the gather (:mod:`.conv_dgrad`) and TMA-box (:mod:`.conv_dgrad_box`) kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def epilogue(acc, n64, h, w, row_ok, c_glob, c_ok, pid0, T_PART, C_TOT, dx_ptr, y_ptr, isc_ptr, ish_ptr, imu_ptr,
             part_ptr, osc_ptr, sdx_n, sdx_h, sdx_w, sdx_c, sy_n, sy_h, sy_w, sy_c, EPI: tl.constexpr,
             OUT_SCALE: tl.constexpr, EPI_ALIGNED: tl.constexpr):
    """Store fp32 ``acc [BLOCK_M, BLOCK_N]`` (dx rows ``(n64, h, w)``, ``row_ok`` the valid ones; channels
    ``c_glob``, ``c_ok`` the valid ones) into ``dx``. ``EPI``: the conv input was ``relu(y_prev*in_scale +
    in_shift)``; store ``dz = dx`` where that is positive, else 0 (times ``out_scale[c]`` under ``OUT_SCALE``) and
    write the tile's ``Σdz`` and ``Σdz·(y_prev - in_centre)`` to ``partials[0 / 1, pid0, c]`` of ``[2, T_PART,
    C_TOT]``. ``EPI_ALIGNED``: unmasked 16-aligned channel rows."""
    out_mask = row_ok[:, None] & c_ok[None, :]
    if EPI:  # dz = dx * relu'(y_prev*scale + shift); partial Σdz, Σdz·(y_prev - mean) per tile
        y_row = n64 * sy_n + h * sy_h + w * sy_w
        if EPI_ALIGNED:
            y_row = tl.multiple_of(y_row, 16)
        y_off = y_row[:, None] + (c_glob * sy_c)[None, :]
        yp = tl.load(y_ptr + y_off, mask=out_mask, other=0.0).to(tl.float32)
        isc = tl.load(isc_ptr + c_glob, mask=c_ok, other=0.0)
        ish = tl.load(ish_ptr + c_glob, mask=c_ok, other=0.0)
        imu = tl.load(imu_ptr + c_glob, mask=c_ok, other=0.0)
        live = (yp * isc[None, :] + ish[None, :] > 0) & out_mask
        acc = tl.where(live, acc, 0.0)
        tl.store(part_ptr + pid0 * C_TOT + c_glob, tl.sum(acc, axis=0), mask=c_ok)
        tl.store(part_ptr + (T_PART + pid0) * C_TOT + c_glob,
                 tl.sum(acc * (yp - imu[None, :]), axis=0), mask=c_ok)
        if OUT_SCALE:  # store dz*out_scale[c] (the BN's input gradient); the partials stay sums of dz
            acc = acc * tl.load(osc_ptr + c_glob, mask=c_ok, other=0.0)[None, :]
    dx_row = n64 * sdx_n + h * sdx_h + w * sdx_w
    if EPI_ALIGNED:
        dx_row = tl.multiple_of(dx_row, 16)
    dx_off = dx_row[:, None] + (c_glob * sdx_c)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)
