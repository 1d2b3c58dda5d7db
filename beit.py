"""BEiT: BERT Pre-Training of Image Transformers (Bao et al., arXiv 2106.08254).

Reference: github.com/microsoft/unilm beit/ (modeling_pretrain.py, masking_generator.py, run_beit_pretraining.py,
engine_for_pretraining.py, datasets.py, dall_e/, optim_factory.py, utils.py). The encoder sees every patch, blockwise
masked ones replaced by a learned mask token, and predicts the visual token (one of 8192) that a frozen dVAE gives
each masked patch. `encoder.pkl` is OpenAI's DALL-E dVAE encoder (cdn.openai.com/dall-e/encoder.pkl, downloaded
once), read by a restricted unpickler: no dall_e code is imported or run, only its tensors are taken.

    python beit.py --demo                         # own tiny tokenizer, then tiny BEiT: 78 s of CPU time
    torchrun --nproc_per_node=8 beit.py --data imagenet/ --tokenizer encoder.pkl   # BEiT-B/16, its README's IN-1k
    python beit.py --stage tokenizer --data DIR   # the file's own small dVAE -> output_beit/tokenizer/tokenizer.pth

Deviations from the reference:
- `--global_batch` (2048, its README's 16 GPUs x 128) derives the accumulation (reference: none); lr is absolute.
- bf16 autocast by default on CUDA, tokenizer included (reference: fp16 + GradScaler, tokenizer convs in fp16, its
  last conv in fp32); `--amp fp16` gives fp16 + GradScaler, `--amp none` fp32.
- ColorJitter acts on the two resized views (same factors and order), not on the full image before the crop, so
  the contrast mean is the view's; the flip comes after the crop (same distribution). An item's randomness (crop,
  jitter, flip, mask) is a pure function of (seed, epoch, index), so a resumed run is exact.
- A non-finite loss/gradient skips the step and is counted (reference: sys.exit); `--max_bad_steps` stop the run.
  An epoch is truncated to whole accumulation cycles. No masked patch at all gives loss 0, not NaN.
- Fused AdamW; constant weight decay (the reference's default wd schedule is constant); no `--warmup_steps`
  (IN-22k recipe). `checkpoint-<epoch>.pth` counts finished epochs (reference: 0-based).
- The own tokenizer (`--stage tokenizer`) is ours, not the DALL-E tokenizer the paper used; it has no resume.
"""
import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, ImageFiles, Logger, PatchEmbed,
                    RelativePositionBias, SyntheticImages, accumulation, amp_setup, check_args, check_readable,
                    close_group, count_flops, finish, load_checkpoint, make_loader, normalize, optimizer_step, pair,
                    param_groups, parse_args, random_resized_crop_params, report_flops, resume, save_checkpoint,
                    save_grid, save_loss_curve, save_training_state, setup_run, to_mode, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # own tiny tokenizer, then tiny BEiT on synthetic images: 78 s of CPU time
    stage: str = 'pretrain'  # pretrain | tokenizer (train the own dVAE -> output_dir/tokenizer/tokenizer.pth)
    tokenizer: Optional[str] = None  # DALL-E encoder.pkl, our tokenizer.pth, or 'random' (benchmarks only)
    output_dir: str = 'output_beit'  # checkpoint.pth, log.jsonl (loss, mlm_acc), vis_<epoch>.png, encoder.pth
    model: str = 'base'  # tiny | base | large (MODELS below; ref beit_{base,large}_patch16_224_8k_vocab)
    input_size: Optional[tuple[int, ...]] = None  # H [W]; None: the preset's (ref 224, tiny 64); tokenizer: 8 px/patch
    num_mask_patches: int = 75  # ref --num_mask_patches (75 of 196)
    min_mask_patches_per_block: int = 16  # ref
    crop_scale: tuple = (0.08, 1.0)  # ref RandomResizedCropAndInterpolationWithTwoPic
    drop_path: float = 0.1  # ref README
    layer_scale: Optional[float] = None  # None: the preset's (base 0.1, large 1e-5; ref README); 0 = none
    abs_pos_emb: bool = False  # ref --abs_pos_emb (the pt1k_800ep release: with --layer_scale 0; rel table left 0)
    batch_size: int = 128  # per GPU; ref README
    global_batch: int = 2048  # ref README 16 x 128; accum_iter = global_batch / (batch_size x GPUs)
    epochs: int = 800  # ref README IN-1k
    warmup_epochs: int = 10  # ref README
    lr: float = 1.5e-3  # ref README; absolute, NOT scaled by the batch (ref run_beit_pretraining.py)
    min_lr: float = 1e-5  # ref argparse
    weight_decay: float = 0.05  # ref
    betas: tuple = (0.9, 0.999)  # ref argparse
    clip_grad: float = 3.0  # ref README
    mean: tuple = IMAGENET_MEAN  # ref README IN-1k --imagenet_default_mean_and_std (ref default and IN-22k: 0.5)
    std: tuple = IMAGENET_STD  # as mean
    num_workers: int = 10  # ref
    seed: int = 0  # data and masks use (seed, epoch, index)
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference BEiT pretraining release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # ref save_ckpt_freq: checkpoint-<epoch>.pth every 20 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit
    vocab_size: int = 8192  # own tokenizer: codebook size (DALL-E: 8192)
    tok_width: int = 128  # own tokenizer: conv width; ours
    tok_epochs: int = 20  # own tokenizer: epochs; ours
    tok_lr: float = 1e-3  # own tokenizer: Adam lr (DALLE-pytorch default)
    tok_temp: tuple = (1.0, 1 / 16)  # own tokenizer: Gumbel-softmax temperature, cosine first -> last (DALL-E A.2)
    kl_weight: float = 0.05  # own tokenizer: weight of KL(q || uniform) (keeps more codes in use); ours


