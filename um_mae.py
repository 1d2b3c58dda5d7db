"""UM-MAE: Uniform Masking for MAE pretraining of pyramid ViTs (Li, Wang, Yang, Yang; arXiv 2205.10063).

Reference: github.com/implus/UM-MAE (mask_transform.py, models_mae_swin.py, models_mae_pvt.py, main_pretrain.py,
engine_pretrain.py, Makefile). Uniform sampling keeps exactly one 16-px unit of every 2x2 block of units, so the
visible units pack into a dense quarter-size image that a windowed/pyramid encoder runs on; secondary masking then
hides a quarter of those behind a shared token so the task stays hard. A light decoder regresses the norm-pix of
the 75% uniformly masked units.

    python um_mae.py --demo                                        # tiny Swin, synthetic images: 71 s of CPU time
    torchrun --nproc_per_node=8 um_mae.py --data imagenet/         # Swin-T at 256, the Makefile's 200-epoch recipe
    torchrun --nproc_per_node=8 um_mae.py --data imagenet/ --model pvt_small    # PVT-S, same recipe

Deviations from the reference:
- Each visible token gets the decoder position of its own unit. The reference adds `P[~mask]` (full-grid raster
  order) to tokens that leave PixelShuffle in block order, so about 3 in 4 visible tokens get the position of a
  neighbour in the same row of blocks; masked tokens and targets are the same. `--ref_decoder_order` computes the
  reference's order exactly: use it to continue the released checkpoints, whose decoders learnt that order.
- Uniform masks are drawn on the device each step from the reference's balanced pool (each in-block position
  len(pool)/4 times, shuffled, the first blocks taken: the same distribution), not by numpy in the data workers.
- `--global_batch` (4096 = 8 GPUs x 128 x accum 4, Makefile) derives `accum_iter`; an epoch is truncated to whole
  accumulation cycles. bf16 autocast by default on CUDA (reference: fp16 + GradScaler: `--amp fp16`). Fused AdamW
  skips a non-finite step on the device and counts it (reference: sys.exit); `--max_bad_steps` in a row stop the run.
- Window attention with the posmlp bias runs through SDPA (same values up to rounding). Non-square inputs work
  and `--in_chans 1` predicts one channel (reference: square, 3). `checkpoint-<epoch>.pth` counts finished epochs.
- Data: JPEGs are decoded at reduced size by `Image.draft` when the crop allows it; crop + resize is one PIL call.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, Mlp, PatchEmbed, accumulation, amp_setup,
                    check_args, check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, load_checkpoint,
                    make_loader, normalize, optimizer_step, pair, param_groups, parse_args, patchify, report_flops,
                    resume, save_grid, save_loss_curve, save_training_state, setup_run, sincos_2d, unpatchify, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny Swin on synthetic images: 71 s of CPU time
    output_dir: str = 'output_um_mae'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'swin_tiny'  # swin_tiny | swin_large | pvt_small | tiny | pvt_tiny (MODELS below)
    input_size: Optional[tuple[int, ...]] = None  # H [W], multiples of 2 units; None: the preset's (ref 256, tiny 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_ratio: float = 0.75  # ref --mask_ratio 0.75 --mask_regular: the only ratio uniform sampling has
    vis_mask_ratio: float = 0.25  # ref Makefile --vis_mask_ratio: share of the visible units secondary-masked
    ref_decoder_order: bool = False  # decoder positions in the reference's order: to continue its released checkpoints
    norm_pix_loss: bool = True  # ref Makefile --norm_pix_loss
    batch_size: int = 128  # per GPU; ref Makefile
    global_batch: int = 4096  # ref Makefile: 8 GPUs x 128 x accum 4; accum = global_batch / (batch_size x GPUs)
    epochs: int = 200  # ref Makefile
    warmup_epochs: int = 10  # ref Makefile
    blr: float = 1.5e-4  # ref Makefile; lr = blr x global_batch / 256
    min_lr: float = 0.0  # ref main_pretrain.py
    weight_decay: float = 0.05  # ref Makefile
    betas: tuple = (0.9, 0.95)  # ref main_pretrain.py
    clip_grad: float = 0.0  # 0 = none; ref: no clipping in pretraining
    mean: tuple = IMAGENET_MEAN  # ref mask_transform.py Normalize
    std: tuple = IMAGENET_STD  # ref mask_transform.py Normalize
    num_workers: int = 10  # ref main_pretrain.py
    seed: int = 0  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference UM-MAE release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # ref main_pretrain.py: checkpoint-<epoch>.pth every 20 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# ref models_mae_swin.py / models_mae_pvt.py constructors; dec = (dim, depth, heads). A mask unit is
# patch x 2^(stages-2) px (16 for patch 4); Swin dims double per stage.
MODELS = {
    'swin_tiny': dict(kind='swin', patch=4, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                      window=8, posmlp=32, dec=(512, 2, 16), img=256),  # mae_swin_tiny_256_dec512d2b
    'swin_large': dict(kind='swin', patch=4, dims=(192, 384, 768, 1536), depths=(2, 2, 18, 2),
                       heads=(6, 12, 24, 48), window=8, posmlp=64, dec=(512, 8, 16), img=256),  # ..._dec512d8b64pmd
    'pvt_small': dict(kind='pvt', patch=4, dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), heads=(1, 2, 5, 8),
                      mlp=(8, 8, 4, 4), sr=(4, 2, 1, 1), dec=(512, 2, 16), img=256),  # mae_pvt_small_256_dec512d2b
    'tiny': dict(kind='swin', patch=2, dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), heads=(1, 2, 4, 8),
                 window=4, posmlp=16, dec=(64, 1, 4), img=64),  # ours, for the demo and tests: 8-px units
    'pvt_tiny': dict(kind='pvt', patch=2, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), heads=(1, 2, 4, 8),
                     mlp=(4, 4, 4, 4), sr=(4, 2, 1, 1), dec=(64, 1, 4), img=64),  # ours, for tests
}
DEMO = dict(data='synthetic:1024', model='tiny', input_size=(64,), batch_size=64, global_batch=64, epochs=6,
            warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_um_mae_demo', log_every=8, keep_every=3,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 3.1-3.2)


def uniform_mask(B, gh, gw, device, generator=None):
    """Uniform sampling: one visible unit in every 2x2 block of the (gh, gw) unit grid. As the reference's pool:
    each of the 4 in-block positions appears len(pool)/4 times, the pool (len >= units/2) is shuffled per image and
    its first gh*gw/4 rows are the blocks (without replacement). Returns (B, gh*gw) bool, True = masked."""
    nb = (gh // 2) * (gw // 2)
    pool = torch.arange(4 * math.ceil(gh * gw / 8), device=device) % 4  # ref: 4 patterns per loop until 4*len >= 2L
    order = torch.rand(B, len(pool), device=device, generator=generator).argsort(dim=1)[:, :nb]  # (B, nb)
    mask = torch.ones(B, nb, 4, dtype=torch.bool, device=device)
    mask.scatter_(2, pool[order][..., None], False)  # (B, nb, 4): the chosen in-block unit is visible
    mask = mask.view(B, gh // 2, gw // 2, 2, 2).permute(0, 1, 3, 2, 4)  # (B, gh/2, 2, gw/2, 2)
    return mask.reshape(B, gh * gw)


def secondary_mask(mask, ratio, noise=None):
    """Secondary masking: int(n_vis (1 - ratio)) of the visible units per image stay, the rest are hidden (ref
    forward_encoder: argsort of noise + mask, n_vis read from image 0). Returns (B, L) bool, True = hidden."""
    n_keep = ((~mask[0]).sum().double() * (1 - ratio)).floor()  # a device scalar: no host sync
    noise = torch.rand(mask.shape, device=mask.device) if noise is None else noise  # (B, L)
    ids_restore = (mask.float() + noise).argsort(dim=1).argsort(dim=1)  # masked units sort last
    return ids_restore >= n_keep  # (B, L)


def unit_order(mask):
    """(B, L): visible units in raster order, then masked ones (the reference's boolean indexing, without a sync)."""
    return mask.to(torch.uint8).argsort(dim=1, stable=True)


def compact(t, K):
    """The packing trick: (B, H, W, C) on the token grid, zero outside the kept unit of every 2x2 block of K x K-token
    units -> (B, H/2, W/2, C) by summing the four units of each block (ref: all-ones depthwise conv, dilation K)."""
    B, H, W, C = t.shape
    return t.view(B, H // (2 * K), 2, K, W // (2 * K), 2, K, C).sum(dim=(2, 5)).reshape(B, H // 2, W // 2, C)

# --------------------------------------------------------------------------- Swin encoder (ref models_mae_swin.py)


def window_partition(x, ws):
    """(B, H, W, C) -> (B, nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, H/ws, W/ws, ws, ws, C)
    return x.reshape(B, -1, ws * ws, C)


def window_reverse(x, ws, H, W):
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, C = x.shape[0], x.shape[-1]
    return x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def shifted_window_mask(H, W, ws, shift):
    """Additive (nW, N, N) mask for SW-MSA: -100 between tokens of different regions after the cyclic shift."""
    def region(n):  # 0: untouched, 1: [n-ws, n-shift), 2: the wrapped-around last `shift` rows/columns
        return (torch.arange(n) >= n - ws).long() + (torch.arange(n) >= n - shift).long()
    label = window_partition((region(H)[:, None] * 3 + region(W)[None, :])[None, :, :, None], ws)[0, :, :, 0]
    return (label[:, :, None] != label[:, None, :]).float() * -100.0  # (nW, N, N)


class WindowAttention(nn.Module):
    """Window attention whose relative bias is an MLP ('posmlp', 1x1 convs) of sign(d) log(1+|d|), d = pos_j - pos_i
    the difference of the ORIGINAL token coordinates carried through packing (the geometry fine-tuning sees)."""

    def __init__(self, dim, num_heads, posmlp_dim):
        super().__init__()
        self.num_heads, self.posmlp = num_heads, nn.Sequential(nn.Conv2d(2, posmlp_dim, 1), nn.ReLU(inplace=True),
                                                               nn.Conv2d(posmlp_dim, num_heads, 1))
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x, pos, mask=None):  # x (B, nW, N, C); pos (B, nW, N, 2); mask (nW, N, N) additive or None
        (B, nW, N, C), h = x.shape, self.num_heads
        qkv = self.qkv(x).reshape(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, C/h)
        q, k, v = qkv.reshape(3, B, nW * h, N, C // h)  # windows x heads as SDPA's head axis
        d = pos.unsqueeze(2) - pos.unsqueeze(3)  # (B, nW, N, N, 2): [i, j] = pos_j - pos_i
        d = d.sign() * torch.log1p(d.abs())  # log-spaced, so window 8 (pretrain) carries over to 16 (fine-tune)
        c1, c2 = self.posmlp[0], self.posmlp[2]  # the 1x1 convs as Linears on the last axis
        bias = F.linear(F.relu(F.linear(d, c1.weight.flatten(1), c1.bias)), c2.weight.flatten(1), c2.bias)
        bias = bias.permute(0, 1, 4, 2, 3)  # (B, nW, h, N, N)
        bias = bias + mask[:, None] if mask is not None else bias  # (B, nW, h, N, N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(B, nW * h, N, N).to(q.dtype))
        return self.proj(x.view(B, nW, h, N, C // h).transpose(2, 3).reshape(B, nW, N, C))  # (B, nW, N, C)


class PatchMerge(nn.Module):
    """LayerNorm (none for PVT) then a 2x2 stride-2 conv, not Swin's concat + Linear."""

    def __init__(self, dim_in, dim_out, norm=True):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(dim_in, eps=1e-6) if norm else None, nn.Conv2d(dim_in, dim_out, 2, 2)

    def forward(self, x, H, W):  # (B, H*W, C_in) -> (B, H*W/4, C_out)
        x = self.norm(x) if self.norm is not None else x
        return self.proj(x.transpose(1, 2).reshape(x.shape[0], -1, H, W)).flatten(2).transpose(1, 2)


class SwinBlock(nn.Module):
    """(Shifted-)window block on the compact grid; the first block of stages 2-4 owns the PatchMerge. A map not
    larger than the window uses one clipped window, unshifted. The block norms are nn.LayerNorm (eps 1e-5, ref)."""

    def __init__(self, dim, res, num_heads, ws, shift, posmlp_dim, merge_from=None):
        super().__init__()
        self.ws, self.shift = (min(res), 0) if min(res) <= ws else (ws, shift)
        self.downsample = PatchMerge(merge_from, dim) if merge_from else None
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, num_heads, posmlp_dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.register_buffer('attn_mask', shifted_window_mask(*res, self.ws, self.shift) if self.shift else None,
                             persistent=False)

    def forward(self, x, pos):  # x (B, H*W, C); pos (B, H, W, 2) before the merge
        if self.downsample is not None:
            x = self.downsample(x, pos.shape[1], pos.shape[2])
            pos = pos[:, 0::2, 0::2] / 2  # coordinates in units of this stage's tokens
        (B, H, W, _), C, s = pos.shape, x.shape[-1], self.shift
        y, p = self.norm1(x).view(B, H, W, C), pos
        if s:
            y, p = torch.roll(y, (-s, -s), (1, 2)), torch.roll(pos, (-s, -s), (1, 2))  # positions move with tokens
        y = self.attn(window_partition(y, self.ws), window_partition(p, self.ws), self.attn_mask)
        y = window_reverse(y, self.ws, H, W)  # (B, H, W, C)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y.reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x)), pos

# --------------------------------------------------------------------------- PVT encoder (ref models_mae_pvt.py)


class SRAttention(nn.Module):
    """Spatial-reduction attention: k, v from avg_pool(sr) -> 1x1 conv -> LN (weights independent of sr, so
    pretraining [4,2,1,1] transfers to fine-tuning [8,4,2,1]); the reduction runs at sr 1 too."""

    def __init__(self, dim, num_heads, sr_ratio):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim * 2), nn.Linear(dim, dim)
        self.sr, self.norm = nn.Conv2d(dim, dim, kernel_size=1), nn.LayerNorm(dim)

    def forward(self, x, H, W):  # (B, H*W, C)
        (B, N, C), h = x.shape, self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, C/h)
        r = F.avg_pool2d(x.transpose(1, 2).reshape(B, C, H, W), self.sr_ratio)  # (B, C, H/sr, W/sr)
        r = self.norm(self.sr(r).flatten(2).transpose(1, 2))  # (B, N/sr^2, C)
        k, v = self.kv(r).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # each (B, h, N/sr^2, C/h)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class PVTBlock(nn.Module):
    def __init__(self, dim, num_heads, sr_ratio, mlp_ratio, merge_from=None):
        super().__init__()
        self.downsample = PatchMerge(merge_from, dim, norm=False) if merge_from else None
        self.norm1, self.attn = nn.LayerNorm(dim), SRAttention(dim, num_heads, sr_ratio)  # eps 1e-5 (ref)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        if self.downsample is not None:
            x, H, W = self.downsample(x, H, W), H // 2, W // 2
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x)), H, W

