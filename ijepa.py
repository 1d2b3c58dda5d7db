"""I-JEPA: Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture (Assran et al., CVPR
2023, arXiv 2301.08243). Reference: github.com/facebookresearch/ijepa (src/train.py, src/helper.py,
src/masks/multiblock.py, src/models/vision_transformer.py, src/utils/schedulers.py, configs/in1k_vith14_ep300.yaml).

A context encoder sees one large block of the image minus four target blocks; a narrow predictor, given the context
and the positions of one target block, predicts what the target encoder (an EMA of the context encoder, no gradient)
computes for that block on the full image. The loss is in representation space: no pixels, no tokens.

    python ijepa.py --demo                                       # tiny model, synthetic images, CPU, ~1.5 min
    torchrun --nproc_per_node=8 ijepa.py --data imagenet/        # ViT-H/14 at 224, the reference's 300-epoch recipe
    torchrun --nproc_per_node=8 ijepa.py --data imagenet/ --model huge448 --batch_size 16   # ViT-H/16 at 448

Deviations from the reference:
- Masks are drawn in the training process, vectorised over the batch (reference: a per-image Python loop in the
  loader workers). Block sizes are the reference's draws (a generator seeded with the batch counter); block
  positions come from a generator seeded with (seed + rank, counter) instead of the workers' global RNG: the same
  distribution, and a resumed run draws the same masks. The counter is the rank's batch index since the start of
  training (reference: a counter shared by the workers, in the order they reach it).
- A --min_keep that a block can never exceed stops at start with one line (reference: resamples forever).
- Kept as the reference (they produced its numbers), each with a flag that fixes it: blocks never touch the last
  patch row and column, and the context block is always the top-left (H-1) x (W-1) on 14x14 and 16x16 grids
  (`--full_grid` lets blocks cover the whole grid, reference PR #40); every context is cut to the batch's smallest
  by keeping its first (top) patches, so the per-GPU batch changes the context (`--random_cut` drops random ones).
- The effective batch is `--global_batch` (2048, the reference's 16 GPUs x 128) with gradient accumulation
  (reference: none); the lr, weight-decay and momentum schedules count optimizer steps.
- bf16 autocast without a GradScaler (reference: a GradScaler also under bf16, where it only skips non-finite steps);
  a non-finite loss skips the step and is counted (reference: assert); AdamW is torch's fused kernel.
- One state dict (`encoder.*`, `predictor.*`, `target_encoder.*`); `--init` also reads the reference's release files
  ({'encoder', 'predictor', 'target_encoder'}, keys with `module.`). `encoder.pth` is the target encoder, which the
  paper evaluates (timm's own loader takes the context encoder, 'encoder', from the release files).
- Loss as the code computes it: smooth L1 (beta 1) averaged over all elements (the paper says L2). No ipe_scale
  (every config sets 1.0). Non-square inputs work (reference: square only).
- Data: as the reference (RandomResizedCrop(0.3-1, bilinear), no flip), but JPEGs are decoded at reduced size by
  `Image.draft` when the crop allows it, and crop + resize is one `Image.resize(box=...)` call.
"""
import copy
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, PatchEmbed, accumulation, amp_setup,
                    check_args, cosine_lr, count_flops, finish, image_dataset, load_weights, make_loader, normalize,
                    optimizer_step, pair, parse_args, report_flops, resume, save_grid, save_loss_curve,
                    save_training_state, setup_run, sincos_2d, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny model on synthetic images, a couple of minutes on a laptop CPU
    output_dir: str = 'output_ijepa'  # checkpoint.pth, log.jsonl (loss, tgt_std), vis_<epoch>.png, encoder.pth
    model: str = 'huge'  # tiny | base | large | huge | huge448 | giant (MODELS below); paper headline ViT-H/14
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch size; default the preset's
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    npred: int = 4  # target blocks per image; ref configs mask.num_pred_masks
    pred_mask_scale: tuple = (0.15, 0.2)  # target block area / image area; ref configs
    aspect_ratio: tuple = (0.75, 1.5)  # target block height / width; ref configs
    enc_mask_scale: tuple = (0.85, 1.0)  # context block area / image area (square); ref configs
    min_keep: int = 10  # a block must keep more patches than this; ref configs
    full_grid: bool = False  # blocks may reach the last patch row/column (ref PR #40); off = the reference
    random_cut: bool = False  # cut contexts to the batch's smallest at random patches; off = keep the top (ref)
    crop_scale: tuple = (0.3, 1.0)  # RandomResizedCrop, bilinear, no flip; ref configs data.crop_scale
    batch_size: int = 128  # per GPU; ref in1k_vith14_ep300.yaml (it also sets the context cut, see Deviations)
    global_batch: int = 2048  # ref README: 16 GPUs x 128; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 300  # ref in1k_vith14_ep300.yaml
    warmup_epochs: int = 40  # ref config (the paper says 15)
    lr: float = 1e-3  # absolute, not scaled with the batch (ref; linear scaling "does not hold well", ref issue #41)
    warmup_lr: float = 2e-4  # lr at the start of the linear warmup; ref start_lr (the paper says 1e-4)
    min_lr: float = 1e-6  # end of the cosine; ref final_lr
    weight_decay: float = 0.04  # cosine from this ...; ref config
    final_weight_decay: float = 0.4  # ... to this (the paper says linear); ref config
    ema: tuple = (0.996, 1.0)  # target-encoder momentum, linear in the step; ref config
    betas: tuple = (0.9, 0.999)  # torch's AdamW defaults; ref helper.init_opt
    clip_grad: float = 0.0  # 0 = none; ref: no clipping
    mean: tuple = IMAGENET_MEAN  # ref Normalize
    std: tuple = IMAGENET_STD  # ref Normalize
    num_workers: int = 10  # ref config
    seed: int = 0  # ref train.py; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA (ref use_bfloat16), fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or encoder.pth, or a reference release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 10  # optimizer steps between log lines; ref train.py
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png; ref: every epoch
    keep_every: int = 50  # checkpoint-<epoch>.pth every 50 epochs and at the last; ref checkpoint_freq
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads, mlp ratio, predictor D, predictor depth, input size); ref vision_transformer.py and
# configs (predictor heads = encoder heads; no config ships for B and L: helper.init_model's predictor depth 6)
MODELS = {
    'tiny': (4, 64, 4, 4, 4.0, 32, 2, 48),  # ours, for the demo and tests (48 px: a 12x12 patch grid)
    'base': (16, 768, 12, 12, 4.0, 384, 6, 224),
    'large': (16, 1024, 24, 16, 4.0, 384, 6, 224),
    'huge': (14, 1280, 32, 16, 4.0, 384, 12, 224),  # in1k_vith14_ep300.yaml
    'huge448': (16, 1280, 32, 16, 4.0, 384, 12, 448),  # in1k_vith16-448_ep300.yaml
    'giant': (16, 1408, 40, 16, 48 / 11, 384, 16, 224),  # in22k_vitg16_ep44.yaml
}
DEMO = dict(data='synthetic:2048', model='tiny', batch_size=64, global_batch=64, epochs=5, warmup_epochs=1,
            num_workers=2, output_dir='output_ijepa_demo', log_every=8, keep_every=5,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 3, ref multiblock.py)


