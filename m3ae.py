"""M3AE: Multimodal Masked Autoencoders Learn Transferable Representations (Geng et al., arXiv 2205.14204).

Reference (JAX/Flax): github.com/young-geng/m3ae_public (m3ae/model.py, m3ae/m3ae_main.py, m3ae/data.py).
One ViT encoder sees the visible 25% of the image patches and of the text positions together ([cls | image | text],
a type embedding per modality); a shared decoder regresses the pixels of the hidden patches and predicts hidden words.

    python m3ae.py --demo                                          # tiny, synthetic captioned images: 135 s of CPU time
    torchrun --nproc_per_node=8 m3ae.py --data cc12m/ --vocab vocab.txt   # ViT-L/16, the reference README's recipe
    torchrun --nproc_per_node=8 m3ae.py --data pairs.tsv --vocab vocab.txt --text_data wiki.txt   # + unpaired text

Deviations from the reference:
- PyTorch, not Flax: keys keep the Flax names at the top level (text_embedding, cls_token, *_type_embedding, ...)
  and timm's in the blocks (encoder.blocks.i.attn.qkv, ...). `--init` reads the reference's released Flax pickles
  as data (no JAX; nothing in the file is run) and renames their parameters.
- The effective batch is `--global_batch` (4096, as in its README); `accum_iter` is derived. bf16 autocast on
  CUDA; fused AdamW; a non-finite loss/gradient skips the step and is counted. `--clip_grad 0` (ref: 1e9).
- Padded keys get an additive -1e7 in SDPA (ref: the logit replaced by -1e7): the same softmax, as cls is never
  padded. Sin-cos tables in float64, right for non-square grids (ref: square only). Seeds: seed + rank.
- Schedule per iteration from the fractional epoch (ref: optax warmup_cosine_decay per step); an epoch is
  truncated to whole accumulation cycles; `checkpoint-<epoch>.pth` every --keep_every epochs.
- Data: files or a tsv (ref: HDF5), shuffled each epoch (ref: file order), crops from (seed, epoch, index); an
  unreadable image is replaced by the next pair and counted. No caption file = an empty caption (ref: all padding).
- Unpaired text (`--text_data`): a file held in memory, one batch per micro-step drawn with replacement from
  (seed, rank, step) in the main process (ref: a second HDF5 loader); weight 1.0 (ref flag: 0 = off).
"""
import dataclasses
import json
import math
import os
import pickle
import random
import re
import sys
import textwrap
import time
import unicodedata
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import (Block, Evaluation, ImageFiles, Logger, accumulation, amp_setup, check_args, check_mask_ratio,
                    check_readable, cosine_lr, count_flops, finish, make_loader, normalize, optimizer_step, pair,
                    parse_args, patchify, report_flops, resume, save_grid, save_loss_curve, save_training_state,
                    setup_run, sincos_1d, sincos_2d, unpatchify, unwrap)


# --------------------------------------------------------------------------- config


@dataclass
class Args:
    data: Optional[str] = None  # folder of images + .txt captions, a .tsv of path<TAB>caption, or synthetic[:N]
    demo: bool = False  # tiny model on synthetic captioned images: 135 s of CPU time
    output_dir: str = 'output_m3ae'  # checkpoint.pth, log.jsonl, vis_<epoch>.png, loss.png, vocab.txt, encoder.pth
    model: str = 'large'  # tiny | small | base | large | huge (MODELS); ref README --m3ae.model_type='large'
    input_size: Optional[tuple[int, ...]] = None  # H [W], divisible by the patch; None: the preset's (ref 256, tiny 64)
    in_chans: int = 3  # 1 for grayscale data (then give --mean/--std with one value)
    vocab: Optional[str] = None  # BERT's vocab.txt (ref bert-base-uncased); none: a word vocab (NOT the paper's)
    text_len: int = 64  # tokens per caption, padded with id 0; ref tokenizer_max_length 64
    mask_ratio: float = 0.75  # image; ref README --m3ae.image_mask_ratio
    text_mask_ratio: float = 0.75  # ref README --m3ae.text_mask_ratio (paper: 50-90% works best)
    image_loss_weight: float = 1.0  # ref README
    text_loss_weight: float = 0.5  # ref README (flag default 0.1)
    text_data: Optional[str] = None  # unpaired text, one text per line (ref TextDataset, e.g. Wikipedia)
    unpaired_text_weight: float = 1.0  # used with --text_data (ref flag unpaired_text_loss_weight, 0 = off)
    unpaired_len: int = 256  # ref TextDataset tokenizer_max_length
    batch_size: int = 64  # per GPU
    global_batch: int = 4096  # ref README --batch_size 4096; accum = global_batch / (batch_size x GPUs)
    epochs: int = 100  # ref README
    warmup_epochs: int = 5  # ref README --lr_warmup_epochs
    blr: float = 1.5e-4  # ref README --lr_peak_value; lr = blr x global_batch / 256 (ref lr_scale)
    min_lr: float = 0.0  # ref lr_end_value
    weight_decay: float = 0.05  # ref README
    betas: tuple = (0.9, 0.95)  # ref optax.adamw(b1=0.9, b2=0.95)
    clip_grad: float = 0.0  # 0 = none; ref clip_by_global_norm(1e9)
    mean: tuple = (0.5762, 0.5503, 0.5213)  # ref image_normalization 'cc12m'
    std: tuple = (0.3207, 0.3169, 0.3307)  # ref image_normalization 'cc12m'
    num_workers: int = 16  # ref README --dataloader_n_workers
    seed: int = 42  # ref; data and masks use seed + rank
    amp: Optional[str] = None  # bf16 | fp16 | none (fp32); default: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # torch.compile the model
    resume: Optional[str] = None  # checkpoint to resume; output_dir/checkpoint.pth is resumed by itself
    init: Optional[str] = None  # start from weights: a checkpoint of this file or the reference's Flax pickle
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); for benchmarks and tests
    log_every: int = 20  # optimizer steps between log lines (also how often ranks agree on preemption)
    save_every: int = 1  # epochs between writes of checkpoint.pth and vis_<epoch>.png
    keep_every: int = 10  # checkpoint-<epoch>.pth every this many epochs and at the last
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row
    dist_timeout: float = 10.0  # minutes to wait for the other processes, at start and in any collective (torch NCCL's)
    eval_data: Optional[str] = None  # labelled images (class subfolders, train/ val/), or synthetic[:N]; ours
    eval_max: int = 10000  # at most this many train and this many val images per evaluation; ours
    eval_k: int = 20  # kNN neighbours; DINO eval_knn.py
    eval_t: float = 0.07  # kNN vote temperature; DINO eval_knn.py
    eval_only: bool = False  # evaluate the weights of --init on --eval_data (kNN, linear probe), print, exit


