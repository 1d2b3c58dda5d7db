"""HiViT: A Simpler and More Efficient Design of Hierarchical Vision Transformer (Zhang et al., arXiv 2205.14949).

Reference: github.com/zhangxiaosong18/hivit (self_supervised/: models/models_hivit_mae.py, models/models_hivit.py,
models/masked_autoencoder.py, main_pretrain.py, engine_pretrain.py, get_started.md). A hierarchical ViT whose stages
before the main stage never mix information across 16-px units: 4x4-px tokens go through MLP-only blocks and merges
inside their unit. So the masked units can be dropped right after the patch embedding, exactly as MAE drops patches,
and a hierarchical encoder trains at ViT speed. The decoder reads the stem features and the main-stage output of
every visible unit ("hifeat").

    python hivit.py --demo                                         # micro HiViT, synthetic images: 97 s of CPU time
    torchrun --nproc_per_node=8 hivit.py --data imagenet/          # HiViT-B, 1600 epochs, the official recipe
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 hivit.py --data imagenet/

Deviations from the reference:
- The lr schedule runs over epochs 0..1600 (reference: its loop passes `epoch + 1` to the per-iteration schedule, so
  warmup starts at lr/40 and the whole curve runs one epoch ahead; a resumed reference run also skips an epoch).
- The effective batch is `--global_batch` (4096 = 8 GPUs x 256 x accum 2); `accum_iter` is derived from it.
- bf16 autocast by default on CUDA (reference: fp16 + GradScaler, which `--amp fp16` gives).
- Attention through SDPA (reference: logits cast to fp32 and clamped before an fp32 softmax; the same in fp32).
- A non-finite loss/gradient skips the optimizer step and is counted (reference: sys.exit); `--max_bad_steps` in a
  row stop the run. An epoch is truncated to a whole number of accumulation cycles.
- No masked unit at all (`--mask_ratio 0`) gives loss 0 instead of 0/0 = NaN. The grid may be non-square.
- Presets `tiny`/`small` (the reference's supervised HiViT-T/S) get the base decoder: the reference pretrains only
  HiViT-B with MAE. `micro` is ours, for the demo and the tests.
- AdamW is torch's fused kernel (same update up to rounding), so a non-finite step is skipped without a host sync.
- Data: JPEGs are decoded at reduced size by `Image.draft` when the crop allows it, and crop + resize is one
  `Image.resize(box=...)` call, so crops from big JPEGs differ from torchvision's by resampling detail only.
Kept as the reference does, on purpose: the encoder's sin-cos `absolute_pos_embed` is trainable and weight-decayed
(its `requires_grad=False` goes to torch.zeros, not to nn.Parameter; mmpretrain freezes it). The norm-pix loss is
always on (the base class hard-codes it). `checkpoint-<epoch>.pth` every 100 epochs and at the last, named by
finished epochs as the reference's. Not copied, no effect: the reference appends N_mask + 1 mask tokens
(MAE's cls-token count) to the decoder input; the extra one is never gathered.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, Mlp, accumulation, amp_setup, check_args,
                    check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, make_loader, normalize,
                    optimizer_step, pair, param_groups, parse_args, patchify, report_flops, resume, save_grid,
                    save_loss_curve, save_training_state, setup_run, sincos_2d, unpatchify, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # micro HiViT on synthetic images: 97 s of CPU time
    output_dir: str = 'output_hivit'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'base'  # micro | tiny | small | base (MODELS below; paper Tab. 1, ref supervised/configs)
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the unit; None: the preset's (ref 224, micro 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_ratio: float = 0.75  # ref get_started.md --mask_ratio 0.75
    batch_size: int = 256  # per GPU; ref get_started.md (8 GPUs x 256 x accum 2)
    global_batch: int = 4096  # ref get_started.md; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 1600  # ref get_started.md (the released checkpoints)
    warmup_epochs: int = 40  # ref get_started.md
    blr: float = 1e-4  # ref get_started.md (not MAE's 1.5e-4); lr = blr x global_batch / 256 = 1.6e-3
    min_lr: float = 0.0  # ref main_pretrain.py
    weight_decay: float = 0.05  # ref get_started.md
    betas: tuple = (0.9, 0.95)  # ref main_pretrain.py
    clip_grad: float = 0.0  # 0 = none; ref: no clipping in pretraining
    mean: tuple = IMAGENET_MEAN  # ref Normalize
    std: tuple = IMAGENET_STD  # ref Normalize
    num_workers: int = 10  # ref main_pretrain.py
    seed: int = 0  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference release (its keys)
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 100  # ref main_pretrain.py: checkpoint-<epoch>.pth every 100 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (unit px, D, depths, heads, decoder D, decoder depth, decoder heads). depths[0], depths[1] count PAIRS of
# MLP-only stem blocks at D/4 and D/2 wide; depths[2] main blocks at D. Decoder: ref mae_hivit_base_dec512d6b.
# mmpretrain's "base" is [2, 2, 24] (79.05M, iTPN's base), not the paper's HiViT-B [2, 2, 20] (66.42M).
MODELS = {
    'micro': (8, 128, (1, 1, 4), 4, 96, 2, 4),  # ours, for the demo and tests (4-px units of 2x2 px tokens)
    'tiny': (16, 384, (1, 1, 10), 6, 512, 6, 16),  # ref supervised/configs/hivit_tiny_224.yaml, base decoder
    'small': (16, 384, (2, 2, 20), 6, 512, 6, 16),  # ref supervised/configs/hivit_small_224.yaml, base decoder
    'base': (16, 512, (2, 2, 20), 8, 512, 6, 16),  # ref mae_hivit_base_dec512d6b
}
INPUT_SIZE = {'micro': 64, 'tiny': 224, 'small': 224, 'base': 224}  # px when --input_size is not given
STEM_MLP_RATIO, INNER = 3.0, 4  # ref: MLP ratio 3 in the stem; a unit is 4 x 4 stem tokens
DEMO = dict(data='synthetic:2048', model='micro', input_size=(64,), batch_size=64, global_batch=64, epochs=6,
            warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_hivit_demo', log_every=8, keep_every=3,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 4.1: MAE on units)


def unit_masking(noise, mask_ratio):
    """MAE's per-sample random masking over units by sorting uniform noise (B, N): the int(N(1-ratio)) units with the
    smallest noise stay. Returns ids_keep (B, N_vis), ids_restore (B, N) that undoes the shuffle, and mask (B, N)
    bool with True = removed, in unit order."""
    B, N = noise.shape
    n_keep = int(N * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)  # (B, N) ascending: small noise = keep
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
    mask = torch.ones(B, N, dtype=torch.bool, device=noise.device)
    mask[:, :n_keep] = False
    return ids_shuffle[:, :n_keep], ids_restore, mask.gather(1, ids_restore)

# --------------------------------------------------------------------------- model


class PatchEmbed(nn.Module):
    """Conv (p/4 stride) then regroup unit-major: (B, C, H, W) -> (B, N, 4, 4, D/4), inner axes (row, col)."""

    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch // INNER, patch // INNER)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # ref patch_norm=True

    def forward(self, x):
        x = self.proj(x)  # (B, D/4, H/s, W/s), s = p/4
        B, C, h, w = x.shape
        x = x.view(B, C, h // INNER, INNER, w // INNER, INNER).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, 4, 4, C)
        return self.norm(x.reshape(B, -1, INNER, INNER, C))  # (B, N, 4, 4, C)


class MlpBlock(nn.Module):
    """A stem block: x + MLP(LN(x)) per token, no attention (ref BlockWithRPE with num_heads=0; same key names)."""

    def __init__(self, dim):
        super().__init__()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * STEM_MLP_RATIO))

    def forward(self, x):
        return x + self.mlp(self.norm2(x))


class PatchMerge(nn.Module):
    """2x2 neighbours inside a unit, concatenated in Swin's order (00, 10, 01, 11) -> LN -> Linear(4C -> 2C)."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim, eps=1e-6), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):  # (B, N, h, w, C)
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
                      dim=-1)  # (B, N, h/2, w/2, 4C)
        return self.reduction(self.norm(x))  # (B, N, h/2, w/2, 2C)


