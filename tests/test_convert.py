"""Tests for swav_jax.convert: the release's PyTorch checkpoints <-> SwAVModel variables.

The PyTorch side is built here from the architecture (torchvision v1.5 ResNet with the
release's stem padding, projection head and prototypes), with the release's module names,
so its state dict has the release's exact keys. Forwards use tiny widths and small images;
full-size models are checked on shapes only, with zero-stride arrays.
"""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from swav_jax import cli  # noqa: E402
from swav_jax.convert import (  # noqa: E402
    load_pretrained,
    load_variables,
    model_for_variables,
    parse_arch,
    torch_state_dict_to_variables,
    variables_to_torch_state_dict,
)
from swav_jax.models import SwAVModel  # noqa: E402

# Blocks per stage and block kind (He et al. 2016, Table 1).
LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}


# ----------------------------------------------------------------------------------------
# The release's model, in plain PyTorch.


class TorchBlock(tnn.Module):
    """Residual block, torchvision v1.5: the stride sits on the 3x3 conv."""

    def __init__(self, in_channels, planes, stride, kind):
        super().__init__()
        self.kind = kind
        out_channels = planes * (4 if kind == "bottleneck" else 1)
        if kind == "basic":
            self.conv1 = tnn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
        else:
            self.conv1 = tnn.Conv2d(in_channels, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, out_channels, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                tnn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        relu = torch.relu
        y = relu(self.bn1(self.conv1(x)))
        if self.kind == "basic":
            y = self.bn2(self.conv2(y))
        else:
            y = relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return relu(y + shortcut)


class TorchPrototypeHeads(tnn.Module):
    """Several prototype heads, named prototypes0, prototypes1, ... (DeepCluster-v2 style)."""

    def __init__(self, dim, ks):
        super().__init__()
        for i, k in enumerate(ks):
            self.add_module(f"prototypes{i}", tnn.Linear(dim, k, bias=False))
        self.num_heads = len(ks)

    def forward(self, z):
        return [getattr(self, f"prototypes{i}")(z) for i in range(self.num_heads)]


class TorchSwAV(tnn.Module):
    """Backbone (stem: pad 1, then 7x7/2 conv with padding 2) + head + prototypes."""

    def __init__(self, arch, stem_width, hidden_mlp=0, output_dim=0, prototypes=()):
        super().__init__()
        stage_sizes, kind = LAYOUTS[arch]
        expansion = 4 if kind == "bottleneck" else 1
        self.padding = tnn.ConstantPad2d(1, 0.0)
        self.conv1 = tnn.Conv2d(3, stem_width, 7, 2, 2, bias=False)
        self.bn1 = tnn.BatchNorm2d(stem_width)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        in_channels = stem_width
        for s, n in enumerate(stage_sizes):
            planes = stem_width * 2**s
            blocks = []
            for b in range(n):
                blocks.append(TorchBlock(in_channels, planes, 2 if s > 0 and b == 0 else 1, kind))
                in_channels = planes * expansion
            setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
        self.projection_head = None
        if output_dim and hidden_mlp:
            self.projection_head = tnn.Sequential(
                tnn.Linear(in_channels, hidden_mlp),
                tnn.BatchNorm1d(hidden_mlp),
                tnn.ReLU(),
                tnn.Linear(hidden_mlp, output_dim),
            )
        elif output_dim:
            self.projection_head = tnn.Linear(in_channels, output_dim)
        self.prototypes = None
        if len(prototypes) == 1:
            self.prototypes = tnn.Linear(output_dim, prototypes[0], bias=False)
        elif prototypes:
            self.prototypes = TorchPrototypeHeads(output_dim, prototypes)

    def forward_backbone(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(self.padding(x)))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return x.mean(dim=(2, 3))

    def forward_head(self, features):
        z = tnn.functional.normalize(self.projection_head(features), dim=1, p=2)
        scores = self.prototypes(z)
        return z, scores if isinstance(scores, list) else [scores]



def convert_cli(argv):
    """`swav-jax convert ARGS...` through the real command line."""
    cli.main(["convert", *argv])

def _randomised(model, images):
    """`model` with random non-trivial weights and real BN running statistics, in eval mode.

    One train-mode forward with momentum=None (cumulative average) sets every running
    mean / variance to the batch statistics, so eval-mode activations stay O(1).
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (tnn.BatchNorm1d, tnn.BatchNorm2d)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.momentum = None
        model.train()
        features = model.forward_backbone(images)
        if model.projection_head is not None:
            model.forward_head(features)
        model.eval()
    return model


# name -> (arch, base_width, width, hidden_mlp, output_dim, prototypes, image size)
CONFIGS = {
    "r50_w2_head": ("resnet50", 4, 2, 32, 16, (10,), 64),
    "r18_nohidden_2heads": ("resnet18", 4, 1, 0, 8, (7, 5), 32),
}


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(torch model, NCHW images) for a CONFIGS entry."""
    arch, base_width, width, hidden, out_dim, ks, size = CONFIGS[name]
    torch.manual_seed(0)
    images = torch.randn(4, 3, size, size)
    model = TorchSwAV(arch, base_width * width, hidden, out_dim, ks)
    return _randomised(model, images), images


def _release_state_dict(model):
    """The model's state dict as the release saves it: DDP's `module.` prefix on each key."""
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}


