"""SimMIM: A Simple Framework for Masked Image Modeling (Xie et al., arXiv 2111.09886).

Reference: github.com/microsoft/SimMIM (models/{simmim,swin_transformer,vision_transformer}.py, data/data_simmim.py,
main_simmim.py, optimizer.py, lr_scheduler.py, configs/). The encoder sees every patch; masked ones are replaced by a
learned mask token right after the patch embedding. A one-layer head (1x1 conv + PixelShuffle) regresses the raw
pixels, and an L1 loss counts only the masked area. Unlike MAE this works for hierarchical encoders such as Swin.

    python simmim.py --demo                                        # tiny Swin, synthetic images: 82 s of CPU time
    torchrun --nproc_per_node=8 simmim.py --data imagenet/         # Swin-B/192, window 6, 100-epoch recipe
    torchrun --nproc_per_node=8 simmim.py --data imagenet/ --model vit_base   # ViT-B/16 at 224, 800 epochs

Deviations from the reference:
- The effective batch is `--global_batch` (2048, the reference README's 16 GPUs x 128); `accum_iter` is derived from it.
- bf16 autocast by default on CUDA (reference: apex O1 mixed precision; `--amp fp16` gives fp16 + GradScaler).
- Masks are drawn on the device each step (reference: numpy in the data workers); same algorithm and counts.
- The schedule is set from the fractional epoch, i.e. per optimizer step; the reference steps timm's scheduler per
  micro-batch, which is the same curve when there is no accumulation.
- A non-finite loss/gradient skips the optimizer step and is counted (reference: apex skips fp16 overflows silently).
- An epoch is truncated to a whole number of accumulation cycles.
- Checkpoints are `checkpoint.pth` (resumed by itself) and `checkpoint-<epoch>.pth` every 5 epochs (reference
  `ckpt_epoch_<epoch>.pth`, 0-based); their 'model' keys are the reference's, so they load both ways.
- The head predicts `in_chans` channels (reference: always 3) and the grid may be non-square (reference: square).
- Sizes whose stage resolutions do not split into whole windows stop with a message (reference: an assert).
- AdamW is torch's fused kernel (same update up to rounding), so a non-finite step is skipped without a host sync.
- Data: JPEGs are decoded at reduced size by `Image.draft` when the crop allows it, and crop + resize is one
  `Image.resize(box=...)` call, so crops from big JPEGs differ from torchvision's by resampling detail only.
"""
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, Attention, Block, Evaluation, Logger, Mlp, PatchEmbed,
                    RelativePositionBias, accumulation, amp_setup, check_args, check_mask_ratio, count_flops,
                    drop_path, finish, image_dataset, make_loader, normalize, optimizer_step, pair, param_groups,
                    parse_args, report_flops, resume, save_grid, save_loss_curve, save_training_state, setup_run,
                    unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny Swin on synthetic images: 82 s of CPU time
    output_dir: str = 'output_simmim'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'swin_base'  # swin_base | swin_large | vit_base | tiny | vit_tiny (MODELS below)
    input_size: Optional[tuple[int, ...]] = None  # H [W]; None: the preset's (Swin 192, ViT 224; ref configs)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_patch_size: int = 32  # ref configs DATA.MASK_PATCH_SIZE: masking granularity in pixels
    mask_ratio: float = 0.6  # ref configs DATA.MASK_RATIO; ceil(ratio x blocks) blocks are masked
    drop_path: Optional[float] = None  # None: the preset's (Swin 0.0, ViT 0.1; ref configs)
    batch_size: int = 128  # per GPU; ref config.py DATA.BATCH_SIZE
    global_batch: int = 2048  # ref README: 16 GPUs x 128; accum_iter = global_batch / (batch_size x GPUs)
    epochs: Optional[int] = None  # None: the preset's (swin_base 100, swin_large and vit_base 800; ref configs)
    warmup_epochs: int = 10  # ref configs
    lr_schedule: Optional[str] = None  # cosine | multistep; None: multistep from 800 epochs on, else cosine (ref)
    milestones: Optional[tuple[int, ...]] = None  # multistep: lr x0.1 at these epochs; None: 7/8 of epochs (700/800)
    blr: Optional[float] = None  # lr = blr x global_batch / 512 (ref); None: cosine 2e-4, multistep 1e-4 (ref)
    warmup_lr: Optional[float] = None  # scaled like blr; None: cosine 1e-6, multistep 5e-7 (ref configs)
    min_lr: Optional[float] = None  # cosine floor, scaled like blr; None: 1e-5 (ref 100-epoch config)
    weight_decay: float = 0.05  # ref configs
    betas: tuple = (0.9, 0.999)  # ref config.py TRAIN.OPTIMIZER.BETAS
    clip_grad: float = 5.0  # ref config.py TRAIN.CLIP_GRAD
    mean: tuple = IMAGENET_MEAN  # ref data_simmim.py Normalize
    std: tuple = IMAGENET_STD  # ref data_simmim.py Normalize
    num_workers: int = 8  # ref config.py DATA.NUM_WORKERS
    seed: int = 0  # ref config.py SEED; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference SimMIM pretraining release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 5  # ref configs SAVE_FREQ: checkpoint-<epoch>.pth every 5 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# ref configs/*.yaml and models/build.py; img/epochs/drop_path are the presets' recipe defaults