# name: (patch, D, depth, heads, layer scale)  ref modeling_pretrain.py and README
MODELS = {'tiny': (8, 128, 4, 4, 0.1), 'base': (16, 768, 12, 12, 0.1), 'large': (16, 1024, 24, 16, 1e-5)}
INPUT_SIZE = {'tiny': 64, 'base': 224, 'large': 224}  # px when --input_size is not given
DEMO = dict(data='synthetic:1024', model='tiny', input_size=(64,), num_mask_patches=24, min_mask_patches_per_block=4,
            crop_scale=(0.35, 1.0), batch_size=64, global_batch=64, epochs=4, warmup_epochs=1, lr=2e-3, num_workers=2,
            output_dir='output_beit_demo', log_every=4, vocab_size=64, tok_width=32, tok_epochs=8, tok_lr=3e-3,
            eval_data='synthetic:1000')

# --------------------------------------------------------------------------- masking (paper Sec. 2.2, Alg. 1)


def block_mask(rng, grid, num_masking_patches=75, min_num_patches=16, max_num_patches=None, min_aspect=0.3):
    """ref MaskingGenerator: add random blocks (area uniform in [min, budget], log-uniform aspect in [0.3, 1/0.3],
    strictly smaller than the grid) that add 1..budget new patches until num_masking_patches are masked; 10 failed
    tries end the mask early, below the target. rng: random.Random. Returns (gh, gw) bool numpy, True = masked."""
    gh, gw = grid
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask, count = np.zeros((gh, gw), dtype=bool), 0
    while count < num_masking_patches:
        budget, delta = min(num_masking_patches - count, max_num_patches), 0
        for _ in range(10):
            area = rng.uniform(min_num_patches, budget)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w], delta = True, new
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask

# --------------------------------------------------------------------------- data: two views of one crop


