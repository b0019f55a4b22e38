"""INT4 RTN quantization: bit-exact against compressed-tensors, packing layout, round trip, group-size choice."""

from __future__ import annotations

import pytest
import torch

from lvllm_runtime.errors import BadInput
from lvllm_runtime.quant import dequantize_int4, pick_group_size, quantize_int4


def _ct_reference(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' own RTN path (what model_free_ptq runs) on a BF16 matrix [N, K]."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    wg = w.reshape(w.shape[0], -1, group)
    scale, zp = calculate_qparams(wg.amin(dim=-1), wg.amax(dim=-1), args)
    q = quantize(w, scale, zp, args, dtype=torch.int8)
    return pack_to_int32(q, 4), scale


@pytest.mark.parametrize("group", [128, 64, 32])
@pytest.mark.parametrize("shape", [(96, 256), (7, 384)])
def test_matches_compressed_tensors_bit_for_bit(group, shape):
    g = torch.Generator().manual_seed(group + shape[0])
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    w[0, :group] = 0  # an all-zero group takes the eps scale
    packed, scale = quantize_int4(w, group)
    ref_packed, ref_scale = _ct_reference(w, group)
    assert packed.dtype == torch.int32 and scale.dtype == torch.bfloat16
    assert torch.equal(scale, ref_scale.to(torch.bfloat16))
    assert torch.equal(packed, ref_packed)


def test_packing_layout_is_the_documented_one():
    # Row -8..7 (the -8 written as -7.5 so max|w| = 7.5 and scale = 1) is stored as u = 0..15:
    # words 0x76543210 and 0xfedcba98; -7.5 rounds half to even, to -8.
    w = torch.arange(-8, 8, dtype=torch.float32).repeat(2).reshape(1, 32)
    w[0, 0] = w[0, 16] = -7.5
    packed, s = quantize_int4(w, 32)
    assert s.item() == 1.0
    words = [x & 0xFFFFFFFF for x in packed[0].tolist()]
    assert words == [0x76543210, 0xFEDCBA98] * 2
    assert torch.equal(dequantize_int4(packed, s, 32)[0, 1:16], w[0, 1:16])


def test_round_trip_error_and_batched_shapes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 64, 256, generator=g)
    packed, scale = quantize_int4(w, 64)
    assert packed.shape == (3, 64, 32) and scale.shape == (3, 64, 4)
    back = dequantize_int4(packed, scale, 64)
    assert back.shape == w.shape and back.dtype == torch.float32
    rel = (back - w).norm() / w.norm()
    assert 0.01 < rel < 0.15
    # Each expert of the batch equals quantizing it alone.
    p1, s1 = quantize_int4(w[1], 64)
    assert torch.equal(p1, packed[1]) and torch.equal(s1, scale[1])


def test_pick_group_size():
    assert pick_group_size([2048, 768]) == 128
    assert pick_group_size([2880, 2880]) == 64
    assert pick_group_size([2688, 928]) == 32
    assert pick_group_size([2048, 768], 64) == 64
    with pytest.raises(BadInput, match="no INT4 group size"):
        pick_group_size([2048, 100])
    with pytest.raises(BadInput, match="does not divide"):
        pick_group_size([2880], 128)
    with pytest.raises(BadInput, match="not supported"):
        pick_group_size([2048], 16)
    with pytest.raises(BadInput):
        quantize_int4(torch.zeros(4, 100), 32)