# name: (patch, D, depth, heads, decoder D, decoder depth, decoder heads)  ref model.py get_transformer_by_config
MODELS = {'tiny': (8, 128, 4, 4, 128, 2, 4),  # ours, for the demo and tests
          'small': (16, 384, 12, 6, 512, 8, 16), 'base': (16, 768, 12, 12, 512, 8, 16),
          'large': (16, 1024, 24, 16, 512, 8, 16), 'huge': (16, 1280, 32, 16, 512, 8, 16)}
INPUT_SIZE = {'tiny': 64, 'small': 256, 'base': 256, 'large': 256, 'huge': 256}  # when --input_size is not given
DEMO = dict(data='synthetic:2048', model='tiny', input_size=(64,), text_len=12, batch_size=64, global_batch=64,
            epochs=8, warmup_epochs=1, blr=1.5e-3, num_workers=2, output_dir='output_m3ae_demo', log_every=8,
            keep_every=4, eval_data='synthetic:1000')

# --------------------------------------------------------------------------- text: BERT's uncased WordPiece


CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
SPECIAL = re.compile(r'(\[(?:PAD|UNK|CLS|SEP|MASK)\])')  # BERT's special tokens, kept whole when a text has them


def basic_words(text):
    """BERT's uncased BasicTokenizer: special tokens kept whole; else drop U+FFFD and Unicode C* but tab and newlines,
    lower-case, strip accents, split on whitespace; each punctuation (ASCII symbols, Unicode P*) or CJK char a word."""
    out = []
    for k, part in enumerate(SPECIAL.split(text)):
        if k % 2:  # a special token
            out.append(f' {part} ')
            continue
        for ch in unicodedata.normalize('NFD', unicodedata.normalize('NFC', part).lower()):
            cp, cat = ord(ch), unicodedata.category(ch)
            if cp == 0xFFFD or cat == 'Mn' or (cat[0] == 'C' and ch not in '\t\n\r'):
                continue
            alone = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat[0] == 'P' or any(
                lo <= cp <= hi for lo, hi in CJK)
            out.append(' ' if cat == 'Zs' else f' {ch} ' if alone else ch)
    return ''.join(out).split()


class WordPiece:
    """BERT's WordPiece over a vocab (one token per line, id = line number): greedy longest match, '##' before
    continuations, [UNK] for a word over 100 chars or that cannot be split. No [CLS]/[SEP] (ref), pad id 0."""

    def __init__(self, tokens):
        self.tokens, self.vocab = list(tokens), {t: i for i, t in enumerate(tokens)}
        self.unk = self.vocab.get('[UNK]', 1)

    def pieces(self, word):
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            prefix = '##' if start else ''
            end = next((e for e in range(len(word), start, -1) if prefix + word[start:e] in self.vocab), None)
            if end is None:
                return [self.unk]  # no piece fits: the whole word is unknown
            ids.append(self.vocab[prefix + word[start:end]])
            start = end
        return ids

    def encode(self, text, L):
        ids = [i for w in basic_words(text) for i in self.pieces(w)][:L]
        pad = torch.arange(L) >= len(ids)  # (L,) True = pad; an empty text is all padding (ref data.py)
        return torch.tensor(ids + [0] * (L - len(ids)), dtype=torch.long), pad  # (L,), (L,)


def read_lines(path, flag):
    """The lines of a UTF-8 file (ends LF, CRLF or CR; a leading BOM dropped); missing or not UTF-8: one line."""
    if not Path(path).is_file():
        raise SystemExit(f'{flag} {path}: no such file')
    data = Path(path).read_bytes()
    try:
        text = data.decode('utf-8-sig').replace('\r\n', '\n').replace('\r', '\n')
    except UnicodeDecodeError as e:
        at = e.start + 3 * data.startswith(b'\xef\xbb\xbf')  # offsets count from after a BOM
        raise SystemExit(f'{flag} {path}: not UTF-8 text (byte {at} is 0x{data[at]:02x}); convert it first, e.g. '
                         f'iconv -f latin1 -t utf-8') from None
    return text.removesuffix('\n').split('\n') if text else []


