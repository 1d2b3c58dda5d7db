"""MaskFeat: Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al., arXiv 2112.09133).

Reference: github.com/facebookresearch/SlowFast (slowfast/models/masked.py MaskMViT, operators.py HOGLayerC,
head_helper.py MSSeparateHead, datasets/{imagenet,transform}.py, models/optimizer.py, utils/lr_policy.py,
configs/masked_ssl/in1k_VIT_{B,L}_MaskFeat_PT.yaml). A plain ViT sees every patch, blocks of them replaced by a
learned mask token, and regresses the Histograms of Oriented Gradients (HOG) of the masked patches: no tokenizer,
no teacher, the target is a fixed function of the image computed on the device inside the step.

    python maskfeat.py --demo                                      # tiny ViT, 96-px synthetic images: 113 s of CPU time
    torchrun --nproc_per_node=8 maskfeat.py --data imagenet/       # ViT-B/16 at 224, 1600 epochs
    torchrun --nproc_per_node=8 maskfeat.py --data imagenet/ --model large

Figures the reference code leaves open: the global batch is 2048 (the code says 256 images per 8-GPU machine with
lr x machines; 2048 = 8 machines is what the public reproductions, mmselfsup and openmixup, use, with lr 1.6e-3 by
the same 2e-4 per 256 rule); 1600 epochs (the released checkpoints' names; the yaml says 300) with the yaml's 30
warmup epochs (how the 1600-epoch run warmed up is not stated).

Deviations from the reference:
- bf16 autocast by default on CUDA (reference: fp32; `--amp none` gives it). The HOG target, the loss and the mask
  token stay fp32.
- The effective batch is `--global_batch`; `accum_iter` is derived from it (reference: no accumulation).
- The head projects every token and the loss keeps the masked ones (reference: x[mask] then the projection): the
  same loss and gradients, without a host sync or data-dependent shapes (so `--compile` works).
- Masks are drawn per image in the loader workers as in the reference, from a generator seeded by (seed, epoch,
  index) instead of the worker's global `random`, so a resumed run is exact. Same algorithm, same counts.
- A non-finite loss/gradient skips the step and is counted (reference: raises). An epoch is truncated to whole
  accumulation cycles. No masked patch at all gives loss 0, not NaN. AdamW is torch's fused kernel.
- `--in_chans 1` takes the HOG of the one channel (36 values per patch); non-square inputs mask over the patch grid
  (reference: square only). Checkpoints are `checkpoint.pth` and `checkpoint-<epoch>.pth` (reference
  `checkpoint_epoch_<epoch>.pyth`); their 'model' keys are the reference's, and `--init` reads its .pyth files.
- Data: JPEGs are decoded at reduced size by `Image.draft` when the crop allows it, and crop + resize is one
  `Image.resize(box=...)` call, so crops from big JPEGs differ from torchvision's by resampling detail only.
"""
import dataclasses
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, PatchEmbed, accumulation, amp_setup,
                    check_args, check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, make_loader, normalize,
                    optimizer_step, pair, param_groups, parse_args, report_flops, resume, save_grid, save_loss_curve,
                    save_training_state, setup_run, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny ViT on 96-px synthetic images: 113 s of CPU time
    output_dir: str = 'output_maskfeat'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'base'  # tiny | base | large (MODELS below; ref in1k_VIT_{B,L}_MaskFeat_PT)
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch; None: the preset's (ref 224, tiny 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_ratio: float = 0.4  # ref AUG.MASK_RATIO: round(0.4 N) patches (78 of 196) in blocks of >= 1/5 of that
    batch_size: int = 256  # per GPU; 8 GPUs x 256 = the global batch
    global_batch: int = 2048  # see the header (not fixed by the code); accum_iter = global / (batch_size x GPUs)
    epochs: int = 1600  # released checkpoints (ref yaml MAX_EPOCH 300: the short recipe)
    warmup_epochs: int = 30  # ref yaml SOLVER.WARMUP_EPOCHS
    blr: float = 2e-4  # ref yaml BASE_LR "bs256": lr = blr x global_batch / 256
    warmup_lr: float = 1e-6  # ref WARMUP_START_LR, per 256 images like blr (the NUM_SHARDS rule scales it too)
    min_lr: float = 1e-6  # ref COSINE_END_LR, per 256 images like blr
    weight_decay: float = 0.05  # ref yaml; cls_token, pos_embed and mask_token are decayed (ZERO_DECAY_POS_CLS False)
    betas: tuple = (0.9, 0.999)  # ref SOLVER.BETAS
    clip_grad: float = 0.02  # ref yaml CLIP_GRAD_L2NORM (unusually small: every step is norm-clipped)
    mean: tuple = IMAGENET_MEAN  # ref yaml DATA.MEAN (the HOG target does not depend on it)
    std: tuple = IMAGENET_STD  # ref yaml DATA.STD
    num_workers: int = 8  # ref yaml DATA_LOADER.NUM_WORKERS
    seed: int = 0  # ref RNG_SEED; data and masks use (seed, epoch, index), the rest seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference MaskFeat .pyth release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 10  # ref CHECKPOINT_PERIOD: checkpoint-<epoch>.pth every 10 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads)  ref in1k_VIT_{B,L}_MaskFeat_PT.yaml (MViT with no pooling = ViT)
