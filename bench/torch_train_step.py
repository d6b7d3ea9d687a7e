"""The SwAV train step written plainly in PyTorch with AMP: the baseline for bench/train_step.py.

    python bench/torch_train_step.py [--crops 2x224+6x96 2x160+4x96 2x224] [--batch 32 64 128 256]
                                     [--amp float16] [--steps 20] [--json out.json]

What users run today (the authors' release, main_swav.py), single device, our own code:
  - ResNet (torchvision's when torchvision is importable and the model is a standard one,
    else the same v1.5 layout written below), channels_last, cudnn.benchmark;
  - the release's multi-crop forward: crops of equal resolution concatenated and run
    through the backbone together, pooled features concatenated, head run once;
  - SwAV head Linear-BN-ReLU-Linear, L2 norm, bias-free prototypes, normalised in place
    before every forward;
  - Sinkhorn as `distributed_sinkhorn` (single process: its all_reduce calls are
    identities), in float32 (the release's fp16 exp overflows), no gradient;
  - the swapped-prediction loss exactly as the release's loop computes it;
  - SGD momentum 0.9 + apex LARC(clip=False), trust 0.001, weight decay 1e-6 inside LARC,
    no parameter excluded; written with foreach ops and without apex's per-tensor host
    synchronisation (`if param_norm != 0 and grad_norm != 0`), so if anything faster
    than the release;
  - autocast (--amp float16 with a GradScaler, as the release's apex loss scaling;
    bfloat16 without one; none = float32).
The input is synthetic float32 crops, already normalised and on the device: the release
augments on the host, so unlike the JAX step this one does no augmentation.

Timing, FLOPs and the table are bench/train_step.py's (bench/step_common.py): median
over --steps steps after --warmup, synchronising after each; peak memory is
torch.cuda.max_memory_allocated() of the point. Runs on CPU too (float32), for a smoke test:
    python bench/torch_train_step.py --arch resnet18 --base-width 8 --small-stem \\
        --hidden-dim 32 --prototypes 30 --crops 2x32+4x16 --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import step_common  # noqa: E402

CROPS_FOR_ASSIGN = (0, 1)
TEMPERATURE = 0.1
EPSILON = 0.05
SINKHORN_ITERS = 3
BASE_LR = 4.8
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
TRUST = 0.001
LARC_EPS = 1e-8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crops", nargs="+", default=["2x224+6x96", "2x160+4x96", "2x224"])
    p.add_argument("--batch", nargs="+", type=int, default=[32, 64, 128, 256])
    p.add_argument("--arch", default="resnet50", choices=sorted(step_common.ARCHS))
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--base-width", type=int, default=64)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--prototypes", type=int, default=3000)
    p.add_argument("--amp", default=None, choices=["float16", "bfloat16", "none"],
                   help="autocast dtype (default: float16 on CUDA, none on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per device, in TFLOP/s")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for spec in args.crops:
        step_common.parse_crops(spec)
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 1:
        p.error("--batch, --steps and --warmup must be >= 1")
    return args


# ---------------------------------------------------------------------------------------
# ResNet, torchvision v1.5 layout with the release's width multiplier (used when
# torchvision is missing or the model is not a standard torchvision one).


class Block(nn.Module):
    def __init__(self, kind: str, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * (4 if kind == "bottleneck" else 1)
        if kind == "basic":
            convs = [nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)]
        else:
            convs = [
                nn.Conv2d(cin, planes, 1, bias=False),
                nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                nn.Conv2d(planes, cout, 1, bias=False),
            ]
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c.out_channels) for c in convs)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = bn(conv(y))
            if i + 1 < len(self.convs):
                y = F.relu(y, inplace=True)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(y + shortcut, inplace=True)


class ResNetTrunk(nn.Module):
    """ResNet up to global average pooling: [N, 3, H, W] -> [N, features]."""

    def __init__(self, arch: str, width: int, base_width: int, small_stem: bool):
        super().__init__()
        stages, kind = step_common.ARCHS[arch]
        c = base_width * width
        if small_stem:
            stem = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
        layers, cin = [], c
        for s, blocks in enumerate(stages):
            for b in range(blocks):
                layers.append(Block(kind, cin, c * 2**s, 2 if s > 0 and b == 0 else 1))
                cin = layers[-1].convs[-1].out_channels
        self.body = nn.Sequential(*stem, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.body(x)


def make_backbone(args) -> tuple[nn.Module, str]:
    standard = args.width == 1 and args.base_width == 64 and not args.small_stem
    if standard:
        try:
            import torchvision
        except ImportError:
            torchvision = None
        if torchvision is not None:
            net = getattr(torchvision.models, args.arch)()
            net.fc = nn.Identity()
            return net, f"torchvision {torchvision.__version__} {args.arch}"
    return ResNetTrunk(args.arch, args.width, args.base_width, args.small_stem), f"local {args.arch}"


# ---------------------------------------------------------------------------------------
# SwAV: head, multi-crop forward, Sinkhorn, loss, LARC.


class SwAVNet(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, hidden_dim: int, proj_dim: int, num_prototypes: int):
        super().__init__()
        self.backbone = backbone
        if hidden_dim:
            self.projection_head = nn.Sequential(
                nn.Linear(features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, proj_dim),
            )
        else:
            self.projection_head = nn.Linear(features, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)

    def forward(self, inputs: list[torch.Tensor]):
        # The release: one backbone pass per run of consecutive crops of equal resolution.
        outputs, start = [], 0
        for end in range(1, len(inputs) + 1):
            if end == len(inputs) or inputs[end].shape[-1] != inputs[start].shape[-1]:
                outputs.append(self.backbone(torch.cat(inputs[start:end])))
                start = end
        x = F.normalize(self.projection_head(torch.cat(outputs)), dim=1, p=2)
        return x, self.prototypes(x)


@torch.no_grad()
def sinkhorn(out: torch.Tensor) -> torch.Tensor:
    """The release's distributed_sinkhorn on one process, float32."""
    q = torch.exp(out.float() / EPSILON).t()
    num_samples, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(SINKHORN_ITERS):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= num_samples
    q *= num_samples
    return q.t()