MODELS = {
    'swin_base': dict(kind='swin', patch=4, dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=6,
                      img=192, epochs=100, drop_path=0.0),
    'swin_large': dict(kind='swin', patch=4, dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window=12,
                       img=192, epochs=800, drop_path=0.0),
    'vit_base': dict(kind='vit', patch=16, dim=768, depth=12, heads=12, img=224, epochs=800, drop_path=0.1),
    'tiny': dict(kind='swin', patch=4, dim=32, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8), window=2,
                 img=64, epochs=100, drop_path=0.0),  # ours, for the demo and tests
    'vit_tiny': dict(kind='vit', patch=8, dim=64, depth=4, heads=4, img=64, epochs=800, drop_path=0.1),  # ours
}
RECIPES = {  # ref configs: swin_base 100ep (cosine) and vit_base 800ep (multistep), lrs per 512 images
    'cosine': dict(blr=2e-4, warmup_lr=1e-6, min_lr=1e-5),
    'multistep': dict(blr=1e-4, warmup_lr=5e-7, min_lr=5e-6),  # min_lr unused (ref config.py default)
}
DEMO = dict(data='synthetic:2048', model='tiny', input_size=(64,), mask_patch_size=16, batch_size=64,
            global_batch=64, epochs=6, warmup_epochs=1, lr_schedule='cosine', blr=4e-3, warmup_lr=1e-5,
            num_workers=2, output_dir='output_simmim_demo', log_every=8, keep_every=3, eval_data='synthetic:1000')


def resolve(args):
    """Fill the recipe fields left at None from the model preset and the schedule the reference uses for the
    chosen length."""
    if args.model not in MODELS:
        raise SystemExit(f'--model {args.model} is not one of {", ".join(MODELS)}')
    m = MODELS[args.model]
    fill = dict(input_size=(m['img'],), epochs=m['epochs'], drop_path=m['drop_path'])
    args = dataclasses.replace(args, **{k: v for k, v in fill.items() if getattr(args, k) is None})
    sched = args.lr_schedule or ('multistep' if args.epochs >= 800 else 'cosine')
    if sched not in RECIPES:
        raise SystemExit(f'--lr_schedule is one of {", ".join(RECIPES)}')
    fill = dict(RECIPES[sched], lr_schedule=sched, milestones=(args.epochs * 7 // 8,))
    return dataclasses.replace(args, **{k: v for k, v in fill.items() if getattr(args, k) is None})


def lr_at(epoch, lr, warmup_lr, min_lr, args):
    """The reference's per-step schedule at a fractional epoch: linear warmup from warmup_lr, then either timm's
    CosineLRScheduler (its cosine is indexed from step 0, not from the end of warmup: warmup_prefix=False) or
    MultiStepLRScheduler (x0.1 at each milestone reached)."""
    if epoch < args.warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / args.warmup_epochs
    if args.lr_schedule == 'multistep':
        return lr * 0.1 ** sum(epoch >= m for m in args.milestones)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / args.epochs))

# ---------------------------------------------------------------- masking (paper Sec. 3.1, ref MaskGenerator)