def _convert_kwargs(name):
    arch, base_width, width, *_ = CONFIGS[name]
    return dict(arch=arch, width=width, base_width=base_width)


def _nhwc(images):
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def _assert_close(got, want):
    """JAX output vs PyTorch output (a tensor), to 1e-4."""
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-4)


def _torch_features(model, images):
    with torch.no_grad():
        return model.forward_backbone(images)


def _abstract_variables(model, size=32):
    crops = [jnp.zeros((1, 1, size, size, 3))]
    return dict(jax.eval_shape(lambda: model.init(jax.random.key(0), crops, train=False)))


def _assert_state_dicts_equal(got, want):
    want = {k: v for k, v in want.items() if not k.endswith("num_batches_tracked")}
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].is_contiguous(), k
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------------------
# Exact round trips and numerical agreement.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_exact(name):
    model, _ = _setup(name)
    state_dict = _release_state_dict(model)
    variables = torch_state_dict_to_variables(state_dict, **_convert_kwargs(name))

    # Same tree and shapes as the flax model's own variables.
    flax_model = model_for_variables(variables, **_convert_kwargs(name))
    want = _abstract_variables(flax_model, CONFIGS[name][-1])
    got_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
    assert got_shapes == jax.tree.map(lambda x: (x.shape, x.dtype), want)

    # torch -> jax -> torch: same keys, same order, same bits.
    _assert_state_dicts_equal(variables_to_torch_state_dict(variables), state_dict)
    # jax -> torch -> jax.
    exported = variables_to_torch_state_dict(variables)
    again = torch_state_dict_to_variables(exported, **_convert_kwargs(name))
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_layouts_are_transposed_as_documented():
    model, _ = _setup("r50_w2_head")
    sd = model.state_dict()
    v = torch_state_dict_to_variables(sd, **_convert_kwargs("r50_w2_head"))
    p, s = v["params"], v["batch_stats"]
    bb, bb_stats = p["backbone"], s["backbone"]
    t = {k: x.numpy() for k, x in sd.items()}
    eq = np.testing.assert_array_equal
    # conv OIHW -> HWIO: kernel[h, w, i, o] == weight[o, i, h, w]
    eq(bb["stage2_block0"]["conv2"]["kernel"], t["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    eq(
        bb["stage3_block0"]["downsample_conv"]["kernel"][0, 0],
        t["layer3.0.downsample.0.weight"][:, :, 0, 0].T,
    )
    eq(bb["stem_bn"]["scale"], t["bn1.weight"])
    eq(bb_stats["stage4_block2"]["bn3"]["var"], t["layer4.2.bn3.running_var"])
    eq(s["projection_bn"]["mean"], t["projection_head.1.running_mean"])
    eq(p["projection_out"]["kernel"], t["projection_head.3.weight"].T)
    eq(p["prototypes_0"]["kernel"], t["prototypes.weight"].T)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_match_pytorch(name):
    model, images = _setup(name)
    with torch.no_grad():
        want_features = model.forward_backbone(images)
        want_z, want_scores = model.forward_head(want_features)
    variables = torch_state_dict_to_variables(_release_state_dict(model), **_convert_kwargs(name))
    flax_model = model_for_variables(variables, **_convert_kwargs(name))

    features = flax_model.apply(variables, _nhwc(images), method=SwAVModel.features)
    _assert_close(features, want_features)
    # The full multi-crop forward (one crop group): embeddings and scores.
    z, scores = flax_model.apply(variables, [_nhwc(images)[None]], train=False)
    _assert_close(z[0], want_z)
    assert len(scores) == len(want_scores)
    for got, want in zip(scores, want_scores):
        _assert_close(got[0], want)
    assert float(jnp.abs(features).mean()) > 0.1  # not a trivially small comparison


def test_running_statistics_after_training_export_as_torch_computes_them():
    """Converted release weights trained a few train-mode steps here, exported back: the
    BN running means and variances are what PyTorch computes on the same batches (its
    unbiased running variance; the head's BatchNorm1d sees 4 rows, so n / (n - 1) = 4/3)."""
    import copy

    name = "r50_w2_head"
    model = copy.deepcopy(_setup(name)[0])
    variables = torch_state_dict_to_variables(_release_state_dict(model), **_convert_kwargs(name))
    flax_model = model_for_variables(variables, **_convert_kwargs(name))
    batches = [torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]

    for m in model.modules():
        if isinstance(m, (tnn.BatchNorm1d, tnn.BatchNorm2d)):
            m.momentum = 0.1  # the release's (and torch's) default
    model.train()
    with torch.no_grad():
        for images in batches:
            model.forward_head(model.forward_backbone(images))

    step = jax.jit(lambda v, x: flax_model.apply(v, [x[None]], train=True, mutable=["batch_stats"])[1])
    for images in batches:
        variables = {**variables, "batch_stats": step(variables, _nhwc(images))["batch_stats"]}
    exported = variables_to_torch_state_dict(jax.device_get(variables))
    want = _release_state_dict(model)
    stats = [k for k in want if k.endswith(("running_mean", "running_var"))]
    assert "module.projection_head.1.running_var" in stats and len(stats) > 100
    for k in stats:
        np.testing.assert_allclose(exported[k].numpy(), want[k].numpy(), rtol=2e-4, atol=1e-5, err_msg=k)


def test_backbone_only_checkpoint_as_torch_hub():
    """torch.hub's model: no prefix, no head, plus a random `fc` that must be dropped on purpose."""
    model, images = _setup("r50_w2_head")
    state_dict = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("projection_head", "prototypes"))
    }
    state_dict["fc.weight"] = torch.randn(1000, 256)
    state_dict["fc.bias"] = torch.randn(1000)
    kwargs = _convert_kwargs("r50_w2_head")
    with pytest.raises(ValueError, match=re.escape("'fc.bias', 'fc.weight'")):
        torch_state_dict_to_variables(state_dict, **kwargs)
    variables = torch_state_dict_to_variables(state_dict, ignore=("fc.",), **kwargs)
    assert set(variables["params"]) == {"backbone"} == set(variables["batch_stats"])
    flax_model = model_for_variables(variables, **kwargs)
    features = flax_model.apply(variables, _nhwc(images), method=SwAVModel.features)
    _assert_close(features, _torch_features(model, images))
    back = variables_to_torch_state_dict(variables, prefix="")
    assert list(back) == [
        k for k in state_dict if not k.startswith("fc.") and "num_batches" not in k
    ]