MODELS = {'tiny': (16, 128, 4, 4), 'base': (16, 768, 12, 12), 'large': (16, 1024, 24, 16)}  # tiny: ours
INPUT_SIZE = {'tiny': 64, 'base': 224, 'large': 224}  # px when --input_size is not given
NBINS, CELL = 9, 8  # ref masked.py: HOGLayerC(nbins=9, pool=8), 8x8-pixel cells, so 2x2 cells per 16-px patch
# the demo: small batches and many steps, since the HOG loss sits at the mean predictor's for the first ~150 steps
DEMO = dict(data='synthetic:2048', model='tiny', input_size=(96,), batch_size=32, global_batch=32, epochs=8,
            warmup_epochs=1, blr=8e-3, num_workers=2, output_dir='output_maskfeat_demo', log_every=16, keep_every=4,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 3.1, ref transform.py)


def block_mask(rng, grid, num_mask, min_patches, max_patches=None, min_aspect=0.3):
    """BEiT's blockwise masking with MaskFeat's figures (ref MaskingGenerator, built in imagenet.py with num_mask =
    round(ratio x N), min_patches = num_mask // 5, max_patches = num_mask): add rectangles of area U(min, budget)
    and log-uniform aspect in [0.3, 1/0.3], strictly smaller than the grid, each adding 1..budget new patches; a
    round whose 10 tries all fail ends the mask below num_mask (ref: kept; 30% of 14x14 masks end at 67-77 of 78).
    rng: random.Random, drawn in the reference's order. Returns (gh, gw) bool numpy, True = masked."""
    gh, gw = grid
    max_patches = max_patches or num_mask
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    mask, count = np.zeros(grid, dtype=bool), 0
    while count < num_mask:
        budget = min(num_mask - count, max_patches)
        for _ in range(10):
            area, aspect = rng.uniform(min_patches, budget), math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < gh and w < gw:
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    break
        else:  # nothing added in 10 tries
            break
        count += new
    return mask


