"""MixMIM / MixMAE: Mixed and Masked Image Modeling (Liu et al., arXiv 2205.13137; CVPR 2023 as MixMAE).

Reference: github.com/Sense-X/MixMIM (models_mixmim.py, main_pretrain.py, engine_pretrain.py, models_mixmim_ft.py).
No [MASK] token enters the encoder: half of each image's 32x32 units are replaced by the same units of its partner
image (i <-> B-1-i, one mask for the batch). A hierarchical Swin-like encoder (no shifted windows, windows
[14, 14, 14, 7]) whose attention never crosses from one image to the other encodes the mixed input; the decoder
"unmixes" it into two sequences and each image is reconstructed, every unit from the branch in which it was hidden.

    python mixmim.py --demo                                       # tiny model, synthetic images: 42 s of CPU time
    torchrun --nproc_per_node=8 mixmim.py --data imagenet/        # Swin-B/W14, the official 600-epoch recipe
    torchrun --nproc_per_node=8 mixmim.py --data imagenet/ --epochs 300   # mmpretrain's shorter schedule

Deviations from the reference:
- The paper's per-stage "mix embeddings" are absent, as in the reference code that produced the reported numbers
  (Sense-X/MixMIM issue #7).
- The isolating attention bias is the dtype's most negative finite value, written over the relative-position bias
  (reference: subtracts 1e30, or 65500 when the mask is fp16); both give exactly zero weight across images. It goes
  through SDPA as an additive mask.
- The effective batch is `--global_batch` (2048, exp/base_600ep); `accum_iter` is derived from it. bf16 autocast by
  default on CUDA (reference: fp16 + GradScaler, which `--amp fp16` gives). A non-finite step is skipped and counted
  (reference: sys.exit). An epoch is truncated to whole accumulation cycles. AdamW is torch's fused kernel.
- `range_mask_ratio` (reference default 0: off) is not offered.
- Non-square inputs work (reference: square only); sizes whose stages do not split into whole windows stop with
  a message. `--in_chans 1` predicts 32*32*1 values per unit (reference: always 3).
- `checkpoint-<epoch>.pth` counts finished epochs; the reference names them by the 0-based epoch index.
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
                    check_args, check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, make_loader,
                    normalize, optimizer_step, pair, param_groups, parse_args, patchify, report_flops, resume,
                    save_grid, save_loss_curve, save_training_state, setup_run, sincos_2d, unpatchify, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny model on synthetic images: 42 s of CPU time
    output_dir: str = 'output_mixmim'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'base'  # tiny | base | large | huge (MODELS below; paper Swin-B/W14, L/W14, H)
    input_size: Optional[tuple[int, ...]] = None  # H [W], multiples of 32 (the mask unit); None: the preset's (ref 224)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    mask_ratio: float = 0.5  # paper Sec. 4.1; ref exp/base_600ep/pretrain.sh --mask_ratio 0.5
    norm_pix_loss: bool = True  # ref pretrain.sh --norm_pix_loss
    batch_size: int = 128  # per GPU; ref pretrain.sh (16 GPUs x 128)
    global_batch: int = 2048  # ref pretrain.sh; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 600  # ref exp/base_600ep (paper headline 85.1); mmpretrain: 300
    warmup_epochs: int = 40  # ref pretrain.sh
    blr: float = 1.5e-4  # ref pretrain.sh; lr = blr x global_batch / 256 = 1.2e-3
    min_lr: float = 0.0  # ref main_pretrain.py
    weight_decay: float = 0.05  # ref pretrain.sh
    betas: tuple = (0.9, 0.95)  # ref main_pretrain.py
    clip_grad: float = 0.0  # 0 = none; ref: clip_grad=None in pretraining
    mean: tuple = IMAGENET_MEAN  # ref Normalize
    std: tuple = IMAGENET_STD  # ref Normalize
    num_workers: int = 8  # ref main_pretrain.py
    seed: int = 0  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference MixMIM release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # checkpoint-<epoch>.pth every 20 epochs and at the last (ref main_pretrain.py)
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (embed dim, depths, heads, windows, decoder D, decoder depth, decoder heads)  ref models_mixmim.py
MODELS = {
    'tiny': (32, (1, 1, 2, 1), (2, 4, 8, 16), (4, 4, 4, 2), 64, 2, 4),  # ours; at 64 px the windows split as B's
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32), (14, 14, 14, 7), 512, 8, 16),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48), (14, 14, 14, 7), 512, 8, 16),
    'huge': (352, (2, 2, 18, 2), (11, 22, 44, 88), (14, 14, 14, 7), 512, 8, 16),
}
INPUT_SIZE = {'tiny': 64, 'base': 224, 'large': 224, 'huge': 224}  # px when --input_size is not given
PATCH, STRIDE = 4, 32  # patch embedding 4 px; three 2x merges: the encoder's output stride (= mask unit) is 32 px
DEMO = dict(data='synthetic:1024', model='tiny', input_size=(64,), batch_size=32, global_batch=32, epochs=6,
            warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_mixmim_demo', log_every=8, keep_every=3,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 3.1)


def batch_mask(gh, gw, mask_ratio, device, noise=None):
    """ONE mask for the whole batch on the stride-32 grid: (1, gh*gw) bool, True = the unit comes from the partner
    image (hidden in this image's own sample): the int(n x ratio) units with the smallest noise (ref: argsort)."""
    n = gh * gw
    noise = torch.rand(1, n, device=device) if noise is None else noise  # (1, n)
    ids = noise.argsort(dim=1)[:, :int(n * mask_ratio)]  # (1, n_mix): ascending, as the reference
    return torch.zeros(1, n, dtype=torch.bool, device=device).scatter_(1, ids, True)  # (1, n)


def upsample_mask(mask, gh, gw, s):
    """Nearest upsampling of the (1, gh*gw) unit mask to a stage's (1, gh*s*gw*s) token grid (s = 8, 4, 2, 1)."""
    m = mask.view(1, gh, gw).repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (1, gh*s, gw*s)
    return m.reshape(1, -1)


def window_partition(x, h, w, ws):
    """(B, h*w, C) -> (B*nW, ws*ws, C), windows in row-major order (timm's window_partition)."""
    B, _, C = x.shape
    x = x.view(B, h // ws, ws, w // ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/ws, w/ws, ws, ws, C)
    return x.reshape(-1, ws * ws, C)


def window_reverse(x, h, w, ws):
    """(B*nW, ws*ws, C) -> (B, h*w, C), inverse of `window_partition`."""
    C = x.shape[-1]
    x = x.view(-1, h // ws, w // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)  # (B, h/ws, ws, w/ws, ws, C)
    return x.reshape(-1, h * w, C)


# --------------------------------------------------------------------------- model


class PatchEmbedNorm(PatchEmbed):
    """timm's PatchEmbed with norm_layer: 4x4 conv then LayerNorm (eps 1e-5); mixing happens after the norm."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        return self.norm(super().forward(x))  # (B, L, D)


class WindowAttention(nn.Module):
    """Swin window attention with a relative-position-bias table; `same` (nW, N, N) bool marks token pairs of the same
    image: the others get the most negative finite value, written over the bias, so their weight is exactly 0."""

    def __init__(self, dim, ws, heads):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # timm trunc_normal_: a, b = -2, 2
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 2) in [0, 2ws-2]
        self.register_buffer('relative_position_index', rel[..., 0] * (2 * ws - 1) + rel[..., 1])  # (N, N)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, same):
        Bw, N, D = x.shape  # Bw = B * nW
        nW = same.shape[0]
        q, k, v = self.qkv(x).reshape(Bw, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (Bw, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        bias = bias.view(N, N, -1).permute(2, 0, 1).to(q.dtype)  # (heads, N, N): the position bias first,
        bias = bias.masked_fill(~same[:, None], torch.finfo(q.dtype).min)  # (nW, heads, N, N) then isolation
        # windows of one image are consecutive: view (B*nW, heads) as (B, nW*heads) so the bias broadcasts over B
        q, k, v = (t.reshape(Bw // nW, nW * self.heads, N, -1) for t in (q, k, v))  # (B, nW*h, N, d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.reshape(1, nW * self.heads, N, N))
        return self.proj(x.view(Bw, self.heads, N, -1).transpose(1, 2).reshape(Bw, N, D))  # (Bw, N, D)


class MixMIMBlock(nn.Module):
    """Pre-norm block on non-overlapping windows (no shift); LN eps 1e-5 as the reference's nn.LayerNorm."""

    def __init__(self, dim, heads, ws):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, ws, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x, same, h, w):
        ws = self.attn.ws
        a = self.attn(window_partition(self.norm1(x), h, w, ws), same)  # (B*nW, ws*ws, D)
        x = x + window_reverse(a, h, w, ws)  # (B, h*w, D)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """timm's (old) PatchMerging: concat of the 2x2 neighbours (00, 10, 01, 11) -> LN(4C) -> Linear(4C, 2C)."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x, h, w):
        x = x.view(x.shape[0], h, w, -1)  # (B, h, w, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.flatten(1, 2)))  # (B, h*w/4, 2C)


class Stage(nn.Module):
    def __init__(self, dim, depth, heads, ws, merge):
        super().__init__()
        self.blocks = nn.ModuleList(MixMIMBlock(dim, heads, ws) for _ in range(depth))
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x, group, h, w):
        """group: (1, h*w) bool, which image each token comes from (the stage's upsampled mask)."""
        ws = self.blocks[0].attn.ws
        g = window_partition(group[..., None], h, w, ws)[..., 0]  # (nW, N): the mask is the batch's
        same = g[:, :, None] == g[:, None, :]  # (nW, N, N)
        for blk in self.blocks:
            x = blk(x, same, h, w)
        return x if self.downsample is None else self.downsample(x, h, w)


def stage_windows(img_size, windows):
    """Each stage's window: the preset's, or the whole grid when that is smaller (reference MixMIMBlock)."""
    H, W = pair(img_size)
    grids = [(H // PATCH >> i, W // PATCH >> i) for i in range(4)]
    return [min(ws, gh, gw) for ws, (gh, gw) in zip(windows, grids)], grids


class MixMIM(nn.Module):
    """models_mixmim.MixMIM with the reference's parameter names, so its checkpoints load as they are."""

    def __init__(self, img_size, embed_dim, depths, heads, windows, dec_dim, dec_depth, dec_heads, in_chans=3,
                 norm_pix_loss=True):
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        wins, self.grids = stage_windows(img_size, windows)
        self.patch_embed = PatchEmbedNorm(img_size, PATCH, in_chans, embed_dim)
        gh, gw = self.grids[0]
        self.absolute_pos_embed = nn.Parameter(sincos_2d(embed_dim, gh, gw)[None], requires_grad=False)  # (1, L, D)
        self.layers = nn.ModuleList(Stage(embed_dim * 2 ** i, depths[i], heads[i], wins[i], i < 3) for i in range(4))
        self.num_features = embed_dim * 8
        self.norm = nn.LayerNorm(self.num_features)
        # decoder: a ViT on the stride-32 grid over 2B single-image sequences
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        oh, ow = self.grids[3]
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, oh, ow)[None], requires_grad=False)  # (1, n, Dd)
        self.decoder_embed = nn.Linear(self.num_features, dec_dim)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads, eps=1e-5) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, STRIDE * STRIDE * in_chans)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():  # the patch-embed conv keeps PyTorch's init, as in the reference
            if isinstance(m, nn.Linear):  # fused qkv initialised as one (3D, D) matrix, as the reference does
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, mask):
        """imgs (B, C, H, W), mask (1, n) bool -> (B, n, 8D): sample i is image i where mask is False, else B-1-i."""
        x = self.patch_embed(imgs)  # (B, L, D) after the patch-embed LN
        oh, ow = self.grids[3]
        groups = [upsample_mask(mask, oh, ow, 8 >> i) for i in range(4)]  # (1, L_s) per stage
        x = torch.where(groups[0][..., None], x.flip(0), x)  # (B, L, D): mixed tokens (paper Eq. 1)
        x = x + self.absolute_pos_embed  # positions after mixing: each token keeps its place
        for layer, g, (h, w) in zip(self.layers, groups, self.grids):
            x = layer(x, g, h, w)  # tokens attend only to tokens of their own image, in every stage
        return self.norm(x)  # (B, n, 8D)

    def forward_decoder(self, z, mask):
        """z (B, n, 8D) -> (2B, n, 32*32*C): rows [0, B) keep sample i's own-image tokens (mask tokens where image i
        was hidden), rows [B, 2B) keep its partner tokens (mask tokens elsewhere)."""
        y = self.decoder_embed(z)  # (B, n, Dd)
        m = mask[..., None]  # (1, n, 1); the fp32 token is not cast: under autocast its gradient sums in fp32 (ref)
        y = torch.cat([torch.where(m, self.mask_token, y), torch.where(m, y, self.mask_token)])  # (2B, n, Dd)
        y = y + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        return self.decoder_pred(self.decoder_norm(y))  # (2B, n, 32*32*C)

    def forward(self, imgs, mask_ratio=0.5, mask=None):
        """mask: (1, n) bool to force one (tests, pictures); else a fresh one is drawn for this batch."""
        if mask is None:
            mask = batch_mask(*self.grids[3], mask_ratio, imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask)  # (2B, n, 32*32*C)
        loss, rec = forward_loss(imgs, pred, mask, self.norm_pix_loss)
        return loss, {'pred': rec, 'mask': mask.expand(imgs.shape[0], -1)}