def check_vocab(tokens, path):
    """The tokens, once they have [PAD] as id 0 (padding) and [UNK] (unknown words), as BERT's vocab.txt has."""
    missing = [t for t in ('[PAD]', '[UNK]') if t not in tokens]
    problem = ('is empty' if not tokens else f'lacks {" and ".join(missing)}' if missing else
               f'has [PAD] on line {tokens.index("[PAD]") + 1}, not 1' if tokens[0] != '[PAD]' else '')
    if problem:
        raise SystemExit(f'--vocab {path} {problem}: padding is id 0 = [PAD] (the first line) and unknown words are '
                         f'[UNK], as in BERT\'s vocab.txt')
    return tokens


# --------------------------------------------------------------------------- masking (paper Sec. 3, ref random_masking)


def random_masking(x, n_keep, noise=None, pad=None):
    """ONE permutation for the whole batch (ref: noise of shape (N,)): the n_keep positions of smallest noise stay.
    x (B, N, D) -> x_vis (B, n_keep, D), mask (B, N) True = hidden, ids_restore (N,), the kept part of pad (B, N)."""
    B, N = x.shape[:2]
    noise = torch.rand(N, device=x.device) if noise is None else noise  # (N,)
    ids_shuffle = noise.argsort()  # (N,) small noise = keep
    ids_restore = ids_shuffle.argsort()  # (N,)
    mask = (ids_restore >= n_keep).expand(B, N)  # (B, N): hidden = ranked n_keep or later in the shuffle
    pad_vis = None if pad is None else pad[:, ids_shuffle[:n_keep]]  # (B, n_keep)
    return x[:, ids_shuffle[:n_keep]], mask, ids_restore, pad_vis


# --------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Pre-norm blocks (GELU tanh, LayerNorm eps 1e-6: Flax defaults) and a final LayerNorm (ref Transformer)."""

    def __init__(self, dim, depth, heads):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, eps=1e-6) for _ in range(depth))
        for blk in self.blocks:
            blk.mlp.act = nn.GELU(approximate='tanh')  # flax nn.gelu's default
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, pad):
        bias = pad[:, None, None, :].float() * -1e7  # (B, 1, 1, N): padded keys get no attention
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)