def block_size(r, scale, aspect, H, W, full_grid=False):
    """One uniform r in [0, 1) sets both the area and the aspect ratio (h/w) of a block, as the reference draws it;
    (h, w) at most (H-1, W-1) as the reference clips them (H, W with full_grid)."""
    keep = int(H * W * (scale[0] + r * (scale[1] - scale[0])))
    ar = aspect[0] + r * (aspect[1] - aspect[0])
    h, w = round(math.sqrt(keep * ar)), round(math.sqrt(keep / ar))
    return min(h, H - (not full_grid)), min(w, W - (not full_grid))


def blocks(n, h, w, H, W, gen, full_grid=False):
    """n blocks of h x w at uniform positions -> (n, H*W) bool. The reference's randint(0, H - h) never reaches the
    last row or column; full_grid adds the missing position."""
    top = torch.randint(0, H - h + full_grid, (n, 1), generator=gen)  # (n, 1)
    left = torch.randint(0, W - w + full_grid, (n, 1), generator=gen)  # (n, 1)
    rows, cols = torch.arange(H), torch.arange(W)
    inside_r, inside_c = (rows >= top) & (rows < top + h), (cols >= left) & (cols < left + w)  # (n, H), (n, W)
    return (inside_r[:, :, None] & inside_c[:, None, :]).flatten(1)  # (n, N)


