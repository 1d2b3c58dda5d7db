"""VideoMAE: Masked Autoencoders are Data-Efficient Learners for Self-Supervised Video Pre-Training
(Tong et al., arXiv 2203.12602).

Reference: github.com/MCG-NJU/VideoMAE (modeling_pretrain.py, masking_generator.py, engine_for_pretraining.py,
run_mae_pretraining.py, kinetics.py, transforms.py, scripts/); frame folders as in OpenGVLab/VideoMAEv2
dataset/pretrain_datasets.py. MAE for video: 2x16x16 tubelets, 90% of them hidden by tube masking (the same
spatial mask in every temporal slice), an encoder on the visible 10% and a 4-block decoder that regresses the
per-tubelet, per-channel normalised pixels of the hidden tubelets.

    python videomae.py --demo                                         # tiny model, synthetic videos: 68 s of CPU time
    torchrun --nproc_per_node=8 videomae.py --data k400_frames/          # ViT-B, 16x4 clips, the K400 recipe
    torchrun --nproc_per_node=8 videomae.py --data ssv2_frames/ --sampling_rate 2     # SSv2 (16x2 clips)

Data: every folder holding frame images is one video (found recursively, frames in name order), every .gif is one
video. All frames at the native frame rate (--sampling_rate counts them): `mkdir -p k400_frames/<class>/v &&
ffmpeg -i v.mp4 -q:v 2 k400_frames/<class>/v/img_%05d.jpg`. `encoder.pth` holds the encoder without its 'encoder.'
prefix under 'model', as the reference's run_class_finetuning.py loads it (strict=False).

Deviations from the reference:
- The effective batch is `--global_batch` (2048 = 64 GPUs x 32, scripts/); `accum_iter` is derived from it.
- bf16 autocast by default on CUDA (reference: fp16 + GradScaler, which `--amp fp16` gives); fused AdamW.
- A non-finite loss/gradient skips the optimizer step and is counted (reference: sys.exit); `--max_bad_steps` in a
  row stop the run. No masked tubelet at all (`--mask_ratio 0`) gives loss 0 instead of NaN.
- Tube masks are drawn per step on the device from the torch RNG (reference: numpy in the loader workers, per
  sample); the same distribution. Visible/masked tokens are gathered through a stable sort of the mask instead of
  boolean indexing: the same tokens in the same order, without a host sync, with static shapes for --compile.
- Schedule: linear warmup over fractional epochs, then cosine (reference: per-iteration arrays from
  np.linspace(0, lr, warmup_iters)). `--warmup_lr` defaults to 0: the reference scales its --warmup_lr 1e-6 by
  batch/256 but never passes it to utils.cosine_scheduler, so its warmup starts at 0.
- 800 epochs, `checkpoint-<finished epochs>.pth` every 20 (scripts pass --epochs 801 and name checkpoints by the
  0-based epoch). An epoch is truncated to whole accumulation cycles.
- The target is de-normalised with --mean/--std (reference: hard-coded ImageNet statistics, the same by default).
- Data: frame folders and GIFs read with PIL (reference: mp4 files listed in a csv, decoded by decord). The clip
  start and the crop come from random.Random(seed, epoch, index) (reference: the workers' global RNGs), so a
  resumed run sees the same clips. An unreadable video is replaced by the next one and counted (reference: a
  random one). Crop + resize is one `Image.resize(box=...)` per frame after an `Image.draft` JPEG decode; a crop
  side snapped past the frame edge (frames within 3 px under the output size) is clamped (reference: black pad).
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from common import (IMAGENET_MEAN, IMAGENET_STD, IMAGE_EXTENSIONS, Block, Evaluation, Logger, PatchEmbed, accumulation,
                    amp_setup, check_args, check_mask_ratio, check_readable, cosine_lr, count_flops, data_root, finish,
                    make_loader, normalize, optimizer_step, pair, param_groups, parse_args, patchify, read_or_next,
                    report_flops, resume, save_grid, save_loss_curve, save_training_state, scan, setup_run, to_mode,
                    unpatchify, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # folder of videos (frame folders, .gif; its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny model on synthetic videos: 68 s of CPU time
    output_dir: str = 'output_videomae'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    model: str = 'base'  # tiny | small | base | large | huge (MODELS below); ref scripts: ViT-B
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch; None: the preset's (ref 224, tiny 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    num_frames: int = 16  # frames per clip; ref scripts --num_frames 16
    sampling_rate: int = 4  # temporal stride; ref K400 scripts 4, SSv2 scripts 2
    tubelet: int = 2  # frames per tubelet; ref tubelet_size 2
    mask_ratio: float = 0.9  # tube masking; ref scripts --mask_ratio 0.9 (argparse default 0.75)
    norm_pix_loss: bool = True  # ref --normlize_target True
    batch_size: int = 32  # per GPU; ref scripts
    global_batch: int = 2048  # ref scripts: 32 x 64 GPUs; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 800  # ref scripts: 800-epoch runs (--epochs 801); released K400 ViT-B also 1600
    warmup_epochs: int = 40  # ref scripts
    blr: float = 1.5e-4  # ref --lr; lr = blr x global_batch / 256
    warmup_lr: float = 0.0  # x global_batch / 256; ref's --warmup_lr 1e-6 never reaches its scheduler (starts at 0)
    min_lr: float = 1e-5  # ref --min_lr; x global_batch / 256
    weight_decay: float = 0.05  # ref --weight_decay (constant: weight_decay_end = weight_decay)
    betas: tuple = (0.9, 0.95)  # ref scripts --opt_betas
    clip_grad: float = 0.0  # 0 = none; ref --clip_grad None
    mean: tuple = IMAGENET_MEAN  # ref GroupNormalize
    std: tuple = IMAGENET_STD  # ref GroupNormalize
    num_workers: int = 10  # ref run_mae_pretraining.py
    seed: int = 0  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference pretraining checkpoint
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # ref scripts --save_ckpt_freq 20: checkpoint-<epoch>.pth, and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled videos (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val videos per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)  ref modeling_pretrain.py, --decoder_depth 4
MODELS = {
    'tiny': (8, 128, 4, 4, 64, 2, 4),  # ours, for the demo and tests
    'small': (16, 384, 12, 6, 192, 4, 3),
    'base': (16, 768, 12, 12, 384, 4, 6),
    'large': (16, 1024, 24, 16, 512, 4, 8),
    'huge': (16, 1280, 32, 16, 640, 4, 8),
}
INPUT_SIZE = {'tiny': 64, 'small': 224, 'base': 224, 'large': 224, 'huge': 224}  # px when --input_size is not given
DEMO = dict(data='synthetic:512', model='tiny', input_size=(64,), num_frames=8, batch_size=16, global_batch=16,
            epochs=5, warmup_epochs=1, blr=5e-3, num_workers=2, output_dir='output_videomae_demo', log_every=8,
            keep_every=5, eval_data='synthetic:500')

# --------------------------------------------------------------------------- masking (ref masking_generator.py)


def tube_masking(B, T_tokens, hw, mask_ratio, device, noise=None):
    """Tube masking (ref masking_generator.TubeMaskingGenerator): per sample, int(mask_ratio * hw) of the hw spatial
    positions are hidden, the same ones in each of the T_tokens temporal slices, so a hidden patch cannot be copied
    from its neighbour in time. noise (B, hw) in [0, 1): the positions with the smallest noise are hidden.
    Returns mask (B, T_tokens*hw) bool, True = masked, in the Conv3d's t-major token order (t, h, w)."""
    n_mask = int(mask_ratio * hw)
    noise = torch.rand(B, hw, device=device) if noise is None else noise  # (B, hw)
    ids = noise.argsort(dim=1)[:, :n_mask]  # (B, n_mask) hidden spatial positions
    per_slice = torch.zeros(B, hw, dtype=torch.bool, device=device).scatter_(1, ids, True)  # (B, hw)
    return per_slice.repeat(1, T_tokens)  # (B, N): token t*hw + s is hidden iff s is