class M3AE(nn.Module):
    """MaskedMultimodalAutoencoder (ref model.py), image path as flat patches through a Dense, as the reference."""

    def __init__(self, img_size, patch, dim, depth, heads, dec_dim, dec_depth, dec_heads, vocab_size, in_chans=3,
                 mask_ratio=0.75, text_mask_ratio=0.75, weights=(1.0, 0.5, 1.0), max_len=256):
        super().__init__()
        self.patch, self.grid, self.in_chans = patch, tuple(s // patch for s in pair(img_size)), in_chans  # grid (h, w)
        self.mask_ratio, self.text_mask_ratio, self.weights = mask_ratio, text_mask_ratio, weights
        self.image_embedding = nn.Linear(patch * patch * in_chans, dim)  # Dense on (row, col, channel) pixels
        self.text_embedding = nn.Embedding(vocab_size, dim)
        for name, d in (('cls_token', dim), ('encoder_image_type_embedding', dim), ('encoder_text_type_embedding', dim),
                        ('decoder_image_type_embedding', dec_dim), ('decoder_text_type_embedding', dec_dim),
                        ('image_mask_embedding', dec_dim), ('text_mask_embedding', dec_dim)):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, d)))
        self.encoder = Transformer(dim, depth, heads)
        self.decoder_input_projection = nn.Linear(dim, dec_dim)
        self.decoder = Transformer(dec_dim, dec_depth, dec_heads)
        self.decoder_image_output = nn.Linear(dec_dim, patch * patch * in_chans)  # ref output_head_depth 0
        self.decoder_text_output = nn.Linear(dec_dim, vocab_size)
        # fixed tables, not saved: 2-D sin-cos [col | row] for the image, 1-D [sin | cos] for text; none for cls
        for name, d in (('enc', dim), ('dec', dec_dim)):
            self.register_buffer(f'{name}_image_pos', sincos_2d(d, *self.grid)[None], persistent=False)  # (1, N, d)
            self.register_buffer(f'{name}_text_pos', sincos_1d(d, torch.arange(max_len))[None], persistent=False)
        # Flax's initialisers: Dense xavier_uniform + zero bias, Embed N(0, 1), params N(0, .02), LayerNorm 1/0
        for m in self.modules():
            if isinstance(m, nn.Linear):  # fused qkv initialised as one (3D, D) matrix, as Flax's Dense(3D)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_embedding.weight, std=1.0)
        for p in self.parameters():
            if p.dim() == 3:  # cls, type and mask embeddings
                nn.init.normal_(p, std=0.02)

    def forward_encoder(self, patches, text, pad, noise=(None, None)):
        """[cls | kept patches | kept text] (shuffled order) through the encoder; patches or text may be None."""
        B = (patches if patches is not None else text).shape[0]
        xs, img, txt = [self.cls_token.expand(B, -1, -1)], (None, None), (None, None)
        n_keep = 0 if patches is None else int(patches.shape[1] * (1 - self.mask_ratio))
        pads = [torch.zeros(B, 1 + n_keep, dtype=torch.bool, device=xs[0].device)]  # cls, kept patches: no padding
        if patches is not None:
            x = self.image_embedding(patches) + self.enc_image_pos + self.encoder_image_type_embedding  # (B, N, D)
            x, *img, _ = random_masking(x, n_keep, noise[0])  # (B, N_vis, D)
            xs.append(x)
        if text is not None:
            L = text.shape[1]
            t = self.text_embedding(text) + self.enc_text_pos[:, :L] + self.encoder_text_type_embedding  # (B, L, D)
            t, *txt, pad_vis = random_masking(t, int(L * (1 - self.text_mask_ratio)), noise[1], pad)  # (B, L_vis, D)
            xs.append(t)
            pads.append(pad_vis)  # kept pads stay out of attention
        return self.encoder(torch.cat(xs, dim=1), torch.cat(pads, dim=1)), img, txt  # (B, 1+N_vis+L_vis, D)

    def forward_decoder(self, x, img_restore, txt_restore, pad):
        """Project, append mask embeddings, unshuffle, add positions and types: [cls | N image | L text] decoded."""
        x = self.decoder_input_projection(x)  # (B, 1+N_vis+L_vis, Dd), one Dense for cls, image and text
        N = 0 if img_restore is None else img_restore.shape[0]
        B, k = x.shape[0], int(N * (1 - self.mask_ratio))  # k kept patches
        parts, pads = [x[:, :1]], [torch.zeros(B, 1 + N, dtype=torch.bool, device=x.device)]  # cls, image: no pads
        if N:
            xi = torch.cat([x[:, 1:1 + k], self.image_mask_embedding.expand(B, N - k, -1)], dim=1)  # (B, N, Dd)
            parts.append(xi[:, img_restore] + self.dec_image_pos + self.decoder_image_type_embedding)
        if txt_restore is not None:
            L = txt_restore.shape[0]
            xt = torch.cat([x[:, 1 + k:], self.text_mask_embedding.expand(B, L + 1 + k - x.shape[1], -1)], dim=1)
            parts.append(xt[:, txt_restore] + self.dec_text_pos[:, :L] + self.decoder_text_type_embedding)  # (B, L, Dd)
            pads.append(pad)
        y = self.decoder(torch.cat(parts, dim=1), torch.cat(pads, dim=1))  # (B, 1+N+L, Dd)
        pix = self.decoder_image_output(y[:, 1:1 + N]) if N else None  # (B, N, p*p*C)
        return pix, None if txt_restore is None else self.decoder_text_output(y[:, 1 + N:])  # (B, L, V)

    def forward(self, imgs, text, pad, utext=None, upad=None, noise=(None, None)):
        """imgs (B, C, H, W) dataset-normalised, text/pad (B, L); utext/upad (B, L_u): unpaired text, its own
        forward as [cls | text] in the same step (ref m3ae_main.py train_step)."""
        patches = patchify(imgs, self.patch)  # (B, N, p*p*C): also the target (no norm-pix)
        x, (img_mask, img_restore), (txt_mask, txt_restore) = self.forward_encoder(patches, text, pad, noise)
        pix, logits = self.forward_decoder(x, img_restore, txt_restore, pad)
        l_img, (l_txt, acc) = image_loss(pix, patches, img_mask), text_loss(logits, text, txt_mask, pad)
        loss = self.weights[0] * l_img + self.weights[1] * l_txt
        out = {'pred': pix, 'mask': img_mask, 'logits': logits, 'text_mask': txt_mask, 'image_loss': l_img,
               'text_loss': l_txt, 'text_acc': acc}
        if utext is not None:
            x, _, (umask, urestore) = self.forward_encoder(None, utext, upad)
            out['unpaired_loss'] = text_loss(self.forward_decoder(x, None, urestore, upad)[1], utext, umask, upad)[0]
            loss = loss + self.weights[2] * out['unpaired_loss']
        return loss, out


# --------------------------------------------------------------------------- losses (ref model.py)


def image_loss(pred, target, mask):
    """ref patch_mse_loss: per-sample mean over hidden patches of the MSE, then the batch mean. mask (B, N)."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # (B, N)
    return ((per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def text_loss(logits, ids, mask, pad):
    """ref cross_entropy_loss_and_accuracy on hidden AND real tokens: per-sample sum / max(count, 1e-5), then the
    batch mean (a sample with none counts 0). logits (B, L, V), ids/mask/pad (B, L). Returns (loss, accuracy)."""
    valid = (mask & ~pad).float()  # (B, L)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]  # (B, L)
    count = valid.sum(1).clamp(min=1e-5)  # (B,)
    acc = ((logits.argmax(-1) == ids).float() * valid).sum(1) / count
    return -((logp * valid).sum(1) / count).mean(), acc.mean()


def encoder_state_dict(model):
    """The image path with nothing hidden (ref forward_representation: cls + all patches, the image type embedding
    folded into pos_embed, cls's row 0) in timm's VisionTransformer layout; build it with act_layer='gelu_tanh'."""
    sd, p, C = model.state_dict(), model.patch, model.in_chans
    pos = torch.cat([torch.zeros_like(sd['cls_token']), model.enc_image_pos + sd['encoder_image_type_embedding']], 1)
    out = {'cls_token': sd['cls_token'], 'pos_embed': pos,  # (1, 1+N, D)
           'patch_embed.proj.weight': sd['image_embedding.weight'].reshape(-1, p, p, C).permute(0, 3, 1, 2),
           'patch_embed.proj.bias': sd['image_embedding.bias']}
    out.update({k.removeprefix('encoder.'): v for k, v in sd.items() if k.startswith('encoder.')})
    return {k: v.detach().clone() for k, v in out.items()}


def features(model, imgs):
    """The cls output of the image-only path, nothing hidden: M3AE's linear probe (ref forward_representation)."""
    x = model.image_embedding(patchify(imgs, model.patch)) + model.enc_image_pos + model.encoder_image_type_embedding
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1+N, D)
    return model.encoder(x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))[:, 0]  # (B, D)


