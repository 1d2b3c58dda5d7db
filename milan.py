"""MILAN: Masked Image Pretraining on Language Assisted Representation (Hou et al., arXiv 2208.06049).

Reference: github.com/zejiangh/MILAN (models_milan.py, clip_demo.py, main_pretrain.py, engine_pretrain.py).
An MAE ViT encoder sees a quarter of the patches; which ones is sampled from a frozen CLIP image tower's attention
(semantic-aware sampling: the cls query's head-averaged attention of the last block). A "prompting" decoder updates
only the mask tokens (the encoded visible tokens are fixed prompts) and regresses the CLIP features of all tokens.

    python milan.py --demo                                    # tiny, RANDOM small teacher, synthetic: 86 s of CPU time
    torchrun --nproc_per_node=8 milan.py --data imagenet/ --teacher ViT-B-16.pt   # ViT-B/16, the paper's recipe

`--teacher`: OpenAI's CLIP `ViT-B-16.pt` (TorchScript, fp16) or a plain state dict with its `visual.*` keys (as
MILAN's `clip_vit_base_16.pth.tar`); width, depth, patch and grid are read from the tensors. Nothing is downloaded.
`--teacher random` (the default of --demo and of `--data synthetic`) builds a randomly initialised teacher of the
CLIP architecture: the method runs, its targets carry no language; every log line and picture says so.

Deviations from the reference:
- The teacher is the CLIP visual tower with ln_post + proj on all tokens (clip_demo.py with finetune=False), loaded
  strictly; the reference's main_pretrain.py passes 'base' as `finetune` and loads non-strictly (a silent partial load).
  OpenAI's TorchScript file is read as data, its code never run (the reference expects a pickled state dict).
- Only the last block's cls-query attention row is computed explicitly (fp32 softmax); the rest runs through SDPA.
- The prediction width is the teacher's output width (512 for CLIP ViT-B/16, hard-coded in the reference).
- The effective batch is `--global_batch` (4096, PRETRAIN.sh: 256 x accum 2 x 8 GPUs); `accum_iter` is derived.
- bf16 autocast by default on CUDA (reference: fp16 + GradScaler, which `--amp fp16` gives).
- A non-finite loss/gradient skips the step and is counted (reference: sys.exit); AdamW is torch's fused kernel.
- An epoch is truncated to whole accumulation cycles; `checkpoint-<epoch>.pth` counts finished epochs.
- `--average_targets` (dead code in the reference) and the early "cluster loss" are not implemented.
- Data: JPEGs decoded at reduced size by `Image.draft` when the crop allows it, crop + resize in one call.
"""
import dataclasses
import io
import json
import math
import pickle
import time
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IMAGENET_MEAN, IMAGENET_STD, Block, Evaluation, Logger, Mlp, PatchEmbed, accumulation, amp_setup,
                    check_args, check_mask_ratio, cosine_lr, count_flops, finish, image_dataset, load_checkpoint,
                    make_loader, normalize, optimizer_step, pair, param_groups, parse_args, report_flops, resume,
                    save_grid, save_loss_curve, save_training_state, setup_run, sincos_2d, unwrap)

# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # image folder (its train/ if present), or synthetic[:N]
    demo: bool = False  # tiny model and random teacher on synthetic images: 86 s of CPU time
    output_dir: str = 'output_milan'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, encoder.pth
    teacher: Optional[str] = None  # CLIP ViT-B-16.pt (TorchScript) or a state dict of its keys; 'random': no language
    model: str = 'base'  # tiny | base | large (MODELS below; paper headline ViT-B/16)
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch; None: the preset's (ref 224, tiny 64)
    in_chans: int = 3  # the CLIP teacher reads RGB
    mask_ratio: float = 0.75  # ref PRETRAIN.sh --mask_ratio 0.75
    attn_mask: bool = True  # ref PRETRAIN.sh --attn_mask: semantic-aware sampling (off: uniform random, paper ablation)
    batch_size: int = 256  # per GPU; ref PRETRAIN.sh
    global_batch: int = 4096  # ref PRETRAIN.sh 256 x accum 2 x 8 GPUs
    epochs: int = 400  # ref PRETRAIN.sh, paper Sec. 4
    warmup_epochs: int = 40  # ref PRETRAIN.sh
    blr: float = 1.5e-4  # ref PRETRAIN.sh, README (argparse default 1e-3 is not what was run); lr = blr x batch / 256
    min_lr: float = 0.0  # ref main_pretrain.py
    weight_decay: float = 0.05  # ref PRETRAIN.sh
    betas: tuple = (0.9, 0.95)  # ref main_pretrain.py
    clip_grad: float = 0.0  # 0 = none; ref: no clipping in pretraining
    mean: tuple = IMAGENET_MEAN  # ref: student AND teacher get ImageNet-normalised crops (not CLIP's mean/std)
    std: tuple = IMAGENET_STD  # ref Normalize
    num_workers: int = 10  # ref main_pretrain.py
    seed: int = 0  # ref; data and masks use seed + rank; a random teacher uses seed alone
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the student
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: our checkpoint or a reference MILAN release
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 20  # ref main_pretrain.py: checkpoint every 20 epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)  ref models_milan.py (*_dec512d8b)
MODELS = {
    'tiny': (8, 128, 4, 4, 96, 2, 4),  # ours, for the demo and tests
    'base': (16, 768, 12, 12, 512, 8, 16),
    'large': (16, 1024, 24, 16, 512, 8, 16),
}
INPUT_SIZE = {'tiny': 64, 'base': 224, 'large': 224}  # px when --input_size is not given
# random teachers (width, layers, output): CLIP ViT-B/16's tower, or a small one for the tiny preset (ours)
RANDOM_TEACHER = {'tiny': (128, 2, 512), 'base': (768, 12, 512), 'large': (768, 12, 512)}
DEMO = dict(data='synthetic:2048', teacher='random', model='tiny', input_size=(64,), batch_size=64, global_batch=64,
            epochs=6, warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_milan_demo', log_every=8,
            keep_every=3, eval_data='synthetic:1000')

# --------------------------------------------------------------------------- teacher: OpenAI CLIP's visual tower