def features(model, imgs):
    """The final stage's tokens after the last norm, averaged; nothing mixed: what the fine-tuning model pools (ref
    models_mixmim_ft.py)."""
    n = model.grids[3][0] * model.grids[3][1]
    return model.forward_encoder(imgs, torch.zeros(1, n, dtype=torch.bool, device=imgs.device)).mean(1)  # (B, 8D)


def encoder_state_dict(model):
    """The encoder in the layout of the reference's fine-tuning model (models_mixmim_ft.py; head left out)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}


# --------------------------------------------------------------------------- loss (paper Sec. 3.2, ref forward_loss)


def forward_loss(imgs, pred, mask, norm_pix_loss):
    """Dual reconstruction. pred (2B, n, P) from `forward_decoder`; mask (1, n). Image i's unit is taken from
    pred[i] where it was hidden in its own sample (mask True), else from its partner's second branch pred[B + B-1-i],
    where it was hidden too: every (image, unit) is predicted once, from the branch that did not see it. Plain mean
    over all elements. Returns (loss, the unmixed prediction (B, n, P))."""
    B = imgs.shape[0]
    rec = torch.where(mask[..., None], pred[:B], pred[B:].flip(0)).float()  # (B, n, P)
    target = patchify(imgs, STRIDE)  # (B, n, 32*32*C)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    return ((rec - target) ** 2).mean(), rec


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, imgs, args, path):
    """image A | image B (its partner) | mixed input | reconstruction of A | of B, for a fixed batch and mask; A and B
    are dimmed where the mixed input hides them. A norm-pix reconstruction is shown with the true patch mean/std,
    and the picture says so."""
    was_training = model.training
    model.eval()
    (gh, gw), B, C = model.grids[3], imgs.shape[0], imgs.shape[1]
    mask = batch_mask(gh, gw, args.mask_ratio, imgs.device, torch.rand(1, gh * gw, generator=torch.Generator()
                                                                        .manual_seed(0)).to(imgs.device))
    _, out = model(imgs, args.mask_ratio, mask)
    target, rec = patchify(imgs, STRIDE), out['pred']  # (B, n, P) each
    note = ''
    if args.norm_pix_loss:
        rec = rec * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        note = ('* norm-pix target: each predicted unit is shown with the TRUE mean and std of that 32x32 unit,\n'
                '  which the model never saw there (colour/brightness leak)')
    mixed = torch.where(mask[..., None], target.flip(0), target)  # (B, n, P): what the encoder sees, in pixels
    mean, std = torch.tensor(args.mean, device=imgs.device), torch.tensor(args.std, device=imgs.device)
    to_img = lambda t: unpatchify(t, STRIDE, gh, gw, C) * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)  # noqa: E731
    up = lambda m: m.view(1, 1, gh, gw).repeat_interleave(STRIDE, 2).repeat_interleave(STRIDE, 3)  # noqa: E731
    dim = lambda t, m: torch.where(up(m), 0.35 * to_img(t), to_img(t))  # noqa: E731  (hidden units dimmed)
    save_grid(path, [('image A\n(dim: hidden)', dim(target, mask)),
                     (f'image B (A of row\n{B}-1-i; dim: hidden)', dim(target.flip(0), ~mask)),
                     ('mixed input', to_img(mixed)), ('reconstruction\nof A *', to_img(rec)),
                     ('reconstruction\nof B *', to_img(rec.flip(0)))], note)
    model.train(was_training)


# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS)  # one line and exit on a value the run cannot use, before any work
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    embed_dim, depths, heads, windows, dec_dim, dec_depth, dec_heads = MODELS[args.model]
    H, W = pair(args.input_size)
    if H % STRIDE or W % STRIDE:
        raise SystemExit(f'--input_size {H} {W} is not divisible by {STRIDE} (the encoder stride and mask unit)')
    wins, grids = stage_windows((H, W), windows)
    for i, (ws, (gh, gw)) in enumerate(zip(wins, grids)):
        if gh % ws or gw % ws:
            raise SystemExit(f'--input_size {H} {W}: stage {i + 1} grid {gh}x{gw} does not split into windows of '
                             f'{ws} of --model {args.model}')
    n = grids[3][0] * grids[3][1]
    check_mask_ratio(args.mask_ratio, int(n * args.mask_ratio), n, 'units')  # as batch_mask rounds
    if args.batch_size == 1:  # image i's partner is image B-1-i of the same batch: alone, it would mix with itself
        raise SystemExit('--batch_size 1: MixMIM mixes each image with another of its per-GPU batch; give 2 or more')
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:
        return evaluate.only(MixMIM((H, W), embed_dim, depths, heads, windows, dec_dim, dec_depth, dec_heads,
                                    args.in_chans))
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

    model = MixMIM((H, W), embed_dim, depths, heads, windows, dec_dim, dec_depth, dec_heads, args.in_chans,
                   args.norm_pix_loss).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # no skip list, as the reference calls add_weight_decay: the mask token and bias tables are decayed
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas,
                                  fused=True)  # fused: skips a non-finite step on the device
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:  # constant index buffers: no per-step broadcast
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, windows {wins}, '
              f'{n} mask units ({int(n * args.mask_ratio)} from the partner); {len(dataset)} images, '
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
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref lr_sched.py)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(imgs, args.mask_ratio)  # a fresh mask for each micro-batch and process
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
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, models_mixmim_ft.py layout
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