def test_accepts_numpy_and_low_precision_tensors():
    model, _ = _setup("r18_nohidden_2heads")
    sd = _release_state_dict(model)
    kwargs = _convert_kwargs("r18_nohidden_2heads")
    ref = torch_state_dict_to_variables(sd, **kwargs)
    as_numpy = torch_state_dict_to_variables({k: v.numpy() for k, v in sd.items()}, **kwargs)
    jax.tree.map(np.testing.assert_array_equal, as_numpy, ref)
    half = torch_state_dict_to_variables({k: v.to(torch.bfloat16) for k, v in sd.items()}, **kwargs)
    def rounded(x):
        return torch.from_numpy(np.asarray(x)).to(torch.bfloat16).float().numpy()

    want = jax.tree.map(rounded, ref)
    jax.tree.map(np.testing.assert_array_equal, half, want)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(half))


# ----------------------------------------------------------------------------------------
# Full-size models: key names and shapes, written out from the architecture.


def _release_shapes(width, hidden_mlp, output_dim, num_prototypes):
    """Every key and shape of the release's resnet50wN state dict (without module.), in order."""
    shapes = {}

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (c,)

    c = 64 * width
    shapes["conv1.weight"] = (c, 3, 7, 7)
    bn("bn1", c)
    in_c = c
    for s, n in enumerate((3, 4, 6, 3)):
        planes = 64 * width * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, in_c, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, in_c, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            in_c = 4 * planes
    shapes["projection_head.0.weight"] = (hidden_mlp, in_c)
    shapes["projection_head.0.bias"] = (hidden_mlp,)
    bn("projection_head.1", hidden_mlp)
    shapes["projection_head.3.weight"] = (output_dim, hidden_mlp)
    shapes["projection_head.3.bias"] = (output_dim,)
    shapes["prototypes.weight"] = (num_prototypes, output_dim)
    return shapes