class TwoViews(ImageFiles):
    """ref DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4) + flip + one RandomResizedCrop giving the ViT view
    (bicubic) and the tokenizer view (Lanczos, 8 px per patch), and a fresh blockwise mask. Items: ((uint8 (3, H, W),
    uint8 (3, 8gh, 8gw), bool (N,)), label, bad); ImageFiles skips bad files and seeds the item's rng."""

    def __init__(self, args, grid):
        self.size, self.tok_size, self.grid, self.args = pair(args.input_size), (8 * grid[0], 8 * grid[1]), grid, args
        self.src = None
        if args.data.startswith('synthetic'):
            self.src = SyntheticImages(int((args.data + ':10000').split(':')[1]), args.input_size, 3, args.seed)
            self.files, self.labels, self.seed, self.warned = range(len(self.src)), [0] * self.src.n, args.seed, set()
        else:
            super().__init__(args.data, args.input_size, seed=args.seed)
            check_readable(self, 'image')  # stops with one line when no file can be read

    def load(self, idx, rng):
        img = Image.fromarray(self.src[idx][0].permute(1, 2, 0).numpy()) if self.src else Image.open(self.files[idx])
        W0, H0 = img.size
        top, left, h, w = random_resized_crop_params(W0, H0, self.args.crop_scale, (3 / 4, 4 / 3), rng)  # 10 tries
        if img.format == 'JPEG':  # decode at reduced size while the crop still covers the output size
            img.draft('RGB', (math.ceil(W0 * self.size[1] / w), math.ceil(H0 * self.size[0] / h)))
        img = to_mode(img, 3)
        fx, fy = img.size[0] / W0, img.size[1] / H0
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        views = [img.resize(self.size[::-1], Image.BICUBIC, box=box),
                 img.resize(self.tok_size[::-1], Image.LANCZOS, box=box)]
        factors = [rng.uniform(0.6, 1.4) for _ in range(3)]  # ColorJitter(0.4, 0.4, 0.4): random factors and order
        for k in rng.sample(range(3), 3):
            enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[k]
            views = [enhance(v).enhance(factors[k]) for v in views]
        flip = rng.random() < 0.5
        views = [torch.from_numpy(np.array(v, dtype=np.uint8)).permute(2, 0, 1) for v in views]  # (3, H, W) each
        mask = block_mask(rng, self.grid, self.args.num_mask_patches, self.args.min_mask_patches_per_block)  # max: None
        return *[v.flip(-1) if flip else v for v in views], torch.from_numpy(mask.reshape(-1))  # mask (N,)

# --------------------------------------------------------------------------- tokenizer (DALL-E dVAE encoder)


def map_pixels(x):  # DALL-E's input mapping: uint8 (B, 3, h, w) -> float in [0.1, 0.9]
    return x.float() / 255 * 0.8 + 0.1


class Conv(nn.Module):
    """dall_e.utils.Conv2d: weights kept as `w`, `b`; 'same' padding (kw - 1) // 2; init normal(1/sqrt(fan_in))."""

    def __init__(self, n_in, n_out, kw):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class EncoderBlock(nn.Module):
    """dall_e.encoder.EncoderBlock: id path (1x1 conv when the width changes) + 1/n_layers^2 x residual path."""

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict(
            relu_1=nn.ReLU(), conv_1=Conv(n_in, hid, 3), relu_2=nn.ReLU(), conv_2=Conv(hid, hid, 3),
            relu_3=nn.ReLU(), conv_3=Conv(hid, hid, 3), relu_4=nn.ReLU(), conv_4=Conv(hid, n_out, 1)))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """dall_e.encoder.Encoder with the same module tree (so its tensors load by name): 7x7 input conv, four groups of
    n_blk blocks (widths 1, 2, 4, 8 x n_hid; 2x2 max-pool after the first three), relu + 1x1 conv to vocab logits."""

    def __init__(self, n_hid=256, n_blk=2, vocab=8192, in_chans=3):
        super().__init__()
        groups, widths = OrderedDict(input=Conv(in_chans, n_hid, 7)), [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        for g in range(1, 5):
            blocks = OrderedDict((f'block_{i + 1}', EncoderBlock(widths[g - (i == 0)], widths[g], 4 * n_blk))
                                 for i in range(n_blk))
            groups[f'group_{g}'] = nn.Sequential(OrderedDict(blocks, **({'pool': nn.MaxPool2d(2)} if g < 4 else {})))
        groups['output'] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv(widths[4], vocab, 1)))
        self.blocks, self.vocab = nn.Sequential(groups), vocab  # (B, 3, 8h, 8w) in [0.1, 0.9] -> (B, V, h, w)

    def forward(self, x):
        return self.blocks(x)