def sample_masks(args, grid, B, counter, gen):
    """The multi-block masks of one batch -> masks_enc (B, K_enc), masks_pred (npred, B, K_pred): sorted row-major
    patch indices, int64, on the CPU. `counter` seeds the block sizes (shared by the batch and by all ranks), `gen`
    draws the positions (per image). Targets may overlap each other; the context is its block minus the union of the
    targets, redrawn while it keeps min_keep patches or fewer (after each 20 failures the last remaining target is no
    longer removed, as the reference relaxes it); contexts are then cut to the batch's smallest."""
    H, W = grid
    M, N = args.npred, H * W
    g = torch.Generator().manual_seed(counter)
    r_tgt, r_ctx = torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item()  # the reference's order
    th, tw = block_size(r_tgt, args.pred_mask_scale, args.aspect_ratio, H, W, args.full_grid)
    ch, cw = block_size(r_ctx, args.enc_mask_scale, (1.0, 1.0), H, W, args.full_grid)
    if min(th * tw, ch * cw) <= args.min_keep:  # check_masks rules this out at start; never loop forever
        raise SystemExit(min_keep_error(args, grid, min(th * tw, ch * cw)))
    targets = blocks(B * M, th, tw, H, W, gen, args.full_grid).view(B, M, N)  # (B, M, N)
    ctx, fails, todo = torch.zeros(B, N, dtype=torch.bool), torch.zeros(B, dtype=torch.long), torch.arange(B)
    while len(todo):
        cand = blocks(len(todo), ch, cw, H, W, gen, args.full_grid)  # (n, N)
        used = torch.arange(M) < (M - fails[todo] // 20)[:, None]  # (n, M): targets still removed
        cand &= ~(targets[todo] & used[..., None]).any(1)  # (n, N)
        good = cand.sum(1) > args.min_keep  # (n,)
        ctx[todo[good]] = cand[good]
        fails[todo[~good]] += 1
        todo = todo[~good]
    k_enc = int(ctx.sum(1).min())
    order = torch.arange(N).expand(B, N) if not args.random_cut else torch.rand(B, N, generator=gen)  # (B, N)
    keep = torch.where(ctx, order, N + 1).argsort(1)[:, :k_enc]  # (B, K_enc): first (or random) context patches
    masks_enc = keep.sort(1).values  # (B, K_enc)
    masks_pred = targets.transpose(0, 1).nonzero()[:, 2].view(M, B, th * tw)  # (M, B, K_pred) sorted per block
    return masks_enc, masks_pred


def min_keep_error(args, grid, n):
    return (f'--min_keep {args.min_keep}: blocks of {n} patches can be drawn on the {grid[0]}x{grid[1]} patch grid, '
            f'and a block must keep more than min_keep (the reference would redraw forever); give --min_keep {n - 1} '
            f'or less, or larger --pred_mask_scale/--enc_mask_scale')


def check_masks(args, grid):
    """At start: the block sizes the run can draw (over a fine grid of r); stop if one cannot exceed min_keep."""
    H, W = grid
    r = np.linspace(0, 1, 4001)[:-1]
    tgt = {block_size(x, args.pred_mask_scale, args.aspect_ratio, H, W, args.full_grid) for x in r}
    ctx = {block_size(x, args.enc_mask_scale, (1.0, 1.0), H, W, args.full_grid) for x in r}
    smallest = min(h * w for h, w in tgt | ctx)
    if smallest <= args.min_keep:
        raise SystemExit(min_keep_error(args, grid, smallest))
    return sorted(tgt), sorted(ctx)


# --------------------------------------------------------------------------- model


class ViT(nn.Module):
    """The reference's VisionTransformer (timm's names, no cls token, fixed sin-cos positions): context and target
    encoder. `keep` (B, K) restricts it to those patches, positions added first."""

    def __init__(self, img_size, patch, dim, depth, heads, mlp_ratio=4.0, in_chans=3):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        self.pos_embed = nn.Parameter(sincos_2d(dim, *self.patch_embed.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, imgs, keep=None):
        x = self.patch_embed(imgs) + self.pos_embed  # (B, N, D)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K_enc, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Predictor(nn.Module):
    """The reference's VisionTransformerPredictor: a narrow ViT over the context tokens plus the mask tokens of ONE
    target block, so each block is predicted in its own sequence (the other blocks are not visible to it)."""

    def __init__(self, grid, dim, pred_dim, depth, heads):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(pred_dim, *grid)[None], requires_grad=False)
        self.predictor_blocks = nn.ModuleList(Block(pred_dim, heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_dim, dim)

    def forward(self, z, masks_enc, masks_pred):
        M, B, K = masks_pred.shape
        pos = self.predictor_pos_embed[0]  # (N, Dp)
        x = self.predictor_embed(z) + pos[masks_enc]  # (B, K_enc, Dp)
        tokens = self.mask_token + pos[masks_pred.flatten(0, 1)]  # (M*B, K_pred, Dp), block-major
        x = torch.cat([x.repeat(M, 1, 1), tokens], dim=1)  # (M*B, K_enc + K_pred, Dp)
        for blk in self.predictor_blocks:
            x = blk(x)
        return self.predictor_proj(self.predictor_norm(x)[:, -K:])  # (M*B, K_pred, D)


class IJEPA(nn.Module):
    def __init__(self, img_size, patch, dim, depth, heads, mlp_ratio, pred_dim, pred_depth, in_chans=3):
        super().__init__()
        self.encoder = ViT(img_size, patch, dim, depth, heads, mlp_ratio, in_chans)
        self.predictor = Predictor(self.encoder.patch_embed.grid_size, dim, pred_dim, pred_depth, heads)
        self.initialize_weights()
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # ref train.py:169, 224

    def initialize_weights(self):
        # What training starts from: the constructors' init, then helper.init_model re-initialises every Linear and
        # LayerNorm, which undoes the constructors' depth rescale of attn.proj/mlp.fc2. The conv keeps its init.
        nn.init.trunc_normal_(self.predictor.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):  # a, b = -2, 2 absolute: untruncated at std 0.02
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, imgs, masks_enc, masks_pred):
        """imgs (B, C, H, W); masks_enc (B, K_enc), masks_pred (M, B, K_pred) patch indices -> (loss, extras)."""
        M, B, K = masks_pred.shape
        with torch.no_grad():  # ref forward_target: the full image, the encoder's norm, then a parameter-free LN
            h = self.target_encoder(imgs).float()  # (B, N, D)
            h = F.layer_norm(h, h.shape[-1:])  # (B, N, D)
            tgt_std = h.std(0, correction=0).mean()  # collapse signal: 0 when every image gives the same targets
            h = h[torch.arange(B, device=h.device)[None, :, None], masks_pred].flatten(0, 1)  # (M*B, K_pred, D)
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)  # (M*B, K_pred, D)
        loss = F.smooth_l1_loss(z.float(), h)  # ref train.py:311: beta 1, mean over every element (paper: L2)
        return loss, {'z': z, 'h': h, 'tgt_std': tgt_std}