def block_mask(B, input_size, mask_patch, model_patch, mask_ratio, device, generator=None):
    """Random masking of mask_patch x mask_patch pixel blocks: exactly ceil(ratio x blocks) blocks per image, each
    expanded to the model's patch grid. Returns (B, H/p, W/p) bool, True = masked."""
    H, W = input_size
    rh, rw = H // mask_patch, W // mask_patch
    count = math.ceil(rh * rw * mask_ratio)
    noise = torch.rand(B, rh * rw, device=device, generator=generator)  # (B, blocks): a random permutation each
    mask = torch.zeros(B, rh * rw, dtype=torch.bool, device=device)
    mask.scatter_(1, noise.argsort(dim=1)[:, :count], True)  # (B, blocks)
    s = mask_patch // model_patch
    return mask.view(B, rh, rw).repeat_interleave(s, 1).repeat_interleave(s, 2)  # (B, H/p, W/p)

# ---------------------------------------------------------------- Swin Transformer (Liu et al., 2103.14030)


def window_partition(x, ws):
    """(B, H, W, C) -> (B, nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(B, -1, ws * ws, C)


def window_reverse(x, ws, H, W):
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/ws, ws, W/ws, ws, C)
    return x.reshape(B, H, W, C)


def relative_position_index(ws):
    """(ws*ws, ws*ws): row offset (shifted to >= 0) x (2ws-1) + column offset, as in Swin's WindowAttention."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + ws - 1  # (2, N, N), each offset in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]


def shifted_window_mask(H, W, ws, shift):
    """Additive (nW, N, N) mask for SW-MSA: after the cyclic shift, a window can hold pieces of up to 4 image
    regions that are not neighbours; tokens of different regions get -100 (the reference's value)."""
    def region(n):  # 0: untouched, 1: [n-ws, n-shift), 2: the wrapped-around last `shift` rows/columns
        i = torch.arange(n)
        return (i >= n - ws).long() + (i >= n - shift).long()
    label = region(H)[:, None] * 3 + region(W)[None, :]  # (H, W)
    label = window_partition(label[None, :, :, None], ws)[0, :, :, 0]  # (nW, N)
    return (label[:, :, None] != label[:, None, :]).float() * -100.0  # (nW, N, N)


class WindowAttention(Attention):
    """Multi-head attention inside each window, with a learned bias per relative offset, through SDPA."""

    def __init__(self, dim, ws, num_heads):
        super().__init__(dim, num_heads, qkv_bias=True)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer('relative_position_index', relative_position_index(ws))

    def forward(self, x, mask=None):  # x (B, nW, N, C); mask (nW, N, N) additive or None
        B, nW, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, heads, N, C/heads)
        q, k, v = qkv.reshape(3, B, nW * h, N, C // h)  # windows x heads as SDPA's head axis: a 4-D fused kernel
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        bias = bias.view(N, N, h).permute(2, 0, 1)  # (heads, N, N)
        bias = bias + mask[:, None] if mask is not None else bias.expand(nW, h, N, N)  # (nW, heads, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, nW * h, N, N).to(q.dtype))
        return self.proj(x.view(B, nW, h, N, C // h).transpose(2, 3).reshape(B, nW, N, C))  # (B, nW, N, C)


class SwinBlock(nn.Module):
    """(Shifted-)window attention block. A stage whose resolution fits in one window uses that window, unshifted."""

    def __init__(self, dim, res, num_heads, ws, shift, drop_path=0.0):
        super().__init__()
        if min(res) <= ws:
            ws, shift = min(res), 0
        if res[0] % ws or res[1] % ws:
            raise SystemExit(f'a Swin stage of {res[0]}x{res[1]} tokens does not split into {ws}x{ws} windows: '
                             f'choose --input_size so that every stage resolution is a multiple of the window')
        self.res, self.ws, self.shift, self.drop_path = res, ws, shift, drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.register_buffer('attn_mask', shifted_window_mask(*res, ws, shift) if shift else None)

    def forward(self, x):  # (B, H*W, C)
        (H, W), B, C = self.res, x.shape[0], x.shape[2]
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))  # cyclic shift (Swin Sec. 3.2)
        y = self.attn(window_partition(y, self.ws), self.attn_mask)  # (B, nW, ws*ws, C)
        y = window_reverse(y, self.ws, H, W)  # (B, H, W, C)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y.reshape(B, H * W, C), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated in the reference's order, LayerNorm, then Linear 4C -> 2C without bias."""

    def __init__(self, res, dim):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        (H, W), B, C = self.res, x.shape[0], x.shape[2]
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))  # (B, H*W/4, 2C)