class DVAE(nn.Module):
    """The file's own small discrete VAE (DALLE-pytorch's DiscreteVAE without res blocks, quick to train): stride-2
    convs down 8x to vocab logits, a Gumbel-softmax token choice, a 1x1 "codebook" conv, transposed convs back."""

    def __init__(self, vocab, w):
        super().__init__()
        down = lambda i, o: [nn.Conv2d(i, o, 4, 2, 1), nn.ReLU()]  # noqa: E731
        up = lambda i, o: [nn.ReLU(), nn.ConvTranspose2d(i, o, 4, 2, 1)]  # noqa: E731
        self.encoder = nn.Sequential(*down(3, w), *down(w, w), *down(w, w), nn.Conv2d(w, vocab, 1))
        self.decoder = nn.Sequential(nn.Conv2d(vocab, w, 1), *up(w, w), *up(w, w), *up(w, 3))
        self.vocab = vocab

    @torch.no_grad()
    def decode(self, ids, grid):  # ids (B, h*w) -> (B, 3, 8h, 8w) in [0, 1]
        z = F.one_hot(ids, self.vocab).permute(0, 2, 1).reshape(ids.shape[0], self.vocab, *grid).float()
        return ((self.decoder(z) - 0.1) / 0.8).clamp(0, 1)

    def forward(self, x, temp, kl_weight):  # x (B, 3, 8h, 8w) in [0.1, 0.9]
        logits = self.encoder(x)  # (B, V, h, w)
        rec = self.decoder(F.gumbel_softmax(logits, tau=temp, dim=1))  # (B, 3, 8h, 8w)
        rec_loss = F.mse_loss(rec, x)
        kl = (logits.softmax(1) * (logits.log_softmax(1) + math.log(self.vocab))).sum(1).mean()
        return rec_loss + kl_weight * kl, {'rec_loss': rec_loss, 'rec': rec}


@torch.no_grad()
def visual_tokens(tokenizer, x):  # (B, 3, 8h, 8w) in [0.1, 0.9] -> (B, h*w): argmax over the vocabulary, row-major
    return (tokenizer.encoder if isinstance(tokenizer, DVAE) else tokenizer)(x).argmax(1).flatten(1)


PICKLED = ['dall_e.encoder.Encoder', 'dall_e.encoder.EncoderBlock', 'dall_e.utils.Conv2d'] + [f'torch.nn.modules.{m}'
           for m in ('container.Sequential', 'activation.ReLU', 'pooling.MaxPool2d', 'linear.Identity')]


