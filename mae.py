"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., arXiv 2111.06377).

Reference: github.com/facebookresearch/mae (models_mae.py, main_pretrain.py, engine_pretrain.py, util/).
A ViT encoder sees only the visible 25% of the patches; a light decoder gets the encoded tokens plus mask tokens
and regresses the (per-patch normalised) pixels of the removed patches.

    python mae.py --demo                                          # tiny model, synthetic images: 77 s of CPU time
    torchrun --nproc_per_node=8 mae.py --data imagenet/           # ViT-B/16, the paper's recipe
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 mae.py --data imagenet/

Deviations from the reference:
- The effective batch is `--global_batch` (4096, paper A.1); `accum_iter` is derived from it, not given by hand.
- bf16 autocast by default on CUDA (reference: fp16 + GradScaler, which `--amp fp16` gives).
- A non-finite loss/gradient skips the optimizer step and is counted (reference: sys.exit); `--max_bad_steps` in a
  row stop the run.
- An epoch is truncated to a whole number of accumulation cycles (reference: the trailing micro-batches' gradients
  leak into the next epoch's first step).
- Defaults are ViT-B/16 for 800 epochs (reference argparse: ViT-L, 400 epochs, blr 1e-3; the paper's recipe is
  given on the command line in PRETRAIN.md); norm-pix loss on by default.
- AdamW is torch's fused kernel (same update up to rounding), so a non-finite step is skipped without a host sync.
- `checkpoint-<epoch>.pth` counts finished epochs (20, 40, ..., 800); the reference names them by the 0-based epoch
  index (0, 20, ..., 799).
- No masked patch at all (`--mask_ratio 0`) gives loss 0 instead of 0/0 = NaN.
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

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, PatchEmbed, accumulation, amp_setup,
                    check_args, check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, make_loader,
                    normalize, optimizer_step, pair, param_groups, parse_args, patchify, report_flops, resume,
                    save_grid, save_loss_curve, save_training_state, setup_run, sincos_2d, unpatchify, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny model on synthetic images: 77 s of CPU time
    output_dir: str = 'output_mae'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'base'  # tiny | base | large | huge (MODELS below; paper headline ViT-B/L/H)
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch; None: the preset's (ref 224, tiny 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_ratio: float = 0.75  # paper Sec. 4, Fig. 5
    norm_pix_loss: bool = True  # ref PRETRAIN.md --norm_pix_loss; paper Tab. 1c
    batch_size: int = 64  # per GPU; ref PRETRAIN.md
    global_batch: int = 4096  # paper A.1; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 800  # paper Tab. 1 / PRETRAIN.md (ViT-L 800 ep); released checkpoints 1600
    warmup_epochs: int = 40  # paper A.1
    blr: float = 1.5e-4  # paper A.1; lr = blr x global_batch / 256
    min_lr: float = 0.0  # ref main_pretrain.py
    weight_decay: float = 0.05  # paper A.1
    betas: tuple = (0.9, 0.95)  # paper A.1
    clip_grad: float = 0.0  # 0 = none; ref: no clipping in pretraining
    mean: tuple = IMAGENET_MEAN  # ref Normalize
    std: tuple = IMAGENET_STD  # ref Normalize
    num_workers: int = 10  # ref main_pretrain.py
    seed: int = 0  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference MAE release (full/visualize)
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # ref: checkpoint-<epoch>.pth every 20 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)  ref models_mae.py
MODELS = {
    'tiny': (8, 128, 4, 4, 96, 2, 4),  # ours, for the demo and tests
    'base': (16, 768, 12, 12, 512, 8, 16),
    'large': (16, 1024, 24, 16, 512, 8, 16),
    'huge': (14, 1280, 32, 16, 512, 8, 16),
}
INPUT_SIZE = {'tiny': 64, 'base': 224, 'large': 224, 'huge': 224}  # px when --input_size is not given
DEMO = dict(data='synthetic:2048', model='tiny', input_size=(64,), batch_size=64, global_batch=64, epochs=6,
            warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_mae_demo', log_every=8, keep_every=3,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 3)


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by sorting uniform noise: the int(N(1-ratio)) patches with the smallest noise stay.

    x: (B, N, D) -> x_vis (B, N_vis, D), mask (B, N) bool with True = removed, ids_restore (B, N) that undoes the
    shuffle (x_shuffled.gather(1, ids_restore) is back in patch order)."""
    B, N, D = x.shape
    n_keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=x.device) if noise is None else noise  # (B, N) in [0, 1)
    ids_shuffle = noise.argsort(dim=1)  # (B, N) ascending: small noise = keep
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :n_keep]  # (B, N_vis)
    x_vis = x.gather(1, ids_keep[..., None].expand(-1, -1, D))  # (B, N_vis, D)
    mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
    mask[:, :n_keep] = False
    mask = mask.gather(1, ids_restore)  # (B, N) in patch order
    return x_vis, mask, ids_restore


# --------------------------------------------------------------------------- model


class MAE(nn.Module):
    """MaskedAutoencoderViT with the reference's parameter names, so its checkpoints load as they are."""

    def __init__(self, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, in_chans=3,
                 norm_pix_loss=True):
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        # encoder: a ViT over the visible patches, fixed 2-D sin-cos positions with a zero cls slot
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        gh, gw = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, gh, gw, cls_token=True)[None], requires_grad=False)  # (1, 1+N, D)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        # decoder: narrower ViT over all positions; mask tokens live in decoder space
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, gh, gw, cls_token=True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        # patch embedding as a Linear on the flattened (D, C*p*p) weight; its conv bias keeps PyTorch's init
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # fused qkv initialised as one (3D, D) matrix, as the reference does
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, N, D): positions added before masking
        x_vis, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, N_vis, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x_vis], dim=1)  # (B, 1+N_vis, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)  # (B, 1+N_vis, Dd), cls included
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)  # (B, N_mask, Dd)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, Dd) in shuffled order
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # (B, N, Dd) in patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C), cls dropped after the head

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (B, N, p*p*C)
        loss = forward_loss(imgs, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss)
        return loss, {'pred': pred, 'mask': mask}