class SwinStage(nn.Module):
    def __init__(self, dim, res, depth, num_heads, ws, dpr, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, res, num_heads, ws, 0 if i % 2 == 0 else ws // 2, dpr[i])
                                    for i in range(depth))  # W-MSA and SW-MSA alternate
        self.downsample = PatchMerging(res, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class SwinForSimMIM(nn.Module):
    """SwinTransformerForSimMIM: patch embed + its LayerNorm, mask tokens, 4 stages, final norm ->
    (B, 8C, H/32, W/32)."""

    def __init__(self, img_size, patch, dim, depths, heads, window, in_chans=3, drop_path=0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        self.patch_embed.norm = nn.LayerNorm(dim)  # ref patch_norm=True: part of the patch embedding
        gh, gw = self.patch_embed.grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        dpr = torch.linspace(0, drop_path, sum(depths)).tolist()  # stochastic depth grows linearly with depth
        starts = [sum(depths[:i]) for i in range(len(depths) + 1)]
        self.layers = nn.ModuleList(
            SwinStage(dim * 2 ** i, (gh // 2 ** i, gw // 2 ** i), d, h, window, dpr[starts[i]:starts[i + 1]],
                      downsample=i < len(depths) - 1) for i, (d, h) in enumerate(zip(depths, heads)))
        self.num_features = dim * 2 ** (len(depths) - 1)
        self.stride = patch * 2 ** (len(depths) - 1)
        self.out_grid = (gh // 2 ** (len(depths) - 1), gw // 2 ** (len(depths) - 1))  # H/32 x W/32 for 4 stages
        self.norm = nn.LayerNorm(self.num_features)
        for m in self.modules():  # ref _init_weights: timm trunc_normal_(std .02) with absolute bounds +-2
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)  # the patch-embed conv keeps PyTorch's default init

    def forward(self, x, mask):
        x = self.patch_embed.norm(self.patch_embed(x))  # (B, N, C)
        w = mask.flatten(1).unsqueeze(-1).type_as(self.mask_token)  # (B, N, 1) fp32, as the reference: under autocast
        x = x * (1 - w) + self.mask_token * w  # the token's gradient sums in fp32; masked tokens replaced first of all
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # (B, N/64, 8C)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.out_grid)  # (B, 8C, H/32, W/32)

# ---------------------------------------------------------------- ViT encoder (BEiT-style, ref vision_transformer.py)


@torch.no_grad()
def trunc_normal_1sigma(t, std=0.02):
    """Normal(0, std) truncated at +-std, by the inverse CDF as timm does (torch's rejection sampler takes seconds
    for ViT-B): u uniform on [Phi(-1), Phi(1)], x = std sqrt(2) erfinv(2u - 1)."""
    edge = math.erf(1 / math.sqrt(2))  # 2 Phi(1) - 1
    return t.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2)).clamp_(-std, std)


class ViTForSimMIM(nn.Module):
    """VisionTransformerForSimMIM: q/v biases, layer scale 0.1, one shared relative position bias, no absolute
    positions, final norm kept, cls dropped at the output -> (B, D, H/16, W/16)."""

    def __init__(self, img_size, patch, dim, depth, heads, in_chans=3, drop_path=0.1):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, heads)  # zero-initialised
        dpr = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, qv_bias=True, init_values=0.1, drop_path=p) for p in dpr)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.num_features, self.stride = dim, patch
        # ref: _trunc_normal_ is overridden to cut at +-1 std, and dynamic dispatch applies that to every init
        tn = trunc_normal_1sigma
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                tn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        tn(self.cls_token)
        tn(self.mask_token)
        for i, blk in enumerate(self.blocks):  # ref fix_init_weight
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x, mask):
        x = self.patch_embed(x)  # (B, N, D)
        w = mask.flatten(1).unsqueeze(-1).type_as(self.mask_token)  # (B, N, 1) fp32, as the reference: under autocast
        x = x * (1 - w) + self.mask_token * w  # the token's gradient sums in fp32 (in fp16: can overflow a GradScaler)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        bias = self.rel_pos_bias()  # (1, heads, 1+N, 1+N), shared by all blocks
        for blk in self.blocks:
            x = blk(x, bias)
        x = self.norm(x)[:, 1:]  # (B, N, D)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)  # (B, D, H/16, W/16)

# --------------------------------------------------------------------------- model and loss