@torch.no_grad()
def ema_update(encoder, target, m):
    """target = m target + (1 - m) encoder for every parameter (pos_embed too), after the optimizer step, in the
    reference's order of operations (train.py:332-336)."""
    tk = list(target.parameters())
    torch._foreach_mul_(tk, m)
    torch._foreach_add_(tk, torch._foreach_mul(list(encoder.parameters()), 1.0 - m))


def schedules(s, args, steps_per_epoch):
    """lr, weight decay and EMA momentum of optimizer step s = 1, 2, ... (ref schedulers.py, train.py:228): lr
    linear from warmup_lr, then cosine to min_lr; weight decay cosine from weight_decay up to final_weight_decay;
    momentum linear from ema[0], reaching ema[1] one step after the last."""
    T, warm = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    lr = cosine_lr(s, args.lr, args.min_lr, warm, max(T, warm + 1), args.warmup_lr)
    wd = cosine_lr(s, args.weight_decay, args.final_weight_decay, 0, T)
    return lr, wd, args.ema[0] + (s - 1) * (args.ema[1] - args.ema[0]) / T


def param_groups(model):
    """ref helper.init_opt: [encoder decay, predictor decay, encoder no-decay, predictor no-decay]; no decay for
    names containing 'bias' and 1-D tensors. mask_token and the (frozen) position tables sit in the decay groups."""
    no_wd = lambda n, p: 'bias' in n or p.ndim == 1  # noqa: E731
    parts = [model.encoder.named_parameters, model.predictor.named_parameters]
    return ([{'params': [p for n, p in part() if not no_wd(n, p)]} for part in parts]
            + [{'params': [p for n, p in part() if no_wd(n, p)], 'weight_decay': 0.0} for part in parts])