def features(model, imgs):
    """The cls token after the last norm, all patches seen: what MAE's linear probe reads (ref main_linprobe.py)."""
    B, N = imgs.shape[0], model.patch_embed.num_patches
    return model.forward_encoder(imgs, 0.0, torch.arange(N, device=imgs.device).expand(B, N) / N)[0][:, 0]  # (B, D)


def encoder_state_dict(model):
    """The encoder in timm's VisionTransformer layout (what the MAE fine-tuning code and timm's ViT load)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}


# --------------------------------------------------------------------------- loss (paper Sec. 3, ref forward_loss)


def forward_loss(imgs, pred, mask, p, norm_pix_loss):
    """MSE on the removed patches only. With norm_pix_loss each target patch is normalised by its own mean and
    unbiased variance over all p*p*C values. imgs (B, C, H, W) normalised; pred (B, N, p*p*C); mask (B, N)."""
    target = patchify(imgs, p)  # (B, N, p*p*C)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N) per-patch MSE
    return (loss * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """original | masked input | prediction | prediction with the visible patches pasted, for a fixed batch and
    a fixed mask. A norm-pix prediction has no colour of its own: it is shown with the true patch mean/std,
    and the picture says so."""
    was_training = model.training
    model.eval()
    p, (gh, gw) = model.patch_embed.patch_size, model.patch_embed.grid_size
    noise = torch.rand(imgs.shape[0], gh * gw, generator=torch.Generator().manual_seed(0)).to(imgs.device)
    _, out = model(imgs, args.mask_ratio, noise)
    pred, mask = out['pred'].float(), out['mask'][..., None]  # (B, N, p*p*C), (B, N, 1)
    target = patchify(imgs, p)  # (B, N, p*p*C)
    title, note = 'prediction', ''
    if args.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        title, note = 'prediction *', ('* norm-pix target: each predicted patch is shown with the TRUE mean and std\n'
                                       '  of the hidden patch, which the model never saw (colour/brightness leak)')
    C = imgs.shape[1]
    mean, std = torch.tensor(args.mean, device=imgs.device), torch.tensor(args.std, device=imgs.device)
    to_img = lambda t: unpatchify(t, p, gh, gw, C) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # noqa: E731
    grey = torch.full_like(target, 0.5)  # shown for hidden patches; un-normalise a pixel value 0.5 back
    grey = patchify((unpatchify(grey, p, gh, gw, C) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), p)
    save_grid(path, [('original', to_img(target)), ('masked input', to_img(torch.where(mask, grey, target))),
                     (title, to_img(pred)), (title + ' + visible', to_img(torch.where(mask, pred, target)))], note)
    model.train(was_training)


# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS)  # one line and exit on a value the run cannot use, before any work
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    patch, dim, depth, heads, dec_dim, dec_depth, dec_heads = MODELS[args.model]
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the patch size {patch} of --model {args.model}')
    N = (H // patch) * (W // patch)
    check_mask_ratio(args.mask_ratio, N - int(N * (1 - args.mask_ratio)), N, 'patches')  # as random_masking rounds
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(MAE((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, args.in_chans))
    d, out = setup_run(args)  # process group, seeds + rank, output folder

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the paper's global batch
    lr = args.blr * args.global_batch / 256

    dataset = image_dataset(args, scale=(0.2, 1.0), interpolation='bicubic')  # ref: RRC(0.2, 1, bicubic) + flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    model = MAE((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, args.in_chans,
                args.norm_pix_loss).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas,
                                  fused=True)  # fused: skips a non-finite step on the device
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, '
              f'{model.patch_embed.num_patches} patches; {len(dataset)} images, {steps_per_epoch} steps/epoch')
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
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref lr_sched.py)
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
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, timm's ViT layout
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
