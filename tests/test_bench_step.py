"""The train-step benchmarks' own arithmetic: the analytic model FLOP count (MFU's
numerator) against the FLOPs of the real model's traced convolutions and matmuls."""

import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from bench import step_common
from swav_jax.models import SwAVModel


def _traced_matmul_flops(fn, *args) -> int:
    """2 x multiply-adds of every convolution and dot_general in fn's jaxpr."""
    total = 0

    def walk(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                out = eqn.outvars[0].aval.shape
                rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                taps = math.prod(rhs[d] for d in rhs_spec[2:])
                total += 2 * math.prod(out) * taps * rhs[rhs_spec[1]]
            elif eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return total


@pytest.mark.parametrize(
    "arch,width,base_width,small_stem,num_crops,size_crops",
    [
        ("resnet50", 1, 64, False, (2, 6), (224, 96)),
        ("resnet50", 2, 8, False, (2, 4), (160, 96)),
        ("resnet18", 1, 8, True, (2, 4), (32, 16)),
        ("resnet34", 1, 8, False, (1, 1), (65, 33)),  # odd sizes: ceil in every stride
    ],
)
def test_analytic_flops_match_the_traced_model(arch, width, base_width, small_stem, num_crops, size_crops):
    model = SwAVModel(arch=arch, width=width, base_width=base_width, small_stem=small_stem,
                      hidden_dim=64, proj_dim=16, num_prototypes=(30, 7))
    crops = [jax.ShapeDtypeStruct((n, 1, s, s, 3), jnp.float32) for n, s in zip(num_crops, size_crops)]
    variables = jax.eval_shape(lambda c: model.init(jax.random.key(0), c, train=False), crops)
    traced = _traced_matmul_flops(lambda v, c: model.apply(v, c, train=False), variables, crops)
    analytic = step_common.train_flops_per_image(
        arch, num_crops, size_crops, width=width, base_width=base_width, small_stem=small_stem,
        hidden_dim=64, proj_dim=16, num_prototypes=(30, 7),
    )
    assert analytic == 3 * traced


def test_resnet50_forward_flops_match_torchvision_published():
    # torchvision's model card: ResNet-50 4.09 GFLOPS (multiply-adds), of which the
    # 2048 x 1000 classifier (absent here) is 0.002 G.
    macs = step_common.backbone_forward_flops("resnet50", 224) / 2
    assert abs(macs + 2048 * 1000 - 4.09e9) < 0.005e9


def test_parse_crops_and_peak_lookup():
    assert step_common.parse_crops("2x224+6x96") == ((2, 6), (224, 96))
    with pytest.raises(ValueError, match="--crops"):
        step_common.parse_crops("2x224,6x96")
    assert step_common.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert step_common.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert step_common.peak_flops("cpu", None) is None
    assert step_common.peak_flops("cpu", 2.0) == 2e12