class HiViTMAE(nn.Module):
    """HiViTMaskedAutoencoder (hifeat=True, rpe=False) with the reference's parameter names."""

    def __init__(self, img_size, patch, dim, depths, heads, dec_dim, dec_depth, dec_heads, in_chans=3):
        super().__init__()
        H, W = pair(img_size)
        self.patch, self.grid, self.num_main_blocks = patch, (H // patch, W // patch), depths[-1]
        self.patch_embed = PatchEmbed(patch, in_chans, dim // 4)
        # trainable, as in the reference (see the header); sin-cos initialised, added at the main stage
        self.absolute_pos_embed = nn.Parameter(sincos_2d(dim, *self.grid)[None])  # (1, N, D)
        self.blocks = nn.ModuleList()  # one list as in the reference: 2d0 MLP, merge, 2d1 MLP, merge, d2 main
        for i, width in enumerate((dim // 4, dim // 2)):
            self.blocks.extend([MlpBlock(width) for _ in range(2 * depths[i])] + [PatchMerge(width)])
        self.blocks.extend(Block(dim, heads) for _ in range(depths[2]))
        self.norm = nn.LayerNorm(7 * dim, eps=1e-6)  # over hifeat: 16 D/4 + 4 D/2 + D = 7D (3584 for base)
        self.decoder_embed = nn.Linear(7 * dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, *self.grid)[None], requires_grad=False)  # (1, N, Dd)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * in_chans)
        # ref HiViT._init_weights: Linear trunc-normal 0.02 / bias 0, LN (1, 0); the conv keeps PyTorch's init
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)  # timm's: cut at +-2 (absolute), i.e. +-100 std
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x):
        """Stem stages on whole units (B, n, 4, 4, D/4): per token or inside a unit only, so running it on the visible
        units equals running it on all and selecting them. Returns the features before each merge (flattened per
        unit, hifeat) and the merged tokens (B, n, D)."""
        feats = []
        for blk in self.blocks[:-self.num_main_blocks]:
            if isinstance(blk, PatchMerge):
                feats.append(x.flatten(2))  # (B, n, 16 D/4), then (B, n, 4 D/2): (row, col, channel) order
            x = blk(x)
        return feats, x[:, :, 0, 0]  # (B, n, D)

    def forward_encoder(self, imgs, ids_keep):
        x = self.patch_embed(imgs)  # (B, N, 4, 4, D/4)
        x = x.gather(1, ids_keep[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))  # (B, N_vis, 4, 4, D/4)
        feats, x = self.forward_stem(x)  # masked units dropped before the first block
        pos = self.absolute_pos_embed.expand(x.shape[0], -1, -1)  # (B, N, D)
        x = x + pos.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[2]))  # (B, N_vis, D)
        for blk in self.blocks[-self.num_main_blocks:]:
            x = blk(x)
        return self.norm(torch.cat([*feats, x], dim=-1))  # (B, N_vis, 7D)

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (B, N_vis, Dd)
        B, N = ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(B, N - x.shape[1], -1)], dim=1)  # (B, N, Dd) in shuffled order
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2])) + self.decoder_pos_embed  # (B, N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))  # (B, N, p*p*C)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        B, N = imgs.shape[0], self.grid[0] * self.grid[1]
        noise = torch.rand(B, N, device=imgs.device) if noise is None else noise  # (B, N) in [0, 1)
        ids_keep, ids_restore, mask = unit_masking(noise, mask_ratio)
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_restore)  # (B, N, p*p*C)
        return forward_loss(imgs, pred, mask, self.patch), {'pred': pred, 'mask': mask}