class WithMasks(torch.utils.data.Dataset):
    """Each image with its own block mask, drawn in the loader workers (ref imagenet.py _prepare_im_masked) from a
    generator seeded by (seed, epoch, index): a fresh mask every epoch, the same one after a resume."""

    def __init__(self, images, grid, num_mask, seed):
        self.images, self.grid, self.num_mask, self.seed = images, grid, num_mask, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        img, label, bad = self.images[key]
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        mask = block_mask(random.Random(f'{self.seed}-mask-{epoch}-{idx}'), self.grid, self.num_mask,
                          self.num_mask // 5)
        return (img, torch.from_numpy(mask).flatten()), label, bad  # mask (N,) row-major

# --------------------------------------------------------------------------- target: HOG (paper Sec. 3.2)


class HOG(nn.Module):
    """ref HOGLayerC(nbins=9, pool=8), Gaussian window off: per colour channel, Sobel gradients on the reflect-padded
    image, each pixel's whole magnitude into one of 9 unsigned 20-degree orientation bins (no interpolation),
    summed over 8x8 cells, L2-normalised over the bins of each (channel, cell). The normalisation cancels any
    per-channel scale and the gradients any offset: 0-1, 0-255 and normalised inputs give the same HOG up to
    rounding, which matters where a result is exactly 0 on 8-bit values (as in the reference, gx = 0 can become
    +-noise and move a pixel between the neighbouring bins 8 and 0; a cell flat but for noise gets unit length)."""

    def __init__(self, in_chans=3, nbins=NBINS, cell=CELL):
        super().__init__()
        self.nbins, self.cell = nbins, cell
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])  # conv2d correlates: left - right
        self.register_buffer('weight_x', kx.expand(in_chans, 1, 3, 3).clone())  # ref names (in its state dict)
        self.register_buffer('weight_y', kx.t().expand(in_chans, 1, 3, 3).clone())  # top - bottom

    @torch.no_grad()
    def forward(self, x):  # (B, C, H, W) fp32 -> (B, C, nbins, H/cell, W/cell)
        B, C, H, W = x.shape
        x = F.pad(x, (1, 1, 1, 1), mode='reflect')
        gx, gy = F.conv2d(x, self.weight_x, groups=C), F.conv2d(x, self.weight_y, groups=C)  # (B, C, H, W) each
        mag = torch.hypot(gx, gy)  # (B, C, H, W)
        bins = (torch.atan2(gx, gy) / math.pi * self.nbins).floor().long() % self.nbins  # theta, theta+pi: one bin
        hist = torch.zeros(B, C, self.nbins, H, W, device=x.device).scatter_add_(2, bins[:, :, None], mag[:, :, None])
        c = self.cell
        hist = hist.view(B, C, self.nbins, H // c, c, W // c, c).sum((4, 6))  # (B, C, nbins, H/c, W/c)
        return F.normalize(hist, dim=2)  # a flat cell stays 0


def patch_targets(hist, patch):
    """(B, C, nbins, H/cell, W/cell) -> (B, N, C*nbins*k*k), k = patch/cell cells per side, each patch's values in
    the reference's order (channel, bin, cell row, cell col); patches row-major (ref _get_hog_label_2d)."""
    B, C, nb, h, w = hist.shape
    k = patch // CELL
    t = hist.view(B, C, nb, h // k, k, w // k, k).permute(0, 3, 5, 1, 2, 4, 6)  # (B, gh, gw, C, nbins, k, k)
    return t.reshape(B, (h // k) * (w // k), C * nb * k * k)

# --------------------------------------------------------------------------- model (ref MaskMViT, MaskFeat branch)


class PredHead(nn.Module):
    """ref MSSeparateHead with one target depth: LayerNorm (the model's only final norm), then a Linear. The nested
    containers only give the reference's names: pred_head.transforms.0.0, pred_head.projections.0."""

    def __init__(self, dim, out):
        super().__init__()
        self.transforms = nn.ModuleList([nn.Sequential(nn.LayerNorm(dim, eps=1e-6))])
        self.projections = nn.ModuleList([nn.Linear(dim, out)])

    def forward(self, x):  # (B, 1+N, D) -> (B, N, out): every patch token (the loss keeps the masked ones)
        return self.projections[0](self.transforms[0](x)[:, 1:])


class MaskFeat(nn.Module):
    """ViT with learned positions and no final norm (ref: MaskMViT deletes it), a mask token in encoder space, the
    HOG operator and the LayerNorm + Linear head. State-dict keys are the reference's."""

    def __init__(self, img_size, patch, dim, depth, heads, in_chans=3):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))  # cls slot included
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))  # drop path 0 (ref yaml)
        self.hogs = nn.ModuleList([HOG(in_chans)])
        self.pred_head = PredHead(dim, in_chans * NBINS * (patch // CELL) ** 2)  # 3 x 9 x 2 x 2 = 108
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.initialize_weights()

    def initialize_weights(self):
        """ref MViT._init_weights: encoder Linear and LayerNorm biases start at 0.02, not 0; trunc_normal_(std .02)
        is torch's (cut at +-2, i.e. a plain normal); the patch-embed conv bias keeps PyTorch's init. The head
        (ref MSSeparateHead._init_weights) has zero biases."""
        for t in (self.cls_token, self.pos_embed, self.mask_token):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.02)
        nn.init.zeros_(self.pred_head.projections[0].bias)
        nn.init.zeros_(self.pred_head.transforms[0][0].bias)

    def forward_encoder(self, imgs, mask):
        x = self.patch_embed(imgs)  # (B, N, D)
        w = mask.unsqueeze(-1).type_as(self.mask_token)  # (B, N, 1) fp32, as the reference: under autocast too
        x = x * (1 - w) + self.mask_token * w  # the token's gradient sums in fp32; replaced before cls and positions
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, D)
        for blk in self.blocks:
            x = blk(x)
        return x  # (B, 1+N, D), the last block's output: no final norm

    def forward(self, imgs, mask):
        """imgs (B, C, H, W) normalised; mask (B, N) bool, True = masked."""
        with torch.autocast(imgs.device.type, enabled=False):  # in bf16 the reference's HOG fails: keep it fp32
            target = patch_targets(self.hogs[0](imgs.float()), self.patch_embed.patch_size)  # (B, N, C*9*k*k)
        pred = self.pred_head(self.forward_encoder(imgs, mask))  # (B, N, C*9*k*k)
        return maskfeat_loss(pred, target, mask), {'pred': pred, 'target': target, 'mask': mask}


