"""Symmetric INT4 group quantization (round to nearest) and its packing, compatible with compressed-tensors
`pack-quantized`, so AWQ/GPTQ symmetric checkpoints pass into the store unchanged.

Per output row, groups of `g` input columns: scale = max|w| / 7.5 (BF16), q = clamp(round_half_even(w / scale), -8, 7),
stored as u = q + 8, eight per int32, column 8j+k in bits 4k..4k+3. The arithmetic is done in BF16, as
compressed-tensors does it, so an RTN store matches `model_free_ptq` bit for bit.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import BadInput

GROUP_SIZES = (128, 64, 32)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w float [..., N, K] -> (packed int32 [..., N, K//8], scale bf16 [..., N, K//group]); K % group == 0."""
    *lead, n, k = w.shape
    if group % 8 or k % group:
        raise BadInput(f"cannot quantize {k} columns in groups of {group}", "pick a group size that divides the columns")
    wb = w.to(torch.bfloat16).contiguous().reshape(*lead, n, k // group, group)
    # max|w| on the bit patterns: with the sign bit cleared, BF16 orders like int16 (integer max is 2x faster).
    amax = (wb.view(torch.int16) & 0x7FFF).amax(dim=-1, keepdim=True).view(torch.bfloat16)
    scale = amax / 7.5
    # An all-zero group gets the dtype's eps (as compressed-tensors does) so the division stays finite.
    scale = torch.where(scale == 0, torch.finfo(torch.bfloat16).eps, scale)
    # |w / scale| <= 7.5 up to BF16 rounding, so the rounded codes fit int8 before the clamp.
    q = torch.round(wb / scale).to(torch.int8).clamp_(-8, 7).add_(8).reshape(*lead, n, k)
    # Column pairs as one little-endian int16 (even column low byte): v | v >> 4 puts the odd nibble above the even
    # one in the low byte, which four at a time is the int32 word.
    v = q.view(torch.int16)
    packed = (v | (v >> 4)).to(torch.uint8).view(torch.int32)
    return packed, scale.reshape(*lead, n, k // group)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """packed int32 [..., N, K//8], scale bf16 [..., N, K//group] -> float32 [..., N, K]."""
    *lead, n, words = packed.shape
    k = words * 8
    b = packed.contiguous().view(torch.uint8)
    q = torch.stack((b & 15, b >> 4), dim=-1).reshape(*lead, n, k // group, group).to(torch.float32) - 8.0
    return (q * scale.to(torch.float32).reshape(*lead, n, k // group, 1)).reshape(*lead, n, k)


def pick_group_size(dims: Iterable[int], requested: int | str = "auto") -> int:
    """The group size for matrices whose quantized (column) dimensions are `dims`: 128, else 64, else 32."""
    dims = list(dims)
    if requested == "auto":
        for g in GROUP_SIZES:
            if all(d % g == 0 for d in dims):
                return g
        raise BadInput(
            f"no INT4 group size in {list(GROUP_SIZES)} divides the expert dimensions {dims}",
            "use --format bf16, or --numa-nodes so that intermediate_size / nodes is a multiple of 32",
        )
    g = int(requested)
    if g not in GROUP_SIZES:
        raise BadInput(f"group size {g} is not supported", f"use one of {list(GROUP_SIZES)} or auto")
    bad = [d for d in dims if d % g]
    if bad:
        raise BadInput(f"group size {g} does not divide the expert dimensions {bad}", "use --group-size auto")
    return g


def stored_group_size(group: int, dims: Iterable[int]) -> int | None:
    """The group a matrix quantized in groups of `group` is stored in once its columns are cut into pieces of the
    sizes `dims` (a node's slice): `group` when it divides them all, else the largest of GROUP_SIZES that divides
    `group` and every piece (each scale is then repeated `group // stored` times, the packed codes are unchanged:
    a 128-group over two nodes of 64 columns is two 64-groups with the same scale); None when none does."""
    dims = list(dims)
    for g in GROUP_SIZES:
        if g <= group and group % g == 0 and all(d % g == 0 for d in dims):
            return g
    return None


def regroup_scales(scale: torch.Tensor, group: int, stored: int) -> torch.Tensor:
    """scale [..., N, K/group] -> [..., N, K/stored]: each scale repeated for the `group // stored` stored groups it
    covers (see `stored_group_size`)."""
    return scale if stored == group else scale.repeat_interleave(group // stored, dim=-1)
