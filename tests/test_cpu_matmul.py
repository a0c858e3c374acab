"""bfloat16 weights multiplied in float32 for wide inputs: same results to rounding, narrow inputs untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.cpu_matmul import cpu_has_native_bf16, use_float32_for_wide_inputs
from models.loader import LoadOptions, load_model


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def lm(request, tiny_models, model_cache):
    return load_model(tiny_models[request.param], model_cache, LoadOptions(dtype="bfloat16", weights="dense"))


def test_the_loader_routes_wide_inputs_only_where_bf16_is_emulated(lm):
    patched = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]
    assert bool(patched) == (not cpu_has_native_bf16())


def test_wide_inputs_give_the_bf16_results_to_rounding(lm):
    plain = copy.deepcopy(lm.model)
    for module in plain.modules():
        module.__dict__.pop("forward", None)
    wide = copy.deepcopy(plain)
    assert use_float32_for_wide_inputs(wide, min_rows=4) > 0
    ids = torch.tensor([lm.encode("The quick brown fox jumps over the lazy dog, twice over.")])
    with torch.inference_mode():
        expected = plain(input_ids=ids).logits.float()
        got = wide(input_ids=ids).logits.float()
    assert got.dtype == expected.dtype
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_narrow_inputs_take_the_bf16_kernel_unchanged():
    layer = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    use_float32_for_wide_inputs(layer, min_rows=16)
    narrow, wide = torch.randn(1, 3, 64, dtype=torch.bfloat16), torch.randn(2, 16, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(narrow), F.linear(narrow, layer.weight, layer.bias))
    out = layer(wide)
    assert out.dtype == torch.bfloat16
    reference = F.linear(wide.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    assert torch.equal(out, reference)