def maskfeat_loss(pred, target, mask):
    """ref MultipleMSELoss('mean') on the (N_mask_total, 108) rows of the whole batch: the mean over every masked
    patch and every HOG value, so an image with more masked patches weighs more. pred, target (B, N, K)."""
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
    return torch.where(mask, per_patch, 0.0).sum() / mask.sum().clamp(min=1)


def features(model, imgs):
    """The representation MaskFeat's ImageNet evaluation starts from: its fine-tuning (ref in1k_VIT_{B,L}_MaskFeat_FT
    USE_MEAN_POOLING, video_model_builder.py) classifies head(norm(mean of the last block's patch tokens)), cls
    excluded; the pretrained model has no such norm, so it is a fresh LayerNorm (unit weight, zero bias: no affine
    here). imgs (B, C, H, W) normalised, nothing masked -> (B, D)."""
    mask = torch.zeros(imgs.shape[0], model.patch_embed.num_patches, dtype=torch.bool, device=imgs.device)
    x = model.forward_encoder(imgs, mask)[:, 1:].mean(dim=1)  # (B, D)
    return F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)


def encoder_state_dict(model):
    """timm's VisionTransformer layout without `norm` (the pretrained encoder has none: loads strictly into
    timm's ViT with final_norm=False; timm's global_pool='avg' model adds a fresh fc_norm as the reference's
    fine-tuning adds a fresh norm)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('mask_token', 'hogs.', 'pred_head.'))}

# --------------------------------------------------------------------------- pictures


def hog_glyphs(hist, g):
    """The classic HOG picture: each cell of (B, nbins, h, w) drawn as g x g pixels of lines along the edge of each
    bin's orientation (across its gradient), as bright as the bin. -> (B, 1, h*g, w*g) in [0, 1]."""
    B, nb, h, w = hist.shape
    theta = (torch.arange(nb) + 0.5) * math.pi / nb  # bin centres; the gradient (x right, y down) is +-(sin, cos)
    r = torch.arange(g) - (g - 1) / 2
    ys, xs = torch.meshgrid(r, r, indexing='ij')  # (g, g)
    dist = (xs * theta.sin().view(-1, 1, 1) + ys * theta.cos().view(-1, 1, 1)).abs()  # (nb, g, g): to the edge line
    stencil = (1 - dist).clamp(min=0) * (xs ** 2 + ys ** 2 <= (g / 2) ** 2)  # (nb, g, g)
    out = torch.einsum('bnhw,nyx->bhywx', hist.float().cpu(), stencil)  # (B, h, g, w, g)
    return out.reshape(B, 1, h * g, w * g).clamp(0, 1)