def load_tokenizer(path):
    """The frozen tokenizer: 'random' (DALL-E sized, random weights), a pickled dall_e Encoder (encoder.pkl:
    torch's weights_only unpickler, each PICKLED class as a bare nn.Module), our tokenizer.pth, or its state dict."""
    if path == 'random':
        return Encoder()
    with torch.serialization.safe_globals([(nn.Module, name) for name in PICKLED]):  # attributes only, no code
        try:
            obj = load_checkpoint(path, '--tokenizer')  # weights_only; one line for a missing, cut or foreign file
        except SystemExit as e:  # decoder.pkl, the other half of the DALL-E dVAE, is named
            raise SystemExit(f'--tokenizer {path}: the DALL-E decoder; give the encoder, encoder.pkl'
                             if 'dall_e.decoder.' in str(e.code) else e.code) from None
    sd = obj.state_dict() if isinstance(obj, nn.Module) else obj.get('model', obj) if isinstance(obj, dict) else {}
    sd = {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}
    try:
        if 'decoder.0.weight' in sd:  # our tokenizer.pth: (width, vocab, 1, 1)
            tok = DVAE(*sd['decoder.0.weight'].shape[1::-1])
        else:  # the DALL-E encoder
            (n_hid, in_chans), vocab = sd['blocks.input.w'].shape[:2], sd['blocks.output.conv.w'].shape[0]
            tok = Encoder(n_hid, sum(k.endswith('res_path.conv_1.w') for k in sd) // 4, vocab, in_chans)  # 4 groups
        tok.load_state_dict(sd)
    except Exception:  # tensors missing or of other shapes
        raise SystemExit(f'--tokenizer {path}: no DALL-E encoder or dVAE tensors (keys like {list(sd)[:3]})') from None
    return tok.requires_grad_(False).eval()

# --------------------------------------------------------------------------- model


@torch.no_grad()
def trunc_normal_1sigma(t, std=0.02):
    """ref trunc_normal_(a=-std, b=std): normal(0, std) cut at +-1 std, by the inverse CDF as timm does."""
    edge = math.erf(1 / math.sqrt(2))
    return t.uniform_(-edge, edge).erfinv_().mul_(std * math.sqrt(2)).clamp_(-std, std)


class BEiT(nn.Module):
    """VisionTransformerForMaskedImageModeling with the reference's names: q/v biases, layer scale, one shared
    relative position bias (no absolute positions by default), lm_head over the masked positions only (no host sync)."""

    def __init__(self, img_size, patch, dim, depth, heads, vocab=8192, drop_path=0.1, init_values=0.1,
                 abs_pos_emb=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        self.grid = self.patch_embed.grid_size
        self.cls_token, self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim)) if abs_pos_emb else None
        self.rel_pos_bias = RelativePositionBias(self.grid, heads)  # shared by all blocks, zero table
        self.blocks = nn.ModuleList(Block(dim, heads, qv_bias=True, init_values=init_values, drop_path=p)
                                    for p in torch.linspace(0, drop_path, depth).tolist())  # stochastic depth rule
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab)
        for m in self.modules():  # ref _init_weights: trunc +-1 std for Linear and the patch Conv2d, zero biases
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_1sigma(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for t in (self.cls_token, self.mask_token) + ((self.pos_embed,) if abs_pos_emb else ()):
            trunc_normal_1sigma(t)
        for i, blk in enumerate(self.blocks):  # ref fix_init_weight
            for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
                w.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward_features(self, imgs, mask):
        x = self.patch_embed(imgs)  # (B, N, D)
        w = mask.unsqueeze(-1).type_as(self.mask_token)  # (B, N, 1) fp32, as the reference: under autocast the token's
        x = x * (1 - w) + self.mask_token * w  # gradient is summed in fp32 (in fp16 it can overflow a GradScaler)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x if self.pos_embed is None else x + self.pos_embed
        bias = self.rel_pos_bias()  # (1, heads, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)  # (B, 1+N, D)

    def forward(self, imgs, mask, input_ids, k=None):  # imgs (B, 3, H, W) normalised; mask, input_ids (B, N)
        # the LM head sees k positions per image, the masked first (k >= the most masked: --num_mask_patches; None: N)
        pos = mask.byte().argsort(dim=1, descending=True, stable=True)[:, :k]  # (B, k): a shape the mask never changes
        x = self.forward_features(imgs, mask)[:, 1:]  # (B, N, D)
        logits = self.lm_head(x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1])))  # (B, k, V)
        valid, labels = mask.gather(1, pos), input_ids.gather(1, pos)  # (B, k) each
        acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        return beit_loss(logits, labels, valid), {'logits': logits, 'pos': pos, 'valid': valid, 'mlm_acc': acc}