class CLIPAttention(nn.Module):
    """nn.MultiheadAttention's parameter names (in_proj rows q | k | v, out_proj), computed through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, cls_attn=False):
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        out = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        if not cls_attn:
            return out, None
        # the cls query's attention only, post-softmax, averaged over heads (need_weights=True in the reference)
        logits = q[:, :, :1].float() @ k.float().transpose(-2, -1) * (D // self.heads) ** -0.5  # (B, heads, 1, N)
        return out, logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, N), cls column included


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)  # eps 1e-5, as CLIP
        self.attn = CLIPAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, cls_attn=False):
        a, attn = self.attn(self.ln_1(x), cls_attn)
        x = x + a
        return x + self.mlp(self.ln_2(x)), attn


class CLIPVisual(nn.Module):
    """CLIP's VisionTransformer under its own key names (the `visual.` prefix stripped). forward(imgs) ->
    (targets (B, 1+N, out): ln_post then proj on EVERY token, importance (B, N): last block's cls->patch attention)."""

    def __init__(self, patch, width, layers, n_tokens, out_dim, in_chans=3):
        super().__init__()
        s = width ** -0.5  # CLIP's init of the embeddings and the projection (random teachers only)
        self.conv1 = nn.Conv2d(in_chans, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(s * torch.randn(width))
        self.positional_embedding = nn.Parameter(s * torch.randn(n_tokens, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()  # only a container, for CLIP's key names; heads of 64 channels as CLIP
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(width, width // 64) for _ in range(layers))
        self.proj = nn.Parameter(s * torch.randn(width, out_dim))
        for blk in self.transformer.resblocks:  # nn.MultiheadAttention's init
            nn.init.xavier_uniform_(blk.attn.in_proj_weight)
            nn.init.zeros_(blk.attn.out_proj.bias)

    @torch.no_grad()
    def forward(self, imgs):
        x = self.conv1(imgs).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype))  # (B, 1+N, W)
        blocks = self.transformer.resblocks
        for i, blk in enumerate(blocks):
            x, attn = blk(x, cls_attn=i == len(blocks) - 1)
        return self.ln_post(x) @ self.proj.to(x.dtype), attn[:, 1:]  # (B, 1+N, out), (B, N)


class ScriptObject:  # stands in for every class of a TorchScript archive: keeps its pickled state, runs no code
    def __setstate__(self, state):
        self.state = state


class ArchiveUnpickler(pickle.Unpickler):
    """A TorchScript archive's module tree (data.pkl) read as data (torch.jit.load would run the archive's methods,
    `__setstate__` included): tensors from its storages, its classes as ScriptObject; any other global is refused."""
    GLOBALS = {'collections.OrderedDict': OrderedDict, 'torch.jit._pickle.restore_type_tag': lambda value, _: value,
               'torch._utils._rebuild_tensor_v2': lambda data, at, size, stride, *_: data.as_strided(size, stride, at),
               **{f'torch.jit._pickle.build_{t}list': list for t in ('int', 'double', 'bool', 'tensor')},
               **{f'torch.{t}Storage': getattr(torch, t.lower()) for t in ('Half', 'Float', 'BFloat16', 'Double',
                                                                           'Long', 'Int', 'Short', 'Bool')}}

    def __init__(self, archive, root):
        super().__init__(io.BytesIO(archive.read(f'{root}/data.pkl')))
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        found = ScriptObject if module.startswith('__torch__') else self.GLOBALS.get(f'{module}.{name}')
        if found is None:  # e.g. os.system: a function that could run code
            raise pickle.UnpicklingError(f'refused {module}.{name}: a teacher holds only modules and tensors')
        return found

    def persistent_load(self, pid):  # ('storage', dtype, key, device, numel) -> a flat tensor of the stored bytes
        data = bytearray(self.archive.read(f'{self.root}/data/{pid[2]}'))
        return torch.frombuffer(data, dtype=pid[1]) if data else torch.empty(0, dtype=pid[1])


def script_tensors(obj, prefix=''):
    """Every tensor under a module read by ArchiveUnpickler, by dotted name (as torch.jit.load(...).state_dict())."""
    out = {}
    for k, v in (obj.state.items() if isinstance(getattr(obj, 'state', None), dict) else ()):
        out.update({prefix + k: v} if isinstance(v, torch.Tensor) else
                   script_tensors(v, f'{prefix}{k}.') if isinstance(v, ScriptObject) else {})
    return out


def load_teacher(path, n_tokens, patch, in_chans):
    """A CLIP visual tower from OpenAI's TorchScript file (read as data) or a plain state dict (fp16 or fp32), strictly;
    one line and exit when the file is missing, corrupt, not a CLIP ViT, or does not fit the student's patch grid."""
    if not Path(path).is_file():
        raise SystemExit(f'--teacher {path}: no such file (OpenAI CLIP ViT-B-16.pt, or --teacher random)')
    try:  # a TorchScript archive (OpenAI's release): <root>/constants.pkl, data.pkl and data/<storage>
        with zipfile.ZipFile(path) as archive:
            root = next(n[:-14] for n in archive.namelist() if n.count('/') == 1 and n.endswith('/constants.pkl'))
            sd = script_tensors(ArchiveUnpickler(archive, root).load())
    except (zipfile.BadZipFile, StopIteration):  # a plain state dict (MILAN's clip_vit_base_16.pth.tar), clear errors
        sd = load_checkpoint(path, '--teacher')
        sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    except Exception as e:
        raise SystemExit(f'--teacher {path}: TorchScript archive not read ({type(e).__name__}: '
                         f'{" ".join(str(e).split())[:200]})') from None
    sd = {k[7:]: v for k, v in sd.items() if k.startswith('visual.') and isinstance(v, torch.Tensor)} \
        if isinstance(sd, dict) else {}  # fp16 or fp32: load_state_dict copies into the fp32 tower
    if [sd[k].dim() if k in sd else 0 for k in ('proj', 'conv1.weight', 'positional_embedding')] != [2, 4, 2]:
        raise SystemExit(f'--teacher {path}: not a CLIP ViT image tower (no visual.proj/conv1/positional_embedding)')
    width, c, p, _ = sd['conv1.weight'].shape
    layers = sum(k.endswith('attn.in_proj_weight') for k in sd)
    if p != patch or sd['positional_embedding'].shape[0] != n_tokens or c != in_chans:
        raise SystemExit(f'--teacher {path}: patch {p}, {sd["positional_embedding"].shape[0]} tokens, {c} channels; the'
                         f' student has patch {patch}, {n_tokens} tokens, {in_chans} channels (--model/--input_size)')
    try:  # a tower too big to allocate, or tensors of other shapes (checked before any copy): one line
        teacher = CLIPVisual(p, width, layers, n_tokens, sd['proj'].shape[1], c)
        teacher.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f'--teacher {path}: does not fit a CLIP ViT ({" ".join(str(e).split())[:240]})') from None
    return teacher.eval().requires_grad_(False)

# --------------------------------------------------------------------------- masking (paper Sec. 3.2)


def attention_order(importance):
    """Semantic-aware sampling: patches ordered by weighted sampling without replacement, weights = the teacher's cls
    attention (fp32; global torch RNG); the first int(N(1-ratio)) stay visible, so high attention is kept more
    often, not always. Drawn as the reference's torch.multinomial(replacement=False) draws it, by an exponential race
    (w / E, E ~ Exp(1), sorted descending: the Gumbel top-k trick, exact), without multinomial's input checks, which
    synced the host until pytorch#134818 (2024). importance (B, N) -> ids_shuffle (B, N)"""
    w = importance.float()
    return (w / torch.empty_like(w).exponential_()).argsort(dim=1, descending=True)


def random_order(B, N, device):
    """--no-attn_mask: MAE's uniform per-sample order (argsort of uniform noise). -> (B, N)"""
    return torch.rand(B, N, device=device).argsort(dim=1)


def order_to_mask(ids_shuffle, mask_ratio):
    """ids_shuffle (B, N), kept first -> ids_restore (B, N) that undoes it, mask (B, N) bool, True = hidden."""
    B, N = ids_shuffle.shape
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
    mask = torch.ones(B, N, dtype=torch.bool, device=ids_shuffle.device)
    mask[:, :int(N * (1 - mask_ratio))] = False
    return ids_restore, mask.gather(1, ids_restore)  # mask in patch order


def gather_tokens(x, ids):
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))  # (B, len(ids), D)