def features(model, imgs):
    """The representation the paper evaluates (Sec. 4, "we use the target-encoder for evaluation and average pool its
    output"; ref issue #36: no cls token): the mean of the target encoder's last-layer tokens, after its norm.
    imgs (B, C, H, W) normalised -> (B, D)."""
    return unwrap(model).target_encoder(imgs).mean(1)


def release_keys(ckpt):
    """--init's reading of a reference release ({'encoder', 'predictor', 'target_encoder'}, keys with 'module.') or
    of an encoder alone (encoder.pth: into both encoders); None for our own checkpoints."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('target_encoder'), dict):
        return {f'{part}.{k.removeprefix("module.")}': v for part in ('encoder', 'predictor', 'target_encoder')
                for k, v in (ckpt.get(part) or {}).items()}
    sd = ckpt.get('model', ckpt) if isinstance(ckpt, dict) else None
    if isinstance(sd, dict) and 'pos_embed' in sd:
        return {f'{part}.{k}': v for part in ('encoder', 'target_encoder') for k, v in sd.items()}
    return None


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """image | context (what the context encoder sees) | the target blocks, one colour each | cos(prediction,
    target) per target patch, for a fixed batch and fixed masks."""
    was_training = model.training
    model.eval()
    p, (gh, gw) = model.encoder.patch_embed.patch_size, model.encoder.patch_embed.grid_size
    B, M = imgs.shape[0], args.npred
    m_enc, m_pred = sample_masks(args, (gh, gw), B, 0, torch.Generator().manual_seed(0))
    _, out = model(imgs, m_enc.to(imgs.device), m_pred.to(imgs.device))
    mean, std = torch.tensor(args.mean, device=imgs.device), torch.tensor(args.std, device=imgs.device)
    img = (imgs * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1).expand(-1, 3, -1, -1).cpu()
    up = lambda m: m.view(B, 1, gh, gw).float().repeat_interleave(p, 2).repeat_interleave(p, 3)  # noqa: E731
    onehot = lambda idx: torch.zeros(B, gh * gw).scatter(1, idx, 1.0)  # noqa: E731
    dimmed = 0.25 * img + 0.375  # patches outside what a column shows
    context = torch.where(up(onehot(m_enc)) > 0, img, dimmed)
    targets = dimmed.clone()
    colours = torch.tensor([(1, 0.2, 0.2), (0.2, 1, 0.2), (0.3, 0.5, 1), (1, 0.9, 0.1)])
    for j in range(M):
        a = 0.6 * up(onehot(m_pred[j]))
        targets = targets * (1 - a) + colours[j % 4].view(1, 3, 1, 1) * a
    cos = F.cosine_similarity(out['z'].float(), out['h'], dim=-1).view(M, B, -1).cpu()  # (M, B, K_pred)
    idx, cos = m_pred.transpose(0, 1).reshape(B, -1), cos.transpose(0, 1).reshape(B, -1)  # (B, M*K_pred)
    total = torch.zeros(B, gh * gw).scatter_add(1, idx, cos)
    sim = up(total / torch.zeros(B, gh * gw).scatter_add(1, idx, torch.ones_like(cos)).clamp(min=1))
    save_grid(path, [('image', img), ('context', context), (f'{M} targets', targets),
                     ('cos(pred, target)', sim.clamp(0, 1).expand(-1, 3, -1, -1))],
              f'context: the patches the context encoder sees ({m_enc.shape[1]} of {gh * gw}, cut to the batch\'s '
              f'smallest);\ntargets: {M} blocks of {m_pred.shape[2]} patches; right: cosine of the prediction and the '
              f'target per target patch (white 1, black <= 0)')
    model.train(was_training)


# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS, positive=('npred',), non_negative=('min_keep', 'final_weight_decay'))
    patch, dim, depth, heads, mlp_ratio, pred_dim, pred_depth, size = MODELS[args.model]
    for name, top in (('pred_mask_scale', 1), ('enc_mask_scale', 1), ('crop_scale', 1), ('aspect_ratio', math.inf),
                      ('ema', 1)):
        v = getattr(args, name)
        if len(v) != 2 or not 0 < v[0] <= v[1] <= top:
            raise SystemExit(f'--{name} {" ".join(map(str, v))}: give two values 0 < min <= max'
                             + (' <= 1' if top == 1 else ''))
    args.input_size = tuple(args.input_size or (size,))
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the patch size {patch} of --model {args.model}')
    grid = (H // patch, W // patch)
    tgt_sizes, ctx_sizes = check_masks(args, grid)  # a min_keep no block can exceed stops here
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(IJEPA((H, W), patch, dim, depth, heads, mlp_ratio, pred_dim, pred_depth, args.in_chans),
                             release_keys)
    d, out = setup_run(args)  # process group, seeds + rank, output folder

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the reference's global batch
    dataset = image_dataset(args, scale=args.crop_scale, interpolation='bilinear', flip=False)  # ref transforms.py
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    model = IJEPA((H, W), patch, dim, depth, heads, mlp_ratio, pred_dim, pred_depth, args.in_chans).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model), lr=args.lr, betas=args.betas, fused=True)  # eps 1e-8 (ref)
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(dataclasses.replace(args, init=None), model, optimizer, scaler, d)  # incl. the EMA target encoder
    if step == 0 and args.init:
        load_weights(model, args.init, release_keys)
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6  # noqa: E731
        print(f'model {args.model}: encoder {count(model.encoder):.2f}M + predictor {count(model.predictor):.2f}M '
              f'trainable params (+ the EMA target encoder); {len(dataset)} images, {steps_per_epoch} steps/epoch')
        print(f'masks on the {grid[0]}x{grid[1]} patch grid: {args.npred} target blocks of '
              f'{min(h * w for h, w in tgt_sizes)}-{max(h * w for h, w in tgt_sizes)} patches; context block '
              f'{" or ".join(f"{h}x{w}" for h, w in ctx_sizes)} minus the targets, cut to the batch\'s smallest')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr {args.warmup_lr:g} -> {args.lr:g} -> {args.min_lr:g} (absolute, as the reference)')

    vis_imgs = torch.stack([dataset[(0, i % len(dataset))][0] for i in range(8)]).to(d.device)
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(vis_imgs, mean, std)  # a fixed batch for the pictures
    masks = [m.to(d.device) for m in sample_masks(args, grid, 1, 0, torch.Generator().manual_seed(0))]
    flops = report_flops(d, count_flops(model, vis_imgs[:1], *masks), args.global_batch)  # one image, EMA encoder incl.

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            visualize(model, vis_imgs, args, out / f'vis_{epoch_done if epoch_done is not None else step}.png')
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
            save_loss_curve(out / 'tgt_std.png', out / 'log.jsonl', 'tgt_std')
        if not stop:  # collective: kNN on --eval_data, and a linear probe at the end
            evaluate(model, step, final=step >= total_steps)

    if step == 0:  # the target encoder at initialisation (or --init), for comparison
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
            counter = epoch * iters_per_epoch + it  # the reference's batch counter; resumed with the step
            gen = torch.Generator().manual_seed((args.seed + d.rank) * 2**32 + counter)
            masks = [m.to(d.device, non_blocking=True) for m in sample_masks(args, grid, len(imgs), counter, gen)]
            if it % accum == 0:  # per-iteration schedules, ref train.py:291-292
                lr, wd, momentum = schedules(step + 1, args, steps_per_epoch)
                for i, g in enumerate(optimizer.param_groups):
                    g['lr'], g['weight_decay'] = lr, wd if i < 2 else 0.0
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, extras = fwd(imgs, *masks)
                scaler.scale(loss / accum).backward()
            logger.add(loss, bad_files, {'tgt_std': extras['tgt_std']})  # on the device until the next log step
            if not update:
                continue
            _, bad = optimizer_step(optimizer, scaler, params, args.clip_grad)
            ema_update(model.encoder, model.target_encoder, momentum)  # after the optimizer step (ref)
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
    finish(d, out, step, stop, model.target_encoder.state_dict())  # encoder.pth: timm's ViT, no cls, avg pool
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