class SimMIM(nn.Module):
    """Encoder + the one-layer prediction head (1x1 conv to stride^2 x C channels, PixelShuffle back to pixels)."""

    def __init__(self, encoder, in_chans=3):
        super().__init__()
        self.encoder = encoder
        s = encoder.stride
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, s * s * in_chans, kernel_size=1),
                                     nn.PixelShuffle(s))  # PyTorch default init: the reference never re-inits it

    def forward(self, imgs, mask):
        x_rec = self.decoder(self.encoder(imgs, mask))  # (B, C, H, W), in the normalised input space
        return simmim_loss(imgs, x_rec, mask, self.encoder.patch_embed.patch_size), {'x_rec': x_rec, 'mask': mask}


def build_model(name, img_size, in_chans=3, drop_path=0.0):
    m = MODELS[name]
    if m['kind'] == 'swin':
        enc = SwinForSimMIM(img_size, m['patch'], m['dim'], m['depths'], m['heads'], m['window'], in_chans, drop_path)
    else:
        enc = ViTForSimMIM(img_size, m['patch'], m['dim'], m['depth'], m['heads'], in_chans, drop_path)
    return SimMIM(enc, in_chans)


def simmim_loss(imgs, x_rec, mask, p):
    """L1 on the masked pixels only: sum |x - x_rec| over masked pixels / (masked pixels + 1e-5) / channels.
    imgs, x_rec (B, C, H, W) normalised; mask (B, H/p, W/p) bool."""
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()  # (B, 1, H, W)
    loss = (imgs - x_rec.float()).abs()  # (B, C, H, W)
    return (loss * m).sum() / (m.sum() + 1e-5) / imgs.shape[1]


def no_decay_names(model):
    """ref optimizer.py + no_weight_decay(): besides 1-D and '.bias' params, Swin skips encoder.mask_token, ViT
    encoder.cls_token. Swin's relative_position_bias_table keyword is prefixed to 'encoder.relative_position_bias_
    table', which no parameter name contains, so in the reference's pretraining the tables ARE decayed (kept)."""
    return {'encoder.mask_token'} if isinstance(model.encoder, SwinForSimMIM) else {'encoder.cls_token'}


def features(model, imgs):
    """The final stage's tokens after the last norm, averaged; nothing masked: what the fine-tuning models pool (ref
    swin_transformer.py avgpool, vision_transformer.py use_mean_pooling)."""
    mask = torch.zeros(len(imgs), *model.encoder.patch_embed.grid_size, dtype=torch.bool, device=imgs.device)
    return model.encoder(imgs, mask).mean((2, 3))  # (B, D)


def encoder_state_dict(model):
    """What the reference fine-tuning code loads (utils.load_pretrained strips 'encoder.' and drops the rest)."""
    return {k.removeprefix('encoder.'): v for k, v in model.state_dict().items() if k.startswith('encoder.')}

# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """original | masked input | prediction | prediction inside the mask with the original outside, for a fixed
    batch and a fixed mask. The target is raw (normalised) pixels, so nothing is borrowed from the hidden area."""
    was_training = model.training
    model.eval()
    enc = model.encoder
    mask = block_mask(imgs.shape[0], imgs.shape[-2:], args.mask_patch_size, enc.patch_embed.patch_size,
                      args.mask_ratio, 'cpu', torch.Generator().manual_seed(0)).to(imgs.device)
    _, out = model(imgs, mask)
    p = enc.patch_embed.patch_size
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # (B, 1, H, W)
    mean = torch.tensor(args.mean, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(args.std, device=imgs.device).view(1, -1, 1, 1)
    show = lambda t: t.float() * std + mean  # noqa: E731
    x, x_rec = show(imgs), show(out['x_rec'])
    save_grid(path, [('original', x), ('masked input', torch.where(m, 0.5, x)), ('prediction', x_rec),
                     ('prediction in mask', torch.where(m, x_rec, x))])
    model.train(was_training)

# --------------------------------------------------------------------------- training


def main(args):
    args = resolve(args)
    check_args(args, MODELS, positive=('mask_patch_size',), non_negative=('milestones',))  # one line, before any work
    H, W = pair(args.input_size)
    m = MODELS[args.model]
    patch = m['patch']
    stride = patch * 2 ** (len(m['depths']) - 1) if m['kind'] == 'swin' else patch  # the head's PixelShuffle factor
    if H % stride or W % stride or H % args.mask_patch_size or W % args.mask_patch_size \
            or args.mask_patch_size % patch:
        raise SystemExit(f'--input_size {H} {W} must be a multiple of the encoder stride {stride} and of '
                         f'--mask_patch_size {args.mask_patch_size}, itself a multiple of the patch size {patch}')
    n_blocks = (H // args.mask_patch_size) * (W // args.mask_patch_size)
    check_mask_ratio(args.mask_ratio, math.ceil(n_blocks * args.mask_ratio), n_blocks, 'blocks', all_ok=True)
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(build_model(args.model, (H, W), args.in_chans))
    d, out = setup_run(args)  # process group, seeds + rank, output folder
    model = build_model(args.model, (H, W), args.in_chans, args.drop_path).to(d.device)

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the global batch; lrs scaled per 512 (ref)
    lr, warmup_lr, min_lr = (v * args.global_batch / 512 for v in (args.blr, args.warmup_lr, args.min_lr))

    dataset = image_dataset(args, scale=(0.67, 1.0), interpolation='bilinear')  # ref: RRC(0.67, 1, bilinear) + flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, args.weight_decay, skip=no_decay_names(model))[::-1]  # ref order: [decay, no_decay]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=args.betas, fused=True)  # fused: skips a non-finite step
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        # constant buffers (index tables, window masks): no per-step broadcast (ref broadcast_buffers=False)
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, encoder stride '
              f'{stride}; mask {math.ceil(n_blocks * args.mask_ratio)} of {n_blocks} blocks of '
              f'{args.mask_patch_size} px; {len(dataset)} images, {steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 512 = {lr:g} ({args.lr_schedule}, warmup from {warmup_lr:g}'
              + (f', x0.1 at epochs {args.milestones})' if args.lr_schedule == 'multistep' else f', to {min_lr:g})'))

    vis_imgs = torch.stack([dataset[(0, i % len(dataset))][0] for i in range(8)]).to(d.device)
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(vis_imgs, mean, std)  # a fixed batch for the pictures
    flops = report_flops(d, count_flops(model, vis_imgs[:1], torch.zeros(1, H // patch, W // patch).bool()),
                         args.global_batch)  # one image

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            visualize(unwrap(model), vis_imgs, args, out / f'vis_{epoch_done if epoch_done is not None else step}.png')
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
        if not stop:  # collective: kNN on --eval_data, and a linear probe at the end
            evaluate(model, step, final=step >= total_steps)

    if step == 0:  # the encoder at initialisation, for comparison
        evaluate(model, 0)
    logger, saved, stop = Logger(out, d, step, flops=flops), step, None
    model.train()
    for epoch in range(step // steps_per_epoch, args.epochs):
        first = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch already done (resume)
        sampler.set_epoch(epoch, skip=first * args.batch_size)
        batches = iter(loader)
        for it in range(first, iters_per_epoch):
            t = time.perf_counter()
            imgs, _, bad_files = next(batches)  # bad_files: indices of unreadable files, else -1
            logger.wait += time.perf_counter() - t
            imgs = normalize(imgs.to(d.device, non_blocking=True), mean, std)  # (B, C, H, W)
            mask = block_mask(imgs.shape[0], (H, W), args.mask_patch_size, patch, args.mask_ratio, d.device)  # (B,h,w)
            if it % accum == 0:
                for g in optimizer.param_groups:
                    g['lr'] = lr_at(epoch + it / iters_per_epoch, lr, warmup_lr, min_lr, args)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(imgs, mask)
                scaler.scale(loss / accum).backward()
            logger.add(loss, bad_files)  # the loss stays on the device until the next log step
            if not update:
                continue
            _, bad = optimizer_step(optimizer, scaler, params, args.clip_grad)
            logger.stepped(bad)
            step += 1
            if step % args.log_every == 0 or step == total_steps:  # the only host syncs: ranks agree on stopping
                stop = logger.log_step(epoch + (it + 1) / iters_per_epoch, step, total_steps,
                                       optimizer.param_groups[0]['lr'], args.global_batch, args.max_bad_steps)
            if stop or step >= total_steps:
                break
        epoch_complete = step == (epoch + 1) * steps_per_epoch
        if epoch_complete and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
            save(epoch + 1)
            saved = step
        if stop or step >= total_steps:
            break
    if saved != step:  # stopped inside an epoch: preemption or --max_steps
        save(None)
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, the reference fine-tuning layout
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