def swav_loss(output: torch.Tensor, batch: int, num_views: int) -> torch.Tensor:
    loss = 0
    for crop_id in CROPS_FOR_ASSIGN:
        q = sinkhorn(output[batch * crop_id: batch * (crop_id + 1)].detach())
        subloss = 0
        for v in range(num_views):
            if v != crop_id:
                x = output[batch * v: batch * (v + 1)] / TEMPERATURE
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (num_views - 1)
    return loss / len(CROPS_FOR_ASSIGN)


@torch.no_grad()
def larc_(params: list[torch.Tensor]) -> None:
    """apex LARC(clip=False) with its weight decay, in place on the grads.

    Per tensor, if ||w|| > 0 and ||g|| > 0: g <- (g + wd w) * trust ||w|| / (||g|| + wd ||w|| + eps),
    else g unchanged.
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    w = torch.stack(torch._foreach_norm(params))
    g = torch.stack(torch._foreach_norm(grads))
    use = (w > 0) & (g > 0)
    ratio = torch.where(use, TRUST * w / (g + WEIGHT_DECAY * w + LARC_EPS), torch.ones_like(w))
    decay = torch.where(use, WEIGHT_DECAY * ratio, torch.zeros_like(w))
    torch._foreach_mul_(grads, list(ratio.unbind()))
    torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind())))


class Step:
    """One training step of the release's loop (prototypes already unfrozen)."""

    def __init__(self, model: SwAVNet, amp: str, device: torch.device):
        self.model = model
        # apex LARC sets the wrapped SGD's weight decay to 0 and applies it itself.
        self.sgd = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM, weight_decay=0.0)
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "float16")
        self.device = device

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            w = F.normalize(self.model.prototypes.weight.data.clone(), dim=1, p=2)
            self.model.prototypes.weight.copy_(w)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            _, output = self.model(inputs)
            loss = swav_loss(output, inputs[0].shape[0], len(inputs))
        self.sgd.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.sgd)
        larc_(list(self.model.parameters()))
        self.scaler.step(self.sgd)
        self.scaler.update()
        return loss.detach()



def run_point(args, spec: str, batch: int, device: torch.device, amp: str, peak) -> dict:
    num_crops, size_crops = step_common.parse_crops(spec)
    backbone, _ = make_backbone(args)
    features = step_common.num_features(args.arch, args.width, args.base_width)
    model = SwAVNet(backbone, features, args.hidden_dim, args.proj_dim, args.prototypes)
    model = model.to(device, memory_format=torch.channels_last).train()
    step = Step(model, amp, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [
        torch.randn(batch, 3, s, s, generator=gen).to(device, memory_format=torch.channels_last)
        for n, s in zip(num_crops, size_crops) for _ in range(n)
    ]
    cuda = device.type == "cuda"

    def timed(count):
        times, loss = [], None
        for _ in range(count):
            t = time.perf_counter()
            loss = step(inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times, loss

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed(args.warmup)
    times, loss = timed(args.steps)
    fpi = step_common.train_flops_per_image(
        args.arch, num_crops, size_crops, width=args.width, base_width=args.base_width,
        small_stem=args.small_stem, hidden_dim=args.hidden_dim, proj_dim=args.proj_dim,
        num_prototypes=(args.prototypes,),
    )
    row = {"mode": "synthetic", "crops": spec, "per_device_batch": batch, "num_devices": 1, "dtype": amp,
           "model_gflop_per_image": fpi / 1e9, **step_common.step_stats(times), "loss": float(loss)}
    row.update(step_common.throughput(row, per_device_batch=batch, num_devices=1, flops_per_image=fpi, peak=peak))
    if cuda:
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return row


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    amp = args.amp or ("float16" if cuda else "none")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the release
    kind = torch.cuda.get_device_name() if cuda else "cpu"
    peak = step_common.peak_flops(kind, args.peak_tflops) if amp != "none" or args.peak_tflops else None
    info = step_common.run_info("PyTorch train step")
    info.update(device=f"1 x {device.type}: {kind}", torch=torch.__version__, amp=amp,
                backbone=make_backbone(args)[1], threads=torch.get_num_threads())
    info["flops_note"] = f"backbone: {info['backbone']}; autocast: {amp}"
    rows = []
    for spec in args.crops:
        for batch in args.batch:
            print(f"[{spec} batch {batch}] ...", file=sys.stderr, flush=True)
            try:
                row = run_point(args, spec, batch, device, amp, peak)
            except torch.cuda.OutOfMemoryError as e:
                row = {"mode": "synthetic", "crops": spec, "per_device_batch": batch, "num_devices": 1,
                       "note": f"failed: out of memory ({str(e).splitlines()[0][:80]})"}
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"  {row.get('step_ms', float('nan')):.1f} ms/step, {row.get('img_per_s', float('nan')):.1f} img/s",
                  file=sys.stderr, flush=True)
    step_common.print_table(info, rows)
    if args.json:
        step_common.write_json(args.json, info, rows)


if __name__ == "__main__":
    main()