def features(model, imgs):
    """Patch tokens after the last norm, averaged, nothing masked: what BEiT fine-tunes on (ref use_mean_pooling)."""
    return model.forward_features(imgs, torch.zeros(len(imgs), model.patch_embed.num_patches, dtype=torch.bool,
                                                    device=imgs.device))[:, 1:].mean(1)  # (B, D)


def encoder_state_dict(model):
    """What the reference fine-tuning code loads (it copies the shared rel-pos table into every block): no lm_head."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith('lm_head.')}

# --------------------------------------------------------------------------- loss (paper Sec. 2.5)


def beit_loss(logits, labels, valid):
    """Cross-entropy over ALL masked tokens of the batch (more masked patches weigh more): mean over `valid` ones."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction='none')  # (B*k,) of (B, k, V)
    return torch.where(valid.flatten(), ce, 0).sum() / valid.sum().clamp(min=1)

# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, tokenizer, batch, args, path):
    """original | masked input | tokenizer's decoding of the true tokens | of the predicted tokens at the masked
    patches (true tokens elsewhere) | masked patches green where the predicted token is right, red where wrong."""
    was_training, (imgs, tok_imgs, mask) = model.training, batch
    model.eval()
    ids = visual_tokens(tokenizer, map_pixels(tok_imgs))  # (B, N)
    _, out = model(normalize(imgs, args.mean, args.std), mask, ids)
    pred = torch.where(mask, ids.scatter(1, out['pos'], out['logits'].argmax(-1)), ids)  # (B, N): predicted at mask
    p, (gh, gw), orig = model.patch_embed.patch_size, model.grid, imgs.float() / 255
    up = lambda m: m.view(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)  # noqa: E731
    cols = [('original', orig), ('masked input', torch.where(up(mask), 0.5, orig))]
    if hasattr(tokenizer, 'decode'):
        dec = lambda t: F.interpolate(tokenizer.decode(t, (gh, gw)), size=orig.shape[-2:], mode='nearest')  # noqa
        cols += [('true tokens\ndecoded', dec(ids)), ('predicted at\nmask, decoded', dec(pred))]
    hit = torch.tensor([0.1, 0.8, 0.1], device=imgs.device).view(1, 3, 1, 1)  # green right, red wrong:
    colour = torch.where(up(pred == ids), hit, hit[:, [1, 0, 2]])
    cols.append(('token right (green)\n/ wrong (red)', torch.where(up(mask), 0.5 * orig + 0.5 * colour, 0.3 * orig)))
    top = (torch.bincount(ids[mask]).max() / mask.sum()).item()  # accuracy of always guessing the commonest code
    save_grid(path, cols, f'masked-token accuracy {out["mlm_acc"].item():.3f} (always the commonest code {top:.3f}, '
                          f'chance {1 / tokenizer.vocab:.4f})')
    model.train(was_training)

# --------------------------------------------------------------------------- training