# The released models: (width, hidden_mlp) as in the release's pretraining scripts, and the
# backbone's parameter count in millions as its model zoo table gives it.
@pytest.mark.parametrize(
    "width,hidden,millions", [(1, 2048, 24), (2, 8192, 94), (4, 8192, 375), (5, 10240, 586)]
)
def test_full_size_release_shapes(width, hidden, millions):
    shapes = _release_shapes(width, hidden, 128, 3000)
    # Zero-stride arrays: full-size shapes without the memory.
    state_dict = {f"module.{k}": np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    state_dict["module.bn1.num_batches_tracked"] = np.int64(5)
    variables = torch_state_dict_to_variables(state_dict, arch="resnet50", width=width)
    model = SwAVModel(
        arch="resnet50", width=width, hidden_dim=hidden, proj_dim=128, num_prototypes=(3000,)
    )
    want = _abstract_variables(model)
    assert jax.tree.map(lambda x: x.shape, variables) == jax.tree.map(lambda x: x.shape, want)
    assert model_for_variables(variables, arch="resnet50", width=width) == model
    count = sum(x.size for x in jax.tree.leaves(variables["params"]["backbone"]))
    assert round(count / 1e6) == millions
    if width == 1:
        # torchvision's ResNet-50 without its classifier: 25,557,032 - (2048 * 1000 + 1000).
        assert count == 23_508_032
        exported = variables_to_torch_state_dict(variables)
        assert [(k, tuple(v.shape)) for k, v in exported.items()] == [
            (f"module.{k}", s) for k, s in shapes.items()
        ]


# ----------------------------------------------------------------------------------------
# Errors name the key.


def _sd_and_kwargs():
    model, _ = _setup("r50_w2_head")
    return _release_state_dict(model), _convert_kwargs("r50_w2_head")


def test_unknown_key_is_named():
    sd, kwargs = _sd_and_kwargs()
    sd["module.layer1.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=re.escape("'module.layer1.0.extra.weight'")):
        torch_state_dict_to_variables(sd, **kwargs)
    # A block beyond the architecture is unknown too (resnet50 has 3 blocks in stage 4).
    sd, kwargs = _sd_and_kwargs()
    for k in list(sd):
        if k.startswith("module.layer4.2."):
            sd[k.replace("layer4.2.", "layer4.3.")] = sd[k]
    with pytest.raises(ValueError, match=re.escape("['module.layer4.3.bn1.bias', ")):
        torch_state_dict_to_variables(sd, **kwargs)


@pytest.mark.parametrize(
    "key",
    [
        "module.layer2.0.downsample.1.running_var",
        "module.conv1.weight",
        "module.projection_head.1.bias",
    ],
)
def test_missing_key_is_named(key):
    sd, kwargs = _sd_and_kwargs()
    del sd[key]
    with pytest.raises(ValueError, match=re.escape(f"lacks key '{key}'")):
        torch_state_dict_to_variables(sd, **kwargs)


def test_training_checkpoint_wrapper_is_refused_with_a_hint():
    sd, kwargs = _sd_and_kwargs()
    with pytest.raises(ValueError, match="'epoch' holds a int, not a tensor"):
        torch_state_dict_to_variables({"epoch": 3, "state_dict": sd}, **kwargs)


def test_incomplete_head_is_named():
    sd, kwargs = _sd_and_kwargs()
    del sd["module.prototypes.weight"]
    with pytest.raises(ValueError, match=re.escape("lacks key 'module.prototypes.weight'")):
        torch_state_dict_to_variables(sd, **kwargs)


def test_shape_mismatch_is_named():
    sd, kwargs = _sd_and_kwargs()
    sd["module.layer3.1.conv2.weight"] = sd["module.layer3.1.conv2.weight"][:, :, :1, :1]
    message = "'module.layer3.1.conv2.weight' has shape (32, 32, 1, 1)"
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_state_dict_to_variables(sd, **kwargs)
    # Wrong width: the first conv already disagrees.
    sd, kwargs = _sd_and_kwargs()
    with pytest.raises(ValueError, match=re.escape("'module.conv1.weight' has shape (8, 3, 7, 7)")):
        torch_state_dict_to_variables(sd, **{**kwargs, "width": 1})
    # Head layers that do not chain.
    sd, kwargs = _sd_and_kwargs()
    sd["module.projection_head.3.weight"] = torch.zeros(16, 31)
    with pytest.raises(ValueError, match=re.escape("'module.projection_head.3.weight'")):
        torch_state_dict_to_variables(sd, **kwargs)


def test_export_rejects_unknown_variables():
    sd, kwargs = _sd_and_kwargs()
    variables = torch_state_dict_to_variables(sd, **kwargs)
    variables["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="params/extra/kernel"):
        variables_to_torch_state_dict(variables)


def test_parse_arch():
    assert parse_arch("resnet50") == ("resnet50", 1)
    assert parse_arch("resnet50w5") == ("resnet50", 5)
    for bad in ("resnet51", "resnet50w0", "resnet50x2", "vit"):
        with pytest.raises(ValueError, match="arch"):
            parse_arch(bad)


# ----------------------------------------------------------------------------------------
# CLI and the on-disk format.


def test_cli_round_trip(tmp_path, capsys):
    model, images = _setup("r50_w2_head")
    sd = _release_state_dict(model)
    # main_swav.py's checkpoint layout: the state dict under 'state_dict'.
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "checkpoint.pth.tar")
    out = tmp_path / "converted"
    convert_cli(
        ["--from-torch", str(tmp_path / "checkpoint.pth.tar"), "--arch", "resnet50w2",
         "--base-width", "4", "--out", str(out)]
    )
    assert "resnet50w2" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["model.json", "variables"]

    flax_model, variables = load_pretrained(str(out))
    assert flax_model == SwAVModel(
        arch="resnet50", width=2, base_width=4, hidden_dim=32, proj_dim=16, num_prototypes=(10,)
    )
    features = flax_model.apply(variables, _nhwc(images), method=SwAVModel.features)
    _assert_close(features, _torch_features(model, images))

    convert_cli(["--to-torch", str(out), "--out", str(tmp_path / "back.pth.tar")])
    _assert_state_dicts_equal(torch.load(tmp_path / "back.pth.tar", weights_only=True), sd)

    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert_cli(["--from-torch", str(tmp_path / "back.pth.tar"), "--arch", "resnet50w2",
                     "--base-width", "4", "--out", str(out)])
    assert "already holds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_cli(["--from-torch", str(tmp_path / "back.pth.tar"), "--out", str(tmp_path / "x")])


def test_cli_backbone_only_and_plain_state_dict(tmp_path):
    model, images = _setup("r18_nohidden_2heads")
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(("projection", "prototypes"))
    }
    torch.save(sd, tmp_path / "hub.pth")
    hub, out, back = (str(tmp_path / n) for n in ("hub.pth", "c", "b.pth"))
    convert_cli(["--from-torch", hub, "--arch", "resnet18", "--base-width", "4", "--out", out])
    flax_model, variables = load_pretrained(out)
    features = flax_model.apply(variables, _nhwc(images), method=SwAVModel.features)
    _assert_close(features, _torch_features(model, images))
    convert_cli(["--to-torch", out, "--torch-prefix", "", "--out", back])
    _assert_state_dicts_equal(torch.load(back, weights_only=True), sd)


def test_load_variables_from_a_train_state_checkpoint(tmp_path):
    """--to-torch also reads a training checkpoint's state (params and batch_stats at top level)."""
    sd, kwargs = _sd_and_kwargs()
    variables = torch_state_dict_to_variables(sd, **kwargs)
    state = {"step": np.int32(7), "opt_state": {"mu": np.ones(3, np.float32)}, **variables}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "state"), state)
    checkpointer.wait_until_finished()
    loaded = load_variables(str(tmp_path / "state"))
    assert set(loaded) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


# ----------------------------------------------------------------------------------------
# torchvision, where installed: the torch.hub model is its resnet50.


def test_matches_torchvision_resnet50():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet50()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    tv.fc = tnn.Identity()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.momentum = None
        tv.train()
        tv(images)
        tv.eval()
        want = tv(images)
    variables = torch_state_dict_to_variables(tv.state_dict(), arch="resnet50")
    features = SwAVModel().apply(variables, _nhwc(images), method=SwAVModel.features)
    _assert_close(features, want)
    # And back: our export loads into torchvision's resnet50, missing only its classifier.
    fresh = torchvision.models.resnet50()
    exported = variables_to_torch_state_dict(variables, prefix="")
    result = fresh.load_state_dict(exported, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