# --------------------------------------------------------------------------- model


def sinusoid_table(n, dim):
    """ref get_sinusoid_encoding_table: P[pos, j] = pos / 10000^(2*(j//2)/dim), sine on even j, cosine on odd j
    (interleaved, not MAE's [sin | cos] halves), over the flattened (t, h, w) token index. (n, dim)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / 10000 ** (2 * (j // 2) / dim)  # (n, dim), in float64 as the reference's numpy
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()  # (n, dim)


class VideoMAE(nn.Module):
    """PretrainVisionTransformer with the reference's parameter names (encoder.*, encoder_to_decoder, mask_token,
    decoder.*), so its checkpoints load as they are. The sin-cos tables are buffers outside the state dict, as in
    the reference (plain tensor attributes there)."""

    def __init__(self, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, num_frames=16, tubelet=2,
                 in_chans=3, norm_pix_loss=True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.tubelet, self.norm_pix_loss = tubelet, norm_pix_loss
        self.encoder, self.decoder = nn.Module(), nn.Module()
        self.encoder.patch_embed = PatchEmbed(img_size, patch, in_chans, dim, tubelet=tubelet)  # Conv3d (t, p, p)
        self.t_tokens, self.hw = num_frames // tubelet, self.encoder.patch_embed.num_patches
        N = self.t_tokens * self.hw
        self.encoder.register_buffer('pos_embed', sinusoid_table(N, dim)[None], persistent=False)  # (1, N, D)
        # ref qkv_bias=True: Linear qkv without bias plus learned q_bias, v_bias (k bias 0); LayerNorm eps 1e-6
        self.encoder.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=False, qv_bias=True) for _ in range(depth))
        self.encoder.norm = nn.LayerNorm(dim, eps=1e-6)
        self.encoder_to_decoder = nn.Linear(dim, dec_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer('pos_embed', sinusoid_table(N, dec_dim)[None], persistent=False)  # (1, N, Dd)
        self.decoder.blocks = nn.ModuleList(Block(dec_dim, dec_heads, qkv_bias=False, qv_bias=True)
                                            for _ in range(dec_depth))
        self.decoder.norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder.head = nn.Linear(dec_dim, tubelet * patch * patch * in_chans)
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)  # (1, C, 1, 1, 1)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # ref: encoder and decoder each apply _init_weights (Linear xavier_uniform with zero bias, LayerNorm 1/0);
        # the Conv3d and encoder_to_decoder (outside both) keep PyTorch's init; q/v biases start at zero
        for m in [*self.encoder.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Linear):  # fused qkv initialised as one (3D, D) matrix, as the reference does
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # ref wrapper: timm's, cut at +-std

    def forward_encoder(self, videos, ids_vis):
        x = self.encoder.patch_embed(videos) + self.encoder.pos_embed  # (B, N, D), positions before masking
        x_vis = x.gather(1, ids_vis[..., None].expand(-1, -1, x.shape[2]))  # (B, N_vis, D) = ref x[~mask]
        for blk in self.encoder.blocks:
            x_vis = blk(x_vis)
        return self.encoder.norm(x_vis)  # (B, N_vis, D)

    def forward_decoder(self, x_vis, ids_vis, ids_mask):
        x_vis = self.encoder_to_decoder(x_vis)  # (B, N_vis, Dd)
        B, _, Dd = x_vis.shape
        pe = self.pos_embed.expand(B, -1, -1)  # (B, N, Dd)
        pos_vis = pe.gather(1, ids_vis[..., None].expand(-1, -1, Dd))  # (B, N_vis, Dd)
        pos_mask = pe.gather(1, ids_mask[..., None].expand(-1, -1, Dd))  # (B, N_mask, Dd)
        # no unshuffle: visible tokens first, mask tokens last, each carrying its own position
        x = torch.cat([x_vis + pos_vis, self.mask_token + pos_mask], dim=1)  # (B, N, Dd)
        for blk in self.decoder.blocks:
            x = blk(x)
        return self.decoder.head(self.decoder.norm(x[:, x_vis.shape[1]:]))  # (B, N_mask, t*p*p*C): masked only

    def forward(self, videos, mask_ratio=0.9, noise=None):
        mask = tube_masking(videos.shape[0], self.t_tokens, self.hw, mask_ratio, videos.device, noise)  # (B, N)
        n_vis = self.t_tokens * (self.hw - int(mask_ratio * self.hw))
        ids = mask.to(torch.int8).argsort(dim=1, stable=True)  # (B, N): visible ids ascending, then masked ones
        ids_vis, ids_mask = ids[:, :n_vis], ids[:, n_vis:]  # (B, N_vis), (B, N_mask): ref x[~mask], x[mask]
        pred = self.forward_decoder(self.forward_encoder(videos, ids_vis), ids_vis, ids_mask)  # (B, N_mask, K)
        p = self.encoder.patch_embed.patch_size
        loss = forward_loss(videos, pred, ids_mask, p, self.tubelet, self.mean, self.std, self.norm_pix_loss)
        return loss, {'pred': pred, 'mask': mask}


def features(model, videos):
    """All tokens after the encoder's norm, averaged; nothing masked: the clip feature VideoMAE fine-tunes on (ref
    modeling_finetune.py use_mean_pooling)."""
    N = model.t_tokens * model.hw
    return model.forward_encoder(videos, torch.arange(N, device=videos.device).expand(len(videos), N)).mean(1)


def encoder_state_dict(model):
    """The encoder without its 'encoder.' prefix: what run_class_finetuning.py loads (it strips the prefix itself
    too, with strict=False; its fixed pos_embed is rebuilt, not loaded)."""
    return {k[len('encoder.'):]: v for k, v in model.state_dict().items() if k.startswith('encoder.')}


# --------------------------------------------------------------------------- loss (ref engine_for_pretraining.py)


def forward_loss(videos, pred, ids_mask, p, t, mean, std, norm_pix_loss):
    """MSE over the hidden tubelets only. The target is in [0, 1] pixels; with norm_pix_loss each tubelet is
    normalised per channel over its t*p*p pixels (unbiased std, + 1e-6 on the std), flattened channel-last.
    videos (B, C, T, H, W) normalised; pred (B, N_mask, t*p*p*C); ids_mask (B, N_mask) in ascending token order."""
    with torch.no_grad(), torch.autocast(videos.device.type, enabled=False):  # ref: fp32, outside autocast
        x = videos.float() * std + mean  # (B, C, T, H, W) in [0, 1]
        B, C = x.shape[:2]
        x = patchify(x, p, t)  # (B, N, t*p*p*C), ref rearrange 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)'
        if norm_pix_loss:
            x = x.reshape(B, x.shape[1], -1, C)  # (B, N, t*p*p, C)
            x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
            x = x.flatten(2)  # (B, N, t*p*p*C)
        labels = x.gather(1, ids_mask[..., None].expand(-1, -1, x.shape[2]))  # (B, N_mask, K) = ref x[mask]
    return ((pred.float() - labels) ** 2).sum() / max(labels.numel(), 1)  # nn.MSELoss mean; 0 if nothing hidden


# --------------------------------------------------------------------------- data (ref kinetics.py, transforms.py)


def clip_indices(n_frames, num_frames, stride, rng):
    """ref VideoMAE._sample_train_indices + _video_TSN_decord_batch_loader (1 segment, no jitter): a random start,
    then every stride-th frame. The index only advances while `offset + stride < n_frames` (1-based offset), so in
    a short video it stops and repeats the last frame reached (and never steps onto the very last frame). No rng:
    the middle start (evaluation)."""
    avg = n_frames - num_frames * stride + 1
    offset = (rng.randrange(avg) if rng else avg // 2) + 1 if avg > 0 else 1  # 1-based, as the reference counts
    ids = []
    for _ in range(num_frames):
        ids.append(offset - 1)
        if offset + stride < n_frames:
            offset += stride
    return ids


def multiscale_crop_params(W, H, out_size, rng, scales=(1, .875, .75, .66), max_distort=1):
    """ref GroupMultiScaleCrop(fix_crop=True, more_fix_crop=True)._sample_crop_size: crop sides int(min(W, H) * s),
    snapped to the output side within 3 px, (w, h) scale indices at most max_distort apart, at one of 13 fixed
    offsets. out_size (H, W). Returns (left, top, crop_w, crop_h)."""
    out_h, out_w = out_size
    sizes = [int(min(W, H) * s) for s in scales]
    crop_h = [out_h if abs(x - out_h) < 3 else x for x in sizes]
    crop_w = [out_w if abs(x - out_w) < 3 else x for x in sizes]
    pairs = [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= max_distort]
    cw, ch = rng.choice(pairs)
    cw, ch = min(cw, W), min(ch, H)  # a side snapped past the frame edge (ref: black padding)
    ws, hs = (W - cw) // 4, (H - ch) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs),  # corners, centre
               (0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0),  # edge centres
               (ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]  # quarter points
    left, top = rng.choice(offsets)
    return left, top, cw, ch


class VideoFolders(torch.utils.data.Dataset):
    """Videos under `root` (its `train/` if present): every folder holding frame images and every .gif file, found
    recursively; labels from the first-level subfolder, else 0. Items are (uint8 (C, T, H, W) clip, label,
    bad): clip_indices over the frames in name order, one multi-scale crop for all frames, no flip; the
    randomness is a pure function of (seed, epoch, index). A video with an unreadable frame is replaced by the next
    one and counted. Only folder paths are kept (a frame folder is listed when read): K400 has ~70M frames."""

    def __init__(self, root, num_frames, sampling_rate, size, in_chans=3, seed=0, centre=False):
        root = data_root(root)
        self.files, empty = [], []  # frame folders and .gif files
        for folder, files, has_subfolders in scan(root, IMAGE_EXTENSIONS + ('.gif',)):
            gifs = [os.path.join(folder, f) for f in files if f.lower().endswith('.gif')]
            if len(gifs) < len(files):
                self.files.append(folder)
            elif not has_subfolders and not gifs:
                empty.append(folder)
            self.files += gifs
        self.files.sort()
        if not self.files:
            raise SystemExit(f'no videos (folders of {", ".join(IMAGE_EXTENSIONS)} frames, or .gif) under {root}')
        if empty:
            print(f'warning: skipping {len(empty)} folder(s) without frames, e.g. {empty[0]}', file=sys.stderr)
        rel = [Path(v).relative_to(root).parts for v in self.files]
        cls_idx = {c: i for i, c in enumerate(sorted({r[0] for r in rel if len(r) > 1}))}
        self.labels = [cls_idx[r[0]] if len(r) > 1 else 0 for r in rel]
        self.num_frames, self.sampling_rate, self.size, self.in_chans, self.seed, self.warned, self.centre = (
            num_frames, sampling_rate, pair(size), in_chans, seed, set(), centre)

    def __len__(self):
        return len(self.files)

    def load(self, idx, rng):
        path, rng = self.files[idx], None if self.centre else rng  # centre: the middle clip, the centred crop
        is_gif = path.lower().endswith('.gif')
        gif = Image.open(path) if is_gif else None
        frames = None if is_gif else sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        ids = clip_indices(gif.n_frames if is_gif else len(frames), self.num_frames, self.sampling_rate, rng)
        (out_h, out_w), C = self.size, self.in_chans
        clip, box = np.empty((len(ids), out_h, out_w, C), dtype=np.uint8), None  # (T, H, W, C)
        for k, i in enumerate(ids):
            if k and i == ids[k - 1]:  # a short video repeats its last frame: decode it once
                clip[k] = clip[k - 1]
                continue
            img = gif if is_gif else Image.open(os.path.join(path, frames[i]))
            if is_gif:
                img.seek(i)
            W0, H0 = img.size
            if box is None:  # one crop for the whole clip, drawn from the first frame's size (as the reference)
                s = min(W0 / out_w, H0 / out_h)  # or the largest centred crop
                box = multiscale_crop_params(W0, H0, (out_h, out_w), rng) if rng else (
                    (W0 - out_w * s) / 2, (H0 - out_h * s) / 2, out_w * s, out_h * s)
            left, top, w, h = box
            if img.format == 'JPEG':  # decode at 1/2, 1/4 or 1/8 scale while the crop still covers the output
                img.draft('RGB' if C == 3 else 'L', (math.ceil(W0 * out_w / w), math.ceil(H0 * out_h / h)))
            img = to_mode(img, C)
            fx, fy = img.size[0] / W0, img.size[1] / H0
            img = img.resize((out_w, out_h), Image.BILINEAR, box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy))
            clip[k] = np.asarray(img, dtype=np.uint8).reshape(out_h, out_w, C)
        return torch.from_numpy(clip).permute(3, 0, 1, 2)  # (C, T, H, W)

    def __getitem__(self, key):
        return read_or_next(self, key, 'video')


class SyntheticVideos(torch.utils.data.Dataset):
    """Deterministic moving shapes: 1-3 discs or squares of random colour moving at constant velocity over a
    gradient background; label = number of shapes - 1. Same (uint8 (C, T, H, W), label, -1) items as VideoFolders."""

    def __init__(self, n, num_frames, size, in_chans=3, seed=0):
        self.n, self.num_frames, self.size, self.in_chans, self.seed = n, num_frames, pair(size), in_chans, seed

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        idx = key[1] if isinstance(key, tuple) else key
        rng = np.random.default_rng([self.seed, idx])
        (H, W), T = self.size, self.num_frames
        y, x = np.mgrid[0:H, 0:W] / max(H, W)  # (H, W) each, in [0, 1)
        a = rng.uniform(0, 2 * np.pi)
        g = (np.cos(a) * x + np.sin(a) * y)[..., None]  # (H, W, 1)
        video = np.repeat(((1 - g) * rng.uniform(0, 1, 3) + g * rng.uniform(0, 1, 3))[None], T, axis=0)  # (T, H, W, 3)
        t = np.arange(T)[:, None, None]  # (T, 1, 1)
        n_shapes = rng.integers(1, 4)
        for _ in range(n_shapes):
            square, r = rng.integers(2), rng.uniform(0.1, 0.25)
            (cy, cx), (vy, vx) = rng.uniform(0.2, 0.8, 2), rng.uniform(-0.03, 0.03, 2)  # start, velocity per frame
            dy, dx = y - (cy + vy * t), x - (cx + vx * t)  # (T, H, W) each
            inside = np.maximum(abs(dy), abs(dx)) < r * 0.8 if square else dy ** 2 + dx ** 2 < r ** 2
            video[inside] = rng.uniform(0, 1, 3)
        video = (np.clip(video, 0, 1) * 255).astype(np.uint8)  # (T, H, W, 3)
        if self.in_chans == 1:
            video = video.mean(-1, keepdims=True).astype(np.uint8)
        return torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(), int(n_shapes - 1), -1  # (C, T, H, W)


def video_dataset(args):
    """`--data synthetic` (or `synthetic:N` for N videos, default 1000), else a folder of videos."""
    if args.data.startswith('synthetic'):
        n = int(args.data.split(':')[1]) if ':' in args.data else 1000
        return SyntheticVideos(n, args.num_frames, args.input_size, args.in_chans, args.seed)
    dataset = VideoFolders(args.data, args.num_frames, args.sampling_rate, args.input_size, args.in_chans, args.seed)
    check_readable(dataset, 'video')
    return dataset


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, videos, args, path, n_frames=4):
    """For a fixed batch and a fixed mask, n_frames frames of each clip as rows: original | masked input |
    prediction (hidden tubelets only) | prediction + visible. A norm-pix prediction has no colour of its own: it is
    shown with the true per-channel mean/std of each hidden tubelet, and the picture says so."""
    was_training = model.training
    model.eval()
    p, t, (gh, gw) = model.encoder.patch_embed.patch_size, model.tubelet, model.encoder.patch_embed.grid_size
    B, C, T = videos.shape[:3]
    noise = torch.rand(B, gh * gw, generator=torch.Generator().manual_seed(0)).to(videos.device)
    _, out = model(videos, args.mask_ratio, noise)
    pred, mask = out['pred'].float(), out['mask']  # (B, N_mask, K), (B, N)
    pix = patchify(videos.float() * model.std + model.mean, p, t)  # (B, N, K) in [0, 1], channel-last
    hidden = pix[mask].reshape(B, -1, pix.shape[2] // C, C)  # (B, N_mask, t*p*p, C), ascending token order
    title, note = 'prediction', ''
    if args.norm_pix_loss:
        pred = pred.reshape(hidden.shape) * (hidden.var(dim=-2, keepdim=True).sqrt() + 1e-6) + hidden.mean(-2, True)
        title, note = 'prediction *', ('* norm-pix target: each predicted tubelet is shown with the TRUE per-channel\n'
                                       '  mean and std of the hidden tubelet, which the model never saw (colour leak)')
    pasted, alone = pix.clone(), torch.full_like(pix, 0.5)  # grey where the decoder predicts nothing
    pasted[mask] = alone[mask] = pred.reshape(-1, pix.shape[2])
    frames = torch.linspace(0, T - 1, min(T, n_frames)).round().long().to(videos.device)

    def rows(x):  # (B, N, K) -> (B*n_frames, C, H, W)
        v = unpatchify(x, p, gh, gw, C, t, T).index_select(2, frames)  # (B, C, F, H, W)
        return v.transpose(1, 2).flatten(0, 1)

    save_grid(path, [('original', rows(pix)), ('masked input', rows(torch.where(mask[..., None], 0.5, pix))),
                     (title, rows(alone)), (title + ' + visible', rows(pasted))], note)
    model.train(was_training)


# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS, positive=('num_frames', 'sampling_rate', 'tubelet'))  # one line and exit, before any work
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    patch, dim, depth, heads, dec_dim, dec_depth, dec_heads = MODELS[args.model]
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the patch size {patch} of --model {args.model}')
    if args.num_frames % args.tubelet:
        raise SystemExit(f'--num_frames {args.num_frames} is not divisible by --tubelet {args.tubelet}')
    hw = (H // patch) * (W // patch)
    check_mask_ratio(args.mask_ratio, int(args.mask_ratio * hw), hw, 'patches of each frame slice')  # as tube_masking
    evaluate = Evaluation(args, features, lambda root: VideoFolders(  # the middle clip, centred: no augmentation
        root, args.num_frames, args.sampling_rate, args.input_size, args.in_chans, centre=True),
        lambda n, seed: SyntheticVideos(n, args.num_frames, args.input_size, args.in_chans, seed))
    if args.eval_only:
        return evaluate.only(VideoMAE((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, args.num_frames,
                                      args.tubelet, args.in_chans))
    d, out = setup_run(args)  # process group, seeds + rank, output folder

    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the paper's global batch
    lr, warmup_lr, min_lr = (v * args.global_batch / 256 for v in (args.blr, args.warmup_lr, args.min_lr))  # ref

    dataset = video_dataset(args)  # ref: clip sampling + GroupMultiScaleCrop, no flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} videos do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    model = VideoMAE((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, args.num_frames, args.tubelet,
                     args.in_chans, args.norm_pix_loss, args.mean, args.std).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, skip=('mask_token',)), lr=lr,
                                  betas=args.betas, fused=True)  # ref no_weight_decay(); fused: on-device skip
    autocast, scaler = amp_setup(args.amp, d.device)

    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        # constant buffers (position tables, mean/std): no per-step broadcast
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, '
              f'{model.t_tokens * model.hw} tokens ({model.t_tokens} x {model.hw}); {len(dataset)} videos, '
              f'{steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g}, warmup_lr = {args.warmup_lr:g} x '
              f'{args.global_batch} / 256 = {warmup_lr:g}, min_lr = {args.min_lr:g} x {args.global_batch} / 256 = '
              f'{min_lr:g}')

    vis_clips = torch.stack([dataset[(0, i % len(dataset))][0] for i in range(2)]).to(d.device)
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_clips = normalize(vis_clips, mean, std)  # a fixed batch for the pictures
    flops = report_flops(d, count_flops(model, vis_clips[:1], args.mask_ratio), args.global_batch, 'clip')

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            visualize(unwrap(model), vis_clips, args, out / f'vis_{epoch_done if epoch_done is not None else step}.png')
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
        if not stop:  # collective: kNN on --eval_data, and a linear probe at the end
            evaluate(model, step, final=step >= total_steps)

    if step == 0:  # the encoder at initialisation, for comparison
        evaluate(model, 0)
    logger, saved, stop = Logger(out, d, step, unit='clip', flops=flops), step, None  # img_per_s in log.jsonl: clips
    model.train()
    for epoch in range(step // steps_per_epoch, args.epochs):
        first = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch already done (resume)
        sampler.set_epoch(epoch, skip=first * args.batch_size)
        batches = iter(loader)
        for it in range(first, iters_per_epoch):
            t = time.perf_counter()
            videos, _, bad_files = next(batches)  # bad_files: indices of unreadable files, else -1
            logger.wait += time.perf_counter() - t
            videos = normalize(videos.to(d.device, non_blocking=True), mean, std)  # (B, C, T, H, W)
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref utils.cosine_scheduler)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, min_lr, args.warmup_epochs, args.epochs,
                                        warmup_lr=warmup_lr)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(videos, args.mask_ratio)
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