def from_encoder(ckpt, model):
    """encoder.pth back to this model's names for --eval_only (type embedding up to rounding); else None (as is)."""
    sd = ckpt.get('model') if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or 'pos_embed' not in sd:
        return None
    w, pos = sd['patch_embed.proj.weight'], sd['pos_embed'][:, 1:] - model.enc_image_pos  # (D, C, p, p), (1, N, D)
    return {**sd, 'image_embedding.weight': w.permute(0, 2, 3, 1).flatten(1), 'encoder_image_type_embedding':
            pos.mean(1, keepdim=True), 'image_embedding.bias': sd['patch_embed.proj.bias']}


def param_groups(model, weight_decay):
    """ref get_weight_decay_mask: no decay when a name component is in the list; LayerNorm scales ARE decayed."""
    skip = {'cls_token', 'image_mask_embedding', 'text_mask_embedding', 'text_embedding', 'bias'} | {
        f'{a}_{b}_type_embedding' for a in ('encoder', 'decoder') for b in ('image', 'text')}
    groups = ([], [])
    for name, p in model.named_parameters():
        groups[not set(name.split('.')) & skip].append(p)  # [no decay, decay]
    return [{'params': groups[0], 'weight_decay': 0.0}, {'params': groups[1], 'weight_decay': weight_decay}]


# --------------------------------------------------------------------------- --init from the reference's Flax pickle