# --------------------------------------------------------------------------- model


class UMMAE(nn.Module):
    """MaskedAutoencoderSwin / MaskedAutoencoderPVT with the reference's parameter names (flat `blocks`)."""

    def __init__(self, cfg, img_size, in_chans=3, vis_mask_ratio=0.25, norm_pix_loss=True, ref_decoder_order=False):
        super().__init__()
        self.kind, self.vis_mask_ratio, self.norm_pix_loss = cfg['kind'], vis_mask_ratio, norm_pix_loss
        self.ref_decoder_order = ref_decoder_order
        dims, p, (H, W) = cfg['dims'], cfg['patch'], pair(img_size)
        self.K = 2 ** (len(dims) - 2)  # tokens per unit side (4): packed stride 2p 2^(S-1), then PixelShuffle(2)
        self.unit = p * self.K  # 16 px
        self.unit_grid = (H // self.unit, W // self.unit)
        self.patch_embed = PatchEmbed((H, W), p, in_chans, dims[0])
        gh, gw = self.patch_embed.grid_size
        if vis_mask_ratio > 0:  # ref: the parameter exists only with secondary masking
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        res = [(gh // 2 ** (i + 1), gw // 2 ** (i + 1)) for i in range(len(dims))]  # compact grid per stage
        self.blocks = nn.ModuleList()
        for i, depth in enumerate(cfg['depths']):
            for j in range(depth):
                merge = dims[i - 1] if i > 0 and j == 0 else None  # stages 2-4 start with a PatchMerge
                if self.kind == 'swin':
                    self.blocks.append(SwinBlock(dims[i], res[i], cfg['heads'][i], cfg['window'],
                                                 cfg['window'] // 2 if j % 2 else 0, cfg['posmlp'], merge))
                else:
                    self.blocks.append(PVTBlock(dims[i], cfg['heads'][i], cfg['sr'][i], cfg['mlp'][i], merge))
        if self.kind == 'swin':
            self.patch_embed.norm = nn.LayerNorm(dims[0], eps=1e-6)
            hw = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij'), -1).float()
            self.register_buffer('pos_hw', hw[None], persistent=False)  # (1, gh, gw, 2): (row, col) of each token
        else:  # fixed sin-cos positions on the token grid, compacted like the tokens
            self.pos_embed = nn.Parameter(sincos_2d(dims[0], gh, gw)[None], requires_grad=False)  # (1, gh*gw, C)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        dd, dec_depth, dec_heads = cfg['dec']
        self.decoder_embed, self.decoder_expand = nn.Linear(dims[-1], 4 * dd), nn.PixelShuffle(2)  # 1 per vis. unit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dd, *self.unit_grid)[None], requires_grad=False)  # (1, L, dd)
        self.decoder_blocks = nn.ModuleList(Block(dd, dec_heads) for _ in range(dec_depth))
        self.decoder_norm, self.decoder_pred = nn.LayerNorm(dd, eps=1e-6), nn.Linear(dd, self.unit ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):  # ref initialize_weights / _init_weights
        nn.init.normal_(self.mask_token, std=0.02)
        if self.vis_mask_ratio > 0:
            nn.init.normal_(self.vis_mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # LayerNorms keep PyTorch's (1, 0), which the reference sets again
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):  # every conv (merges, posmlp, sr) fan-out normal ...
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # ... then the patch embedding again, as a Linear on (D, C*p*p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def forward_encoder(self, imgs, mask, noise=None):
        x = self.patch_embed(imgs)  # (B, N, C) on the full token grid
        B, C, (gh, gw), (uh, uw), K = x.shape[0], x.shape[2], self.patch_embed.grid_size, self.unit_grid, self.K
        hidden = secondary_mask(mask, self.vis_mask_ratio, noise)  # (B, L): US-masked or SM-hidden
        to_tokens = lambda m: m.view(B, uh, uw).repeat_interleave(K, 1).repeat_interleave(K, 2)[..., None]  # noqa
        us_vis, keep = ~to_tokens(mask), ~to_tokens(hidden)  # (B, gh, gw, 1) each
        x = (self.patch_embed.norm(x) if self.kind == 'swin' else x).view(B, gh, gw, C) * keep  # only units it sees
        if self.vis_mask_ratio > 0:  # SM units stay in the grid, as the shared token (Swin: through the embed LN)
            tok = self.patch_embed.norm(self.vis_mask_token) if self.kind == 'swin' else self.vis_mask_token
            x = x + tok * (us_vis & ~keep)
        x = compact(x, K).flatten(1, 2)  # (B, N/4, C): each 2x2 block of units -> its visible unit
        if self.kind == 'swin':
            pos = compact(self.pos_hw * us_vis, K)  # (B, gh/2, gw/2, 2): original (row, col), SM units included
            for blk in self.blocks:
                x, pos = blk(x, pos)
        else:  # compacted sin-cos positions
            x, H, W = x + compact(self.pos_embed.view(1, gh, gw, C) * us_vis, K).flatten(1, 2), gh // 2, gw // 2
            for blk in self.blocks:
                x, H, W = blk(x, H, W)
        return self.norm(x)  # (B, L/16, C_last): the packed grid at stride 2 units

    def forward_decoder(self, latent, mask):
        B, (uh, uw), nb = latent.shape[0], self.unit_grid, mask.shape[1] // 4
        x = self.decoder_embed(latent)  # (B, L/16, 4 Dd) on the packed grid (stride 2 units)
        x = self.decoder_expand(x.transpose(1, 2).reshape(B, -1, uh // 4, uw // 4))  # (B, Dd, uh/2, uw/2)
        x = x.flatten(2).transpose(1, 2)  # (B, nb, Dd): one token per visible unit, block raster order
        P, order = self.decoder_pos_embed.expand(B, -1, -1), unit_order(mask)  # (B, L, Dd), (B, L)
        blocks = torch.arange(uh * uw, device=mask.device).view(uh // 2, 2, uw // 2, 2).permute(0, 2, 1, 3).flatten()
        own = blocks[unit_order(mask[:, blocks])[:, :nb]]  # (B, nb): each token's unit, block by block
        pos_vis = P.gather(1, (order[:, :nb] if self.ref_decoder_order else own)[..., None].expand(-1, -1, P.shape[2]))
        pos_mask = P.gather(1, order[:, nb:, None].expand(-1, -1, P.shape[2]))  # masked units, raster order
        x = torch.cat([x + pos_vis, self.mask_token + pos_mask], dim=1)  # (B, L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, L, unit^2 C): nb visible first, then masked

    def forward(self, imgs, mask, noise=None):
        """imgs (B, C, H, W) normalised; mask (B, L) uniform, True = masked; noise (B, L), None: drawn here (ref)."""
        pred = self.forward_decoder(self.forward_encoder(imgs, mask, noise), mask)
        loss = um_mae_loss(imgs, pred[:, mask.shape[1] // 4:], mask, self.unit, self.norm_pix_loss)
        return loss, {'pred': pred, 'mask': mask}


def features(model, imgs):
    """The final stage's tokens after the last norm, averaged over the four uniform masks that together show every
    unit once, no secondary masking (the fine-tuning models pool that stage, ref models_swin.py / models_pvt.py)."""
    B, (uh, uw), ratio, model.vis_mask_ratio, out = len(imgs), model.unit_grid, model.vis_mask_ratio, 0.0, 0.0
    for k in range(4):  # the k-th unit of every 2x2 block visible
        mask = torch.ones(B, uh // 2, 2, uw // 2, 2, dtype=torch.bool, device=imgs.device)
        mask[:, :, k // 2, :, k % 2] = False
        out = out + model.forward_encoder(imgs, mask.flatten(1), torch.zeros(B, uh * uw, device=imgs.device)).mean(1)
    model.vis_mask_ratio = ratio
    return out / 4  # (B, C_last)


def encoder_state_dict(model):
    """The encoder as the reference's fine-tuning models (models_swin.Swin / models_pvt.PVT) load it."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('decoder', 'mask_token', 'vis_mask'))}

# --------------------------------------------------------------------------- loss (ref forward_loss)


def um_mae_loss(imgs, pred, mask, unit, norm_pix_loss):
    """MSE over the uniformly masked units only (secondary-masked ones are not targets): pred (B, n_mask, unit^2 C)
    in raster order of the masked units; each target normalised by its own mean and unbiased variance."""
    target = patchify(imgs, unit)  # (B, L, unit^2 C)
    ids = unit_order(mask)[:, mask.shape[1] - pred.shape[1]:, None].expand(-1, -1, target.shape[-1])
    target = target.gather(1, ids)  # (B, n_mask, unit^2 C): the masked units in raster order
    if norm_pix_loss:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return ((pred.float() - target) ** 2).mean()

# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """original | uniform mask | secondary mask | reconstruction | reconstruction + visible, for a fixed batch, mask
    and secondary mask. Norm-pix predictions are shown with the true unit mean/std, and the picture says so."""
    was_training = model.training
    model.eval()
    (B, C), u, (uh, uw) = imgs.shape[:2], model.unit, model.unit_grid
    g = torch.Generator().manual_seed(0)
    mask = uniform_mask(B, uh, uw, 'cpu', g).to(imgs.device)  # (B, L)
    noise = torch.rand(B, uh * uw, generator=g).to(imgs.device)
    _, out = model(imgs, mask, noise)
    hidden = secondary_mask(mask, model.vis_mask_ratio, noise)  # (B, L)
    target = patchify(imgs, u)  # (B, L, u*u*C)
    pred = torch.zeros_like(target).masked_scatter(mask[..., None], out['pred'][:, uh * uw // 4:].float())  # at masked
    title, note = 'reconstruction', ''
    if args.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        title, note = 'reconstruction *', ('* norm-pix target: each predicted unit is shown with the TRUE mean and std'
                                           '\n  of the hidden unit, which the model never saw (colour/brightness leak)')
    mean, std = torch.tensor(args.mean, device=imgs.device), torch.tensor(args.std, device=imgs.device)
    to_img = lambda t: unpatchify(t, u, uh, uw, C) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # noqa: E731
    fill = lambda v: patchify((torch.full_like(imgs, v) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), u)  # noqa
    grey, dark = fill(0.5), fill(0.15)  # a pixel value shown for masked (grey) and secondary-masked (dark) units
    m, sm = mask[..., None], (hidden & ~mask)[..., None]  # (B, L, 1) each
    save_grid(path, [('original', to_img(target)), ('uniform mask', to_img(torch.where(m, grey, target))),
                     ('secondary mask', to_img(torch.where(m, grey, torch.where(sm, dark, target)))),
                     (title, to_img(torch.where(m, pred, grey))),
                     (title + '\n+ visible', to_img(torch.where(m, pred, target)))], note)
    model.train(was_training)

# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS)  # one line and exit on a value the run cannot use, before any work
    cfg = MODELS[args.model]
    args = dataclasses.replace(args, input_size=args.input_size or (cfg['img'],))  # the preset's size
    H, W = pair(args.input_size)
    unit, S = cfg['patch'] * 2 ** (len(cfg['dims']) - 2), len(cfg['dims'])
    res = [(H // cfg['patch'] // 2 ** (i + 1), W // cfg['patch'] // 2 ** (i + 1)) for i in range(S)]  # compact grids
    win = [min(cfg['window'], *r) for r in res] if cfg['kind'] == 'swin' else cfg['sr']
    if H % (4 * unit) or W % (4 * unit) or any(r[0] % w or r[1] % w for r, w in zip(res, win)):
        raise SystemExit(f'--input_size {H} {W} does not fit --model {args.model}: give multiples of {4 * unit} px '
                         f'whose packed stage grids {res} split into windows/reductions {win}')
    L = (H // unit) * (W // unit)
    check_mask_ratio(args.mask_ratio, int(args.mask_ratio * L), L, 'units')  # as the reference rounds
    if args.mask_ratio != 0.75:
        raise SystemExit(f'--mask_ratio {args.mask_ratio}: uniform masking keeps one unit of every 2x2 block, so it '
                         f'hides exactly 0.75 of the units; give 0.75 (and --vis_mask_ratio for more)')
    n_keep = int(L // 4 * (1 - args.vis_mask_ratio))
    if not (0 <= args.vis_mask_ratio < 1 and n_keep >= 1):
        raise SystemExit(f'--vis_mask_ratio {args.vis_mask_ratio} leaves {n_keep} of the {L // 4} visible units: give '
                         f'0 <= ratio < 1 that leaves at least one')
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(UMMAE(cfg, (H, W), args.in_chans, args.vis_mask_ratio))
    d, out = setup_run(args)  # process group, seeds + rank, output folder
    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the reference's global batch
    lr = args.blr * args.global_batch / 256
    dataset = image_dataset(args, scale=(0.2, 1.0), interpolation='bicubic')  # ref: RRC(0.2, 1, bicubic) + flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    model = UMMAE(cfg, (H, W), args.in_chans, args.vis_mask_ratio, args.norm_pix_loss,
                  args.ref_decoder_order).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas,
                                  fused=True)  # ref add_weight_decay without a skip list: mask tokens are decayed
    autocast, scaler = amp_setup(args.amp, d.device)
    fresh = d.main and args.init and not args.resume and not (out / 'checkpoint.pth').exists()  # not resuming
    init = load_checkpoint(args.init) if fresh else None
    if isinstance(init, dict) and 'decoder_pred.weight' in init.get('model', init):  # a trained decoder: which order?
        trained = init['args'].get('ref_decoder_order') if init.get('method') == 'um_mae.py' else True  # ref: its own
        was, now = ('reference' if flag else 'own-unit' for flag in (trained, args.ref_decoder_order))
        print(f'--init {args.init}: its decoder learnt the {was} position order; this run uses the {now} order'
              + ('' if was == now else f' ({"add" if trained else "drop"} --ref_decoder_order to keep it)'))
    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:  # constant buffers (window masks, coordinates): no per-step broadcast
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)
    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params; {L} units of {unit} '
              f'px, {L // 4} visible, {n_keep} of them seen; {len(dataset)} images, {steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g}')
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(torch.stack([dataset[(0, i % len(dataset))][0] for i in range(8)]).to(d.device), mean, std)
    one_mask = uniform_mask(1, H // unit, W // unit, 'cpu', torch.Generator())  # its own RNG: the run's is kept
    flops = report_flops(d, count_flops(model, vis_imgs[:1], one_mask), args.global_batch)  # one image

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
            mask = uniform_mask(imgs.shape[0], H // unit, W // unit, d.device)  # (B, L), fresh every step
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref lr_sched.py)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(imgs, mask)
                scaler.scale(loss / accum).backward()
            logger.add(loss, bad_files)  # the loss stays on the device until the next log step
            if not update:
                continue
            logger.stepped(optimizer_step(optimizer, scaler, params, args.clip_grad)[1])  # [1]: skipped, on the device
            step += 1
            if step % args.log_every == 0 or step == total_steps:  # the only host syncs: ranks agree on stopping
                stop = logger.log_step(epoch + (it + 1) / iters_per_epoch, step, total_steps,
                                       optimizer.param_groups[0]['lr'], args.global_batch, args.max_bad_steps)
            if stop or step >= total_steps:
                break
        if step == (epoch + 1) * steps_per_epoch and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
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