@torch.no_grad()
def visualize(model, imgs, mask, args, path):
    """original | masked input | HOG of the image | its HOG in the masked patches (the target) | the predicted HOG
    there (negative values shown as 0), for a fixed batch and masks. The prediction is drawn as it is."""
    was_training = model.training
    model.eval()
    _, out = model(imgs, mask)
    B, C, H, W = imgs.shape
    p, (gh, gw) = model.patch_embed.patch_size, model.patch_embed.grid_size
    k, s = p // CELL, max(1, round(256 / W))  # cells per patch side; glyph cells of 8s pixels
    to_cells = lambda t: t.view(B, gh, gw, C, NBINS, k, k).permute(0, 3, 4, 1, 5, 2, 6).reshape(  # noqa: E731
        B, C, NBINS, gh * k, gw * k).mean(1)  # (B, nbins, H/8, W/8), channels averaged
    glyph = lambda t: hog_glyphs(to_cells(t), CELL * s)  # noqa: E731
    m = mask.view(B, 1, gh, gw).repeat_interleave(p * s, 2).repeat_interleave(p * s, 3).cpu()  # (B, 1, sH, sW)
    x = imgs.float() * torch.tensor(args.std, device=imgs.device).view(1, -1, 1, 1) + \
        torch.tensor(args.mean, device=imgs.device).view(1, -1, 1, 1)
    x = F.interpolate(x.cpu(), scale_factor=s, mode='nearest')  # (B, C, sH, sW)
    target, pred = out['target'], out['pred'].float().clamp(min=0)
    save_grid(path, [('original', x), ('masked input', torch.where(m, 0.5, x)), ('HOG', glyph(target)),
                     ('HOG, masked (target)', glyph(target) * m), ('predicted HOG, masked', glyph(pred) * m)],
              'HOG: 9 orientation bins per 8x8 cell, drawn along the edges, averaged over the colour channels')
    model.train(was_training)

# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS)  # one line and exit on a value the run cannot use, before any work
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    patch, dim, depth, heads = MODELS[args.model]
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the patch size {patch} of --model {args.model}')
    grid = (H // patch, W // patch)
    N = grid[0] * grid[1]
    num_mask = round(N * args.mask_ratio)  # ref imagenet.py (Python's round: 78.4 -> 78)
    check_mask_ratio(args.mask_ratio, num_mask, N, 'patches')
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(MaskFeat((H, W), patch, dim, depth, heads, args.in_chans))
    d, out = setup_run(args)  # process group, seeds + rank, output folder

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the global batch
    lr, warmup_lr, min_lr = (v * args.global_batch / 256 for v in (args.blr, args.warmup_lr, args.min_lr))

    images = image_dataset(args, scale=(0.5, 1.0), interpolation='bicubic')  # ref: RRC(0.5-1, bicubic) + flip
    dataset = WithMasks(images, grid, num_mask, args.seed)
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    model = MaskFeat((H, W), patch, dim, depth, heads, args.in_chans).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay)[::-1], lr=lr, betas=args.betas,
                                  fused=True)  # ref order [decay, no decay]; fused: skips a bad step on the device
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:  # constant HOG kernels: no per-step broadcast
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, {grid[0]}x{grid[1]} '
              f'patches, up to {num_mask} masked in blocks of >= {num_mask // 5}; {len(dataset)} images, '
              f'{steps_per_epoch} steps/epoch; target: {model.pred_head.projections[0].out_features} HOG values/patch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g} (warmup from {warmup_lr:g}, cosine to '
              f'{min_lr:g})')

    vis = [dataset[(0, i % len(dataset))][0] for i in range(4)]  # a fixed batch and its epoch-0 masks
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(torch.stack([v[0] for v in vis]).to(d.device), mean, std)
    vis_mask = torch.stack([v[1] for v in vis]).to(d.device)
    flops = report_flops(d, count_flops(model, vis_imgs[:1], vis_mask[:1]), args.global_batch)  # one image

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            visualize(unwrap(model), vis_imgs, vis_mask, args, out / f'vis_{epoch_done or step}.png')  # epoch >= 1
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
            (imgs, mask), _, bad_files = next(batches)  # bad_files: indices of unreadable files, else -1
            logger.wait += time.perf_counter() - t
            imgs = normalize(imgs.to(d.device, non_blocking=True), mean, std)  # (B, C, H, W)
            mask = mask.to(d.device, non_blocking=True)  # (B, N) bool, drawn in the workers
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref lr_policy.py)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, min_lr, args.warmup_epochs, args.epochs,
                                        warmup_lr)
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
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, timm's ViT layout (no final norm)
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