def features(model, imgs):
    """The main stage's tokens averaged, all units seen, before the hifeat norm (not part of encoder.pth): what the
    fine-tuning model pools before its new fc_norm (ref models_hivit.py)."""
    x = model.forward_stem(model.patch_embed(imgs))[1] + model.absolute_pos_embed  # (B, N, D)
    for blk in model.blocks[-model.num_main_blocks:]:
        x = blk(x)
    return x.mean(1)  # (B, D)


def encoder_state_dict(model):
    """What the reference fine-tuning code (main_finetune.py, hivit_base) loads with strict=False: patch_embed.*,
    absolute_pos_embed, blocks.*. Its relative_position_bias_table per main block, fc_norm and head are new there
    (the tables zero-initialised); the decoder, mask token and the 7D hifeat norm have no counterpart."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('decoder', 'mask_token', 'norm.'))}

# --------------------------------------------------------------------------- loss (ref masked_autoencoder.py)


def forward_loss(imgs, pred, mask, p):
    """MSE on the removed units only, against per-unit normalised pixels (mean and unbiased variance over all p*p*C
    values; norm_pix_loss is hard-coded on in the reference). imgs (B, C, H, W); pred (B, N, p*p*C); mask (B, N)."""
    target = patchify(imgs, p)  # (B, N, p*p*C)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N) per-unit MSE
    return (loss * mask).sum() / mask.sum().clamp(min=1)

# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """original | masked input | prediction | prediction with the visible units pasted, for a fixed batch and a
    fixed mask. A norm-pix prediction has no colour of its own: it is shown with the true unit mean/std, and the
    picture says so."""
    was_training = model.training
    model.eval()
    p, (gh, gw) = model.patch, model.grid
    noise = torch.rand(imgs.shape[0], gh * gw, generator=torch.Generator().manual_seed(0)).to(imgs.device)
    _, out = model(imgs, args.mask_ratio, noise)
    pred, mask = out['pred'].float(), out['mask'][..., None]  # (B, N, p*p*C), (B, N, 1)
    target = patchify(imgs, p)  # (B, N, p*p*C)
    pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    note = ('* norm-pix target: each predicted unit is shown with the TRUE mean and std\n'
            '  of the hidden unit, which the model never saw (colour/brightness leak)')
    C = imgs.shape[1]
    mean, std = torch.tensor(args.mean, device=imgs.device), torch.tensor(args.std, device=imgs.device)
    to_img = lambda t: unpatchify(t, p, gh, gw, C) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # noqa: E731
    grey = torch.full_like(target, 0.5)  # shown for hidden units; un-normalise a pixel value 0.5 back
    grey = patchify((unpatchify(grey, p, gh, gw, C) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), p)
    save_grid(path, [('original', to_img(target)), ('masked input', to_img(torch.where(mask, grey, target))),
                     ('prediction *', to_img(pred)),
                     ('prediction * + visible', to_img(torch.where(mask, pred, target)))], note)
    model.train(was_training)

# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS)  # one line and exit on a value the run cannot use, before any work
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    patch, dim, depths, heads, dec_dim, dec_depth, dec_heads = MODELS[args.model]
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the unit size {patch} of --model {args.model}')
    N = (H // patch) * (W // patch)
    check_mask_ratio(args.mask_ratio, N - int(N * (1 - args.mask_ratio)), N, 'units')  # as unit_masking rounds
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(HiViTMAE((H, W), patch, dim, depths, heads, dec_dim, dec_depth, dec_heads, args.in_chans))
    d, out = setup_run(args)  # process group, seeds + rank, output folder

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the reference's effective batch
    lr = args.blr * args.global_batch / 256

    dataset = image_dataset(args, scale=(0.2, 1.0), interpolation='bicubic')  # ref: RRC(0.2, 1, bicubic) + flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    model = HiViTMAE((H, W), patch, dim, depths, heads, dec_dim, dec_depth, dec_heads, args.in_chans).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # ref: timm add_weight_decay without skip list: no decay for 1-D and '.bias' only (pos embed, mask token decayed)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas,
                                  fused=True)  # fused: skips a non-finite step on the device
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        n = model.grid[0] * model.grid[1]
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, {n} units of '
              f'{patch} px, {int(n * (1 - args.mask_ratio))} visible; {len(dataset)} images, '
              f'{steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g}')

    vis_imgs = torch.stack([dataset[(0, i % len(dataset))][0] for i in range(8)]).to(d.device)
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(vis_imgs, mean, std)  # a fixed batch for the pictures
    flops = report_flops(d, count_flops(model, vis_imgs[:1], args.mask_ratio), args.global_batch)  # one image

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
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref passes epoch + 1: not kept)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(imgs, args.mask_ratio)
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