# --------------------------------------------------------------------------- model


class PromptAttention(nn.Module):
    """Queries: the mask tokens only; keys/values: cls + visible (fixed) + mask tokens, in patch order."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, fixed, ids_restore):
        full = gather_tokens(torch.cat([fixed[:, 1:], x], dim=1), ids_restore)  # (B, N, D) patch order
        full = torch.cat([fixed[:, :1], full], dim=1)  # (B, 1+N, D)
        B, M, D = x.shape
        q = self.q(x).reshape(B, M, self.heads, D // self.heads).transpose(1, 2)  # (B, h, N_mask, D/h)
        k, v = self.kv(full).reshape(B, full.shape[1], 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N_mask, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, M, D))  # (B, N_mask, D)


class PromptBlock(nn.Module):
    """ref Block_fordecoder: the fixed tokens enter K/V un-normed; the mask tokens after norm1."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = PromptAttention(dim, heads)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, fixed, ids_restore):
        x = x + self.attn(self.norm1(x), fixed, ids_restore)
        return x + self.mlp(self.norm2(x))  # (B, N_mask, D)


class MILAN(nn.Module):
    """models_milan.MaskedAutoencoderViT (use_clip, attn_mask, prompting decoder) with the reference's names."""

    def __init__(self, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, out_dim=512, in_chans=3):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch, in_chans, dim)
        gh, gw = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, gh, gw, cls_token=True)[None], requires_grad=False)  # (1, 1+N, D)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(dec_dim, gh, gw, cls_token=True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(PromptBlock(dec_dim, dec_heads) for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, out_dim)  # to the CLIP feature width
        self.initialize_weights()

    def initialize_weights(self):  # MAE's: xavier Linear (fused q/kv/qkv as one matrix), N(0, .02) tokens
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_encoder(self, imgs, ids_keep):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]  # (B, N, D)
        x = gather_tokens(x, ids_keep)  # (B, N_vis, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N_vis, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_shuffle, ids_restore):
        x = self.decoder_embed(latent)  # (B, 1+N_vis, Dd)
        (B, N), n_keep = ids_shuffle.shape, x.shape[1] - 1
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N - n_keep, -1)], dim=1)  # (B, N, Dd) shuffled order
        x = torch.cat([x[:, :1], gather_tokens(x_, ids_restore)], dim=1) + self.decoder_pos_embed  # (B, 1+N, Dd)
        # cls + visible: fixed prompts, never updated by the blocks (not detached: gradients flow through them)
        fixed = torch.cat([x[:, :1], gather_tokens(x[:, 1:], ids_shuffle[:, :n_keep])], dim=1)  # (B, 1+N_vis, Dd)
        q = gather_tokens(x[:, 1:], ids_shuffle[:, n_keep:])  # (B, N_mask, Dd)
        for blk in self.decoder_blocks:
            q = blk(q, fixed, ids_restore)
        x = torch.cat([fixed[:, :1], gather_tokens(torch.cat([fixed[:, 1:], q], dim=1), ids_restore)], dim=1)
        return self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, out): cls, visible and masked

    def forward(self, imgs, target, importance, mask_ratio=0.75, ids_shuffle=None):
        """imgs (B, C, H, W); target (B, 1+N, out) and importance (B, N) from the teacher. importance None:
        uniform random order (--no-attn_mask)."""
        B, N = imgs.shape[0], target.shape[1] - 1
        if ids_shuffle is None:
            ids_shuffle = attention_order(importance) if importance is not None else random_order(B, N, imgs.device)
        ids_restore, mask = order_to_mask(ids_shuffle, mask_ratio)  # (B, N), (B, N)
        n_keep = int(N * (1 - mask_ratio))
        latent = self.forward_encoder(imgs, ids_shuffle[:, :n_keep])  # (B, 1+N_vis, D)
        pred = self.forward_decoder(latent, ids_shuffle, ids_restore)  # (B, 1+N, out)
        return forward_loss(pred, target), {'pred': pred, 'mask': mask}