def train_tokenizer(args, d, loader, sampler):
    """The own dVAE on the tokenizer view (8 px per patch); rank 0 writes output_dir/tokenizer/tokenizer.pth."""
    (out := Path(args.output_dir) / 'tokenizer').mkdir(exist_ok=True)
    per_epoch, scaler = len(sampler) // args.batch_size, torch.amp.GradScaler(enabled=False)  # steps per epoch; fp32
    total = min(args.tok_epochs * per_epoch, args.max_steps or math.inf)
    vae = DVAE(args.vocab_size, args.tok_width).to(d.device)
    optimizer = torch.optim.Adam(params := list(vae.parameters()), lr=args.tok_lr, fused=True)
    fwd = nn.parallel.DistributedDataParallel(vae) if d.world > 1 else vae
    logger, step, (t0, t1) = Logger(out, d, 0, note=' [own dVAE, NOT the DALL-E tokenizer]'), 0, args.tok_temp
    while step < total:
        sampler.set_epoch(step // per_epoch)
        for (_, tok_imgs, _), _, bad_files in itertools.islice(loader, total - step):
            temp = t1 + 0.5 * (t0 - t1) * (1 + math.cos(math.pi * step / total))  # Gumbel temperature, cosine
            loss, ex = fwd(map_pixels(tok_imgs.to(d.device)), temp, args.kl_weight)
            loss.backward()
            logger.add(ex['rec_loss'], bad_files, {'temp': loss.new_tensor(temp)})  # loss: the reconstruction MSE
            logger.stepped(optimizer_step(optimizer, scaler, params)[1])
            step += 1
            if step % args.log_every == 0 or step == total:
                logger.log_step(step / per_epoch, step, total, args.tok_lr, args.batch_size * d.world,
                                args.max_bad_steps)
    if d.main:
        save_checkpoint(out / 'tokenizer.pth', {'model': vae.state_dict(), 'args': dataclasses.asdict(args)})
        save_loss_curve(out / 'loss.png', out / 'log.jsonl')
    if args.stage == 'tokenizer':  # --stage tokenizer: the run ends here
        close_group()
    return vae.requires_grad_(False).eval()


def lr_at(step, lr, min_lr, warmup_steps, total_steps):
    """ref utils.cosine_scheduler: warmup = linspace(0, lr, warmup_steps), then cosine to min_lr."""
    if step < warmup_steps:
        return lr * step / max(warmup_steps - 1, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def main(args):
    check_args(args, MODELS, positive=('num_mask_patches', 'min_mask_patches_per_block', 'vocab_size', 'tok_width',
                                       'tok_epochs', 'tok_lr', 'tok_temp', 'crop_scale'), non_negative=('kl_weight',))
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    *arch, scale = MODELS[args.model]  # patch, D, depth, heads; the preset's layer scale
    patch, H, W, scale = arch[0], *pair(args.input_size), scale if args.layer_scale is None else args.layer_scale
    if args.stage not in ('pretrain', 'tokenizer') or H % patch or W % patch:
        raise SystemExit(f'--stage is pretrain or tokenizer; --input_size {H} {W} must be divisible by the patch size '
                         f'{patch} of --model {args.model}')
    grid, N, pretrain = (H // patch, W // patch), (H // patch) * (W // patch), args.stage == 'pretrain'
    if pretrain and not args.min_mask_patches_per_block <= args.num_mask_patches < N:
        raise SystemExit(f'--num_mask_patches {args.num_mask_patches}: give --min_mask_patches_per_block '
                         f'{args.min_mask_patches_per_block} to {N - 1} of the {N} patches')
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work (the demo's tokenizer too)
    if args.eval_only:  # the encoder alone: no tokenizer
        return evaluate.only(BEiT((H, W), *arch, args.vocab_size, 0.0, scale, args.abs_pos_emb))
    tok = Path(args.output_dir) / 'tokenizer' / 'tokenizer.pth'  # --stage tokenizer's; the demo trains it once
    own = not pretrain or args.demo and args.tokenizer is None and not tok.exists()
    args = dataclasses.replace(args, tokenizer=args.tokenizer or (str(tok) if args.demo else None))
    if pretrain and args.tokenizer is None:
        raise SystemExit('give --tokenizer: DALL-E encoder.pkl, or the tokenizer.pth of `--stage tokenizer`')
    torch.manual_seed(args.seed)  # a random tokenizer: the same on every rank and restart
    tokenizer = None if own else load_tokenizer(args.tokenizer)  # frozen, not in the optimizer
    d, out = setup_run(args if pretrain else dataclasses.replace(args, output_dir=str(tok.parent)))
    accum = accumulation(args, d) if pretrain else 1  # per-GPU x GPUs x accum = the global batch
    loader, sampler = make_loader(dataset := TwoViews(args, grid), args.batch_size, args.num_workers, d, args.seed)
    steps_per_epoch = len(sampler) // args.batch_size // accum  # whole accumulation cycles
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    tokenizer = train_tokenizer(args, d, loader, sampler) if own else tokenizer.to(d.device)
    if not pretrain:
        return tokenizer
    model = BEiT((H, W), *arch, tokenizer.vocab, args.drop_path, scale, args.abs_pos_emb).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, skip={'pos_embed', 'cls_token'}),  # ref
                                  lr=args.lr, betas=args.betas, fused=True)  # fused: skips a bad step on the device
    weights = b''.join(v.float().cpu().numpy().tobytes() for v in tokenizer.state_dict().values())
    fp = hashlib.sha256(weights).hexdigest()[:16]  # in the checkpoint: its targets are these tokens
    autocast, scaler = amp_setup(args.amp, d.device)
    step = resume(args, model, optimizer, scaler, d, lambda c: c.get('tokenizer', fp) != fp and f'made with another '
                  f'tokenizer (not --tokenizer {args.tokenizer}); give it, or another --output_dir')
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:  # constant index buffer: no per-step broadcast
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)
    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, {grid[0]}x{grid[1]} '
              f'patches, up to {args.num_mask_patches} masked; tokenizer {args.tokenizer}: vocab {tokenizer.vocab}, '
              f'{8 * grid[0]}x{8 * grid[1]} px; {len(dataset)} images, {steps_per_epoch} steps/epoch\n'
              f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; lr = '
              f'{args.lr:g} (absolute: the reference does not scale it by the batch), warmup {args.warmup_epochs} '
              f'epochs from 0, cosine to {args.min_lr:g}')
    vis = [torch.stack(t).to(d.device) for t in zip(*[dataset[(0, i % len(dataset))][0] for i in range(8)])]
    img, tok_img, m = (t[:1].float() for t in vis)  # FLOPs of one image, k = the mask budget; the dVAE: its encoder
    flops = report_flops(d, count_flops(model, img, m.bool(), m.long(), args.num_mask_patches), args.global_batch,
                         tokenizer=count_flops(getattr(tokenizer, 'encoder', tokenizer), tok_img))
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done, {'tokenizer': fp}):
            visualize(unwrap(model), tokenizer, vis, args, out / f'vis_{epoch_done or step}.png')  # epoch_done >= 1
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
            save_loss_curve(out / 'mlm_acc.png', out / 'log.jsonl', 'mlm_acc')  # masked-token accuracy
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
        for it in range(first, steps_per_epoch * accum):
            t = time.perf_counter()
            (imgs, tok_imgs, mask), _, bad_files = next(batches)  # bad_files: unreadable files' indices, else -1
            logger.wait += time.perf_counter() - t
            imgs = normalize(imgs.to(d.device, non_blocking=True), mean, std)  # (B, 3, H, W)
            mask = mask.to(d.device, non_blocking=True)  # (B, N) bool, drawn in the workers
            with torch.no_grad(), autocast:
                input_ids = visual_tokens(tokenizer, map_pixels(tok_imgs.to(d.device, non_blocking=True)))  # (B,N)
            for g in optimizer.param_groups:  # ref: a per-step schedule array
                g['lr'] = lr_at(step, args.lr, args.min_lr, args.warmup_epochs * steps_per_epoch,
                                args.epochs * steps_per_epoch)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, extras = fwd(imgs, mask, input_ids, args.num_mask_patches)  # k: the masks' budget
                scaler.scale(loss / accum).backward()
            logger.add(loss, bad_files, {'mlm_acc': extras['mlm_acc']})  # on the device until the next log step
            if not update:
                continue
            logger.stepped(optimizer_step(optimizer, scaler, params, args.clip_grad)[1])  # [1]: skipped, on the device
            step += 1
            if step % args.log_every == 0 or step == total_steps:  # the only host syncs: ranks agree on stopping
                stop = logger.log_step(epoch + (it + 1) / (steps_per_epoch * accum), step, total_steps,
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