class Stub:
    """Stands in for each class or function the pickle names (Flax's train state, optax's, cloudpickle's function
    builders): making, calling, building or filling one only keeps what it was given, so nothing of the file runs."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.state, self.items = args, None, {}
        return self

    def __call__(self, *args, **kwargs):
        return Stub(*args)

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # the items of a dict subclass (OrderedDict)
        self.items[key] = value


FLAX_LIBRARIES = {'m3ae', 'flax', 'jax', 'jaxlib', 'optax', 'chex', 'numpy', 'ml_dtypes', 'ml_collections', 'absl',
                  'cloudpickle', 'collections', 'copyreg', 'functools', 'builtins', 'types', 'typing', 'dataclasses',
                  'enum', 'abc', 'operator', '_operator'}  # what such a pickle is made of
RUNS_CODE = ('eval', 'exec', 'compile', 'open', '__import__', 'breakpoint', 'input')
FLAX_NAMES = (('LayerNorm_1', 'norm2'), (r'(Block_\d+/)LayerNorm_0', r'\1norm1'), ('LayerNorm_0', 'norm'),
              (r'Block_(\d+)', r'blocks.\1'), ('Attention_0/Dense_0', 'attn.qkv'), ('Attention_0/Dense_1', 'attn.proj'),
              ('TransformerMLP_0', 'mlp'), ('/Dense_0/', '/'), ('/(kernel|scale|embedding)$', '/weight'), ('/', '.'))


class FlaxUnpickler(pickle.Unpickler):
    """Rebuilds containers, numpy arrays and dtypes (numpy's pickles name _frombuffer and dtype); every other global
    becomes a Stub, and one from outside those libraries (os.system, ...) or that runs code (eval, ...) is refused."""

    def find_class(self, module, name):
        root = module.split('.')[0]
        if root == 'numpy' and name == '_frombuffer':
            return lambda buf, dtype, shape, order: np.frombuffer(buf, dtype).reshape(shape, order=order)
        if root == 'numpy' and name == 'dtype':
            return np.dtype
        if root not in FLAX_LIBRARIES or root == 'builtins' and name in RUNS_CODE:
            raise pickle.UnpicklingError(f'refused: it names {module}.{name}, which no Flax checkpoint needs; '
                                         f'nothing of the file was run')
        return Stub


def flax_arrays(tree, prefix=''):
    """{'params/params/encoder/Block_0/LayerNorm_0/scale': array, ...} from nested dicts and the Stubs of dict-like
    objects (a train state's fields, FrozenDict(dict), OrderedDict); other leaves are left out."""
    if isinstance(tree, Stub):
        tree = {**next((a for a in tree.args if isinstance(a, dict)), {}),
                **(tree.state if isinstance(tree.state, dict) else {}), **tree.items}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flax_arrays(sub, f'{prefix}{key}/').items()}
    return {prefix[:-1]: tree} if isinstance(tree, np.ndarray) else {}


def load_flax(model, path):
    """--init from the reference's cloudpickle ({'step', 'epoch', 'variant', 'state'}): state.params['params'] renamed,
    Dense kernels transposed, misfits left as initialised. False for no pickle of protocol 4/5 (torch saves zips)."""
    with open(path, 'rb') as f:
        if f.read(2) not in (b'\x80\x04', b'\x80\x05'):
            return False
        f.seek(0)
        try:
            ckpt = FlaxUnpickler(f).load()
            params = {k[14:]: v for k, v in flax_arrays(ckpt['state']).items() if k.startswith('params/params/')}
        except Exception as e:
            raise SystemExit(f'--init {path}: not a checkpoint of the M3AE reference ({type(e).__name__}: {e})')
    own, sd = model.state_dict(), {}
    for name, array in params.items():
        key = name
        for pattern, new in FLAX_NAMES:
            key = re.sub(pattern, new, key)
        t = torch.tensor(np.asarray(array, dtype=np.float32))
        sd[key] = t.T if name.endswith('kernel') else t  # Dense (in, out) -> Linear (out, in)
    fit = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not fit:
        raise SystemExit(f'--init {path}: no Flax parameter fits --model {list(sd)[:3]}')
    model.load_state_dict(fit, strict=False)
    print(f'--init {path}: Flax parameters of the reference at step {ckpt.get("step")}: {len(fit)} of {len(own)} '
          f'tensors loaded; kept as initialised: {sorted(set(own) - set(fit))[:6]}')
    return True


# --------------------------------------------------------------------------- data: image-caption pairs


class CaptionedImages(ImageFiles):
    """Images with a same-stem .txt caption (found as common.ImageFiles does; no .txt = empty), or a .tsv of
    path<TAB>caption, paths relative to it. Items ((uint8 (C, H, W), ids (L,), pad (L,)), label, bad) as ImageFiles."""

    def __init__(self, root, size, text_len, in_chans=3, seed=0):
        root, self.text_len, self.tokenizer = Path(root), text_len, None
        if root.suffix.lower() == '.tsv' and root.is_file():  # ImageFiles' fields, without walking a folder
            rows = [line.split('\t', 1) + [''] for line in read_lines(root, '--data') if line.strip()]
            if not rows:
                raise SystemExit(f'no images listed in {root}')
            self.files, self.texts = [root.parent / r[0] for r in rows], [r[1] for r in rows]  # in memory
            self.size, self.scale, self.ratio, self.flip = pair(size), (0.2, 1.0), (3 / 4, 4 / 3), True
            self.labels, self.in_chans, self.seed, self.warned = [0] * len(rows), in_chans, seed, set()
            self.resample = Image.BICUBIC
            return
        super().__init__(root, size, (0.2, 1.0), interpolation='bicubic', in_chans=in_chans, seed=seed)
        self.texts = [f.with_suffix('.txt') if f.with_suffix('.txt').is_file() else '' for f in self.files]
        if '' in self.texts:
            print(f'note: {self.texts.count("")} of {len(self.files)} images have no .txt caption: they train with '
                  f'empty text (image loss only), as the reference trains an empty caption', file=sys.stderr)

    def caption(self, i):
        t = self.texts[i]
        return t.read_text(encoding='utf-8', errors='replace').strip() if isinstance(t, Path) else t

    def load(self, idx, rng):
        return super().load(idx, rng), *self.tokenizer.encode(self.caption(idx), self.text_len)  # (C, H, W), (L,) x2


COLOURS = {'red': (220, 30, 30), 'green': (40, 170, 60), 'blue': (40, 70, 220), 'yellow': (235, 215, 40),
           'purple': (140, 50, 170), 'orange': (245, 140, 20), 'white': (245, 245, 245), 'black': (15, 15, 15)}
SHAPES, SIZES, PLACES = ('disc', 'square', 'triangle'), ('small', 'big'), ('left', 'right', 'top', 'bottom', 'middle')


class SyntheticPairs(torch.utils.data.Dataset):
    """One shape on a plain background, captioned from what it shows; no augmentation (the caption names sides).
    Labelled by the shape; without a tokenizer (evaluation) an item is the image alone."""

    def __init__(self, n, size, text_len, in_chans=3, seed=0):
        self.n, self.size, self.text_len, self.in_chans, self.seed = n, pair(size), text_len, in_chans, seed
        self.tokenizer = None

    def __len__(self):
        return self.n

    def scene(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        bg, fg = rng.choice(len(COLOURS), 2, replace=False)
        return list(COLOURS)[bg], list(COLOURS)[fg], *(str(rng.choice(v)) for v in (SHAPES, SIZES, PLACES))

    def caption(self, idx):
        return 'a {3} {1} {2} on {0} at the {4}'.format(*self.scene(idx))

    def __getitem__(self, key):
        idx = key[1] if isinstance(key, tuple) else key
        bg, fg, shape, size, place = self.scene(idx)
        y, x = np.mgrid[0:self.size[0], 0:self.size[1]] / max(self.size)  # (H, W) each
        r = 0.22 if size == 'big' else 0.12
        cy, cx = {'left': (.5, .27), 'right': (.5, .73), 'top': (.27, .5), 'bottom': (.73, .5)}.get(place, (.5, .5))
        inside = {'disc': (y - cy) ** 2 + (x - cx) ** 2 < r ** 2, 'square': (abs(y - cy) < r) & (abs(x - cx) < r),
                  'triangle': (y - cy < r) & (y - cy > -r + 2 * abs(x - cx))}[shape]  # (H, W)
        img = np.where(inside[..., None], COLOURS[fg], COLOURS[bg]).astype(np.uint8)  # (H, W, 3)
        img = img.mean(-1, keepdims=True).astype(np.uint8) if self.in_chans == 1 else img
        img = torch.from_numpy(img).permute(2, 0, 1).contiguous()  # (C, H, W)
        tokens = self.tokenizer.encode(self.caption(idx), self.text_len) if self.tokenizer else None
        return (img if tokens is None else (img, *tokens)), SHAPES.index(shape), -1


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def visualize(model, batch, tokenizer, args, path):
    """original | masked input | reconstruction (visible pasted) for a fixed batch and masks; under each row its
    caption, hidden words as [true>predicted]. Targets are dataset-normalised: nothing hidden is used to show them."""
    was_training, (imgs, text, pad) = model.training, batch
    model.eval()
    g = torch.Generator().manual_seed(0)
    noise = [torch.rand(n, generator=g).to(imgs.device) for n in (model.grid[0] * model.grid[1], text.shape[1])]
    _, out = model(imgs, text, pad, noise=noise)
    mask, C = out['mask'][..., None], imgs.shape[1]  # (B, N, 1)
    mean, std = (torch.tensor(v, device=imgs.device).view(1, -1, 1, 1) for v in (args.mean, args.std))
    to_img = lambda t: unpatchify(t, model.patch, *model.grid, C) * std + mean  # noqa: E731
    target, pred = patchify(imgs, model.patch), out['pred'].float()  # (B, N, p*p*C)
    grey = patchify((torch.full_like(imgs, 0.5) - mean) / std, model.patch)
    w, rows = tokenizer.tokens, zip(*(v.tolist() for v in (text, out['logits'].argmax(-1), out['text_mask'], pad)))
    words = [' '.join(f'[{w[t]}>{w[q]}]' if m else w[t] for t, q, m, p in zip(*r) if not p) for r in rows]
    captions = ['\n'.join(textwrap.wrap(t, 60)) for t in words]  # fits under 3 columns of 128 px
    note = f'[true>predicted] = hidden words; accuracy on them {out["text_acc"]:.0%}'
    save_grid(path, [('original', to_img(target)), ('masked input', to_img(torch.where(mask, grey, target))),
                     ('reconstruction', to_img(torch.where(mask, pred, target)))], note, captions=captions)
    model.train(was_training)


# --------------------------------------------------------------------------- training


def main(args):
    check_args(args, MODELS, positive=('text_len', 'unpaired_len'),
               non_negative=('image_loss_weight', 'text_loss_weight', 'unpaired_text_weight'))
    args = dataclasses.replace(args, input_size=args.input_size or (INPUT_SIZE[args.model],))  # the preset's size
    patch = MODELS[args.model][0]
    H, W = pair(args.input_size)
    if H % patch or W % patch:
        raise SystemExit(f'--input_size {H} {W} is not divisible by the patch size {patch} of --model {args.model}')
    N, L = (H // patch) * (W // patch), args.text_len
    check_mask_ratio(args.mask_ratio, N - int(N * (1 - args.mask_ratio)), N, 'patches')  # as random_masking rounds
    if not 0 < args.text_mask_ratio <= 1 or L - int(L * (1 - args.text_mask_ratio)) < 1:  # all may be hidden
        raise SystemExit(f'--text_mask_ratio {args.text_mask_ratio} hides none of {L} text positions: give 0 < r <= 1')
    evaluate = Evaluation(args, features, synthetic=lambda n, seed: SyntheticPairs(n, (H, W), L, args.in_chans, seed))
    if args.eval_only:  # the image path alone: no vocabulary
        model = M3AE((H, W), *MODELS[args.model], 2, args.in_chans)
        return evaluate.only(model, lambda ckpt: from_encoder(ckpt, model))
    lines = read_lines(args.text_data, '--text_data') if args.text_data else None  # unpaired text, held in memory
    tokens = check_vocab(read_lines(args.vocab, '--vocab'), args.vocab) if args.vocab else None
    d, out = setup_run(args)  # process group, seeds + rank, output folder
    accum = accumulation(args, d)  # per-GPU x GPUs x accum = the paper's global batch
    lr = args.blr * args.global_batch / 256

    if args.data.startswith('synthetic'):  # synthetic[:N], default 10000 pairs
        dataset = SyntheticPairs(int(args.data.split(':')[1]) if ':' in args.data else 10000, args.input_size, L,
                                 args.in_chans, args.seed)
    else:  # ref: RandomResizedCrop(256, 0.2-1, bicubic) + flip; CC12M normalisation on the device
        dataset = CaptionedImages(args.data, args.input_size, L, args.in_chans, args.seed)
    if not args.vocab and (out / 'vocab.txt').is_file():  # a resumed run keeps its word vocabulary
        tokens = read_lines(out / 'vocab.txt', 'vocab')
    elif not args.vocab:  # [PAD], [UNK], then the words of the captions, most frequent first (saved below)
        texts = [dataset.caption(i) for i in range(len(dataset))] + (lines or [])
        counts = Counter(w for t in texts for w in basic_words(t))
        tokens = ['[PAD]', '[UNK]'] + sorted(counts, key=lambda w: (-counts[w], w))
    dataset.tokenizer = tokenizer = WordPiece(tokens)
    if isinstance(dataset, CaptionedImages):
        check_readable(dataset, 'image')
    loader, sampler = make_loader(dataset, args.batch_size, args.num_workers, d, args.seed)
    iters_per_epoch = len(sampler) // args.batch_size // accum * accum
    steps_per_epoch = iters_per_epoch // accum
    if steps_per_epoch == 0:
        raise SystemExit(f'{len(dataset)} images do not fill one global batch of {args.global_batch}')
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)

    weights = (args.image_loss_weight, args.text_loss_weight, args.unpaired_text_weight)
    model = M3AE((H, W), *MODELS[args.model], len(tokens), args.in_chans, args.mask_ratio, args.text_mask_ratio,
                 weights, max(L, args.unpaired_len)).to(d.device)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=args.betas,
                                  fused=True)  # fused: skips a non-finite step on the device
    autocast, scaler = amp_setup(args.amp, d.device)
    fresh = not args.resume and not (out / 'checkpoint.pth').exists()  # else resume() continues a run
    flax = fresh and args.init and Path(args.init).is_file() and load_flax(model, args.init)  # the reference's pickle
    step = resume(dataclasses.replace(args, init=None) if flax else args, model, optimizer, scaler, d)
    if d.main and not args.vocab:  # once the checkpoint (if any) was accepted; atomic, as other ranks may read it
        (out / 'vocab.tmp').write_text('\n'.join(tokens) + '\n', encoding='utf-8')
        os.replace(out / 'vocab.tmp', out / 'vocab.txt')
    fwd = torch.compile(model) if args.compile else model
    if d.world > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd, device_ids=[d.local_rank] if d.device.type == 'cuda' else None,
                                                  broadcast_buffers=False)  # constant position tables

    if d.main:
        print(json.dumps(dataclasses.asdict(args)))
        print(f'model {args.model}: {sum(p.numel() for p in params) / 1e6:.1f}M params, {N} patches + {L} text '
              f'positions, vocab {len(tokens)}; {len(dataset)} pairs{f", {len(lines)} texts" if lines else ""}, '
              f'{steps_per_epoch} steps/epoch')
        print(f'batch: {args.batch_size} per GPU x {d.world} GPUs x {accum} accum = {args.global_batch}; '
              f'lr = {args.blr:g} x {args.global_batch} / 256 = {lr:g}')

    mean, std = torch.tensor(args.mean, device=d.device), torch.tensor(args.std, device=d.device)
    vis = [torch.stack(t).to(d.device) for t in zip(*(dataset[(0, i % len(dataset))][0] for i in range(6)))]
    vis[0] = normalize(vis[0], mean, std)  # a fixed batch for the pictures
    one = [v[:1] for v in vis] + ([u[None] for u in tokenizer.encode(lines[0], args.unpaired_len)] if lines else [])
    flops = report_flops(d, count_flops(model, *one), args.global_batch, 'pair')  # one pair (+ one unpaired text)

    def save(epoch_done):  # collective; rank 0 writes the checkpoints and the pictures
        if save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done):
            name = f'vis_{step if epoch_done is None else epoch_done}.png'
            visualize(unwrap(model), vis, tokenizer, args, out / name)
            save_loss_curve(out / 'loss.png', out / 'log.jsonl')
            save_loss_curve(out / 'mlm_acc.png', out / 'log.jsonl', 'mlm_acc')  # masked-word accuracy
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
            (imgs, text, pad), _, bad_files = next(batches)  # bad_files: indices of unreadable images, else -1
            rng = random.Random(f'{args.seed}-{d.rank}-{epoch}-{it}')  # unpaired text: drawn with replacement
            picks = rng.choices(lines, k=args.batch_size) if lines else []
            unpaired = [torch.stack(u) for u in zip(*(tokenizer.encode(s, args.unpaired_len) for s in picks))]
            logger.wait += time.perf_counter() - t
            imgs = normalize(imgs.to(d.device, non_blocking=True), mean, std)  # (B, C, H, W)
            text, pad = text.to(d.device, non_blocking=True), pad.to(d.device, non_blocking=True)  # (B, L)
            unpaired = [u.to(d.device, non_blocking=True) for u in unpaired]  # (B, L_u) x2
            if it % accum == 0:  # per-iteration schedule from the fractional epoch
                for g in optimizer.param_groups:
                    g['lr'] = cosine_lr(epoch + it / iters_per_epoch, lr, args.min_lr, args.warmup_epochs, args.epochs)
            update = (it + 1) % accum == 0
            with fwd.no_sync() if d.world > 1 and not update else nullcontext():
                with autocast:
                    loss, extras = fwd(imgs, text, pad, *unpaired)
                scaler.scale(loss / accum).backward()
            logger.add(loss, bad_files, {'mlm_acc': extras['text_acc']})  # on the device until the next log step
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
    finish(d, out, step, stop, encoder_state_dict(unwrap(model)))  # encoder.pth, image path, timm's ViT layout
    return model


if __name__ == '__main__':
    main(parse_args(Args, demo=DEMO))