def features(model, imgs):
    """The cls token after the last norm, all patches seen: MILAN's linear probe (MAE's, ref main_linprobe.py)."""
    N = model.patch_embed.num_patches
    return model.forward_encoder(imgs, torch.arange(N, device=imgs.device).expand(len(imgs), N))[:, 0]  # (B, D)


def encoder_state_dict(model):
    """The encoder in timm's VisionTransformer layout (what MILAN's fine-tuning code and timm's ViT load)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}

# --------------------------------------------------------------------------- loss (ref forward_loss, use_clip)


def forward_loss(pred, target):
    """2 - 2 cos(pred, target) per token, averaged over ALL 1+N tokens (cls, visible and masked); no eps, as the
    reference. pred, target (B, 1+N, out)."""
    pred, target = pred.float(), target.float()
    pred = pred / pred.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    return (2 - 2 * (pred * target).sum(dim=-1)).mean()

# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, teacher, imgs, args, path, random_teacher):
    """original | CLIP attention importance | sampled mask (hidden patches grey) | cos(prediction, target) per patch
    (black -1 .. white 1), for a fixed batch and a fixed sampling seed."""
    was_training = model.training
    model.eval()
    p, (gh, gw) = model.patch_embed.patch_size, model.patch_embed.grid_size
    target, importance = teacher(imgs)  # (B, 1+N, out), (B, N)
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == 'cuda' else []):
        torch.manual_seed(0)
        _, out = model(imgs, target, importance if args.attn_mask else None, args.mask_ratio)
    cos = F.cosine_similarity(out['pred'].float(), target.float(), dim=-1)[:, 1:]  # (B, N)
    up = lambda t: t.view(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)  # noqa: E731 (B, 1, H, W)
    mean = torch.tensor(args.mean, device=imgs.device).view(1, -1, 1, 1)
    orig = imgs * torch.tensor(args.std, device=imgs.device).view(1, -1, 1, 1) + mean  # (B, C, H, W) in [0, 1]
    heat = importance / importance.amax(dim=1, keepdim=True)  # (B, N), 1 = the most attended patch
    masked = torch.where(up(out['mask'].float()) > 0, torch.full_like(orig, 0.5), orig)
    note = (f'cos: black -1 .. white 1, mean over hidden patches {cos[out["mask"]].mean():.3f}, visible '
            f'{cos[~out["mask"]].mean():.3f}' + ('\nRANDOM teacher (no CLIP file): targets carry no language'
                                                 if random_teacher else ''))
    save_grid(path, [('original', orig), ('CLIP attention' + (' (random)' if random_teacher else ''), up(heat)),
                     ('sampled mask', masked), ('cos(pred, target)', up((cos + 1) / 2))], note)
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
    check_mask_ratio(args.mask_ratio, N - int(N * (1 - args.mask_ratio)), N, 'patches')  # as order_to_mask rounds
    evaluate = Evaluation(args, features)  # --eval_data checked here, before any work
    if args.eval_only:  # the encoder alone: no teacher
        return evaluate.only(MILAN((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, 512, args.in_chans))
    teacher_path = args.teacher or ('random' if args.data.startswith('synthetic') else None)
    if teacher_path is None:
        raise SystemExit('no teacher: give --teacher ViT-B-16.pt (OpenAI CLIP), or --teacher random (no language)')
    random_teacher = teacher_path == 'random'
    if random_teacher:  # the same weights on every rank and every restart: seeded by --seed alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            width, layers, out_dim = RANDOM_TEACHER[args.model]
            teacher = CLIPVisual(patch, width, layers, N + 1, out_dim, args.in_chans).eval().requires_grad_(False)
    else:
        teacher = load_teacher(teacher_path, N + 1, patch, args.in_chans)
    d, out = setup_run(args)  # process group, seeds + rank, output folder
    accum = accumulation(args, d)
    lr = args.blr * args.global_batch / 256
    dataset = image_dataset(args, scale=(0.2, 1.0), interpolation='bicubic')  # ref: RRC(0.2, 1, bicubic) + flip
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    teacher = teacher.to(d.device)
    model = MILAN((H, W), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, teacher.proj.shape[1],
                  args.in_chans).to(d.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas, fused=True)
    autocast, scaler = amp_setup(args.amp, d.device)
    step = resume(args, model, optimizer, scaler, d)  # output_dir/checkpoint.pth if present, else --init weights
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None)
    tag = 'RANDOM teacher (no CLIP file): targets carry no language' if random_teacher else f'teacher {teacher_path}'
    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M trainable params, {N} patches; '
              f'{tag}: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params, frozen; '
              f'{len(dataset)} images, {steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g}')
    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis_imgs = normalize(torch.stack([dataset[(0, i % len(dataset))][0] for i in range(8)]).to(d.device), mean, std)
    img = vis_imgs[:1]  # FLOPs of one image: the student's training step, the frozen teacher's forward
    flops = report_flops(d, count_flops(model, img, *teacher(img), args.mask_ratio), args.global_batch,
                         teacher=count_flops(teacher, img))

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            visualize(unwrap(model), teacher, vis_imgs, args, out / f'vis_{epoch_done or step}.png', random_teacher)
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
        if not stop:  # collective: kNN on --eval_data, and a linear probe at the end
            evaluate(model, step, final=step >= total_steps)

    if step == 0:  # the encoder at initialisation, for comparison
        evaluate(model, 0)
    note = ' [RANDOM teacher]' if random_teacher else ''  # every log line says when the targets carry no language
    logger, saved, stop = Logger(out, d, step, note=note, flops=flops), step, None
    model.train()
    for epoch in range(step // steps_per_epoch, args.epochs):
        first = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch already done (resume)
        sampler.set_epoch(epoch, skip=first * args.batch_size)
        batches = iter(loader)
        for it in range(first, iters_per_epoch):
            t = time.perf_counter()
            imgs, _, bad_files = next(batches)  # bad_files: indices of unreadable files, else -1
            logger.wait += time.perf_counter() - t
            imgs = normalize(imgs.to(d.device, non_blocking=True), mean, std)  # (B, C, H, W), teacher's input too
            if it % accum == 0:  # per-iteration schedule from the fractional epoch (ref lr_sched.py)
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs)
            update = (it + 1) % accum == 0
            with autocast:  # the teacher runs under the same autocast, without gradients (ref engine_pretrain.py)
                target, importance = teacher(imgs)  # (B, 1+N, out), (B, N)
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, _ = fwd(imgs, target, importance if args.attn_mask else None, args.mask_ratio)
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
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, timm's ViT layout
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
