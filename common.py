"""The shared substrate of the method files: patches, positions, ViT layers, and method-agnostic training plumbing.

Nothing here is the idea of a paper: masking, losses, targets and the training loop live in each method file.
Copy this file together with one method file and it runs.
"""
import argparse
import atexit
import collections
import dataclasses
import errno
import fcntl
import inspect
import json
import math
import os
import random
import re
import select
import signal
import socket
import sys
import threading
import time
import typing
import zipfile
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FONT = ImageFont.load_default()
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
LOCKS = {}  # lock file -> its open file, held while this process runs
WATCHDOG, STOP_SIGNALS = None, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}  # watchdog's thread; stop/save signals

# --------------------------------------------------------------------------- patches and positions


def patchify(imgs, p, t=1):
    """(B, C, H, W) -> (B, N, p*p*C), or (B, C, T, H, W) -> (B, N, t*p*p*C) with tubelets of t frames. Patches
    row-major (time-major for video), pixels in a patch row, column, then channel last, as MAE/VideoMAE flatten them."""
    if imgs.dim() == 4:
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)
    B, C, T, H, W = imgs.shape
    x = imgs.reshape(B, C, T // t, t, H // p, p, W // p, p)  # (B, C, T/t, t, h, p, w, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T/t, h, w, t, p, p, C)
    return x.reshape(B, (T // t) * (H // p) * (W // p), t * p * p * C)  # (B, N, t*p*p*C)


def unpatchify(x, p, h, w, C=3, t=1, T=None):
    """Inverse of `patchify`; h, w are the patch-grid sizes; T (frames) selects the video layout."""
    B = x.shape[0]
    if T is None:
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)  # (B, C, H, W)
    x = x.reshape(B, T // t, h, w, t, p, p, C).permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T/t, t, h, p, w, p)
    return x.reshape(B, C, T, h * p, w * p)  # (B, C, T, H, W)


def sincos_1d(dim, pos):
    """Fixed 1-D sin-cos code: (len(pos), dim), all sines then all cosines (MAE's get_1d_sincos_pos_embed_from_grid)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = pos.reshape(-1).double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()  # (M, dim)


def sincos_2d(dim, gh, gw, cls_token=False):
    """Fixed 2-D sin-cos table (gh*gw [+1], dim), row-major tokens. As in MAE, the first dim/2 channels encode the
    column (x), the last dim/2 the row (y); the cls row is zeros. Explicit 'ij' indexing: non-square grids are right."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')  # (gh, gw) each
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (gh*gw, dim)
    return torch.cat([torch.zeros(1, dim), emb]) if cls_token else emb


def pair(x):
    return tuple(x) * (2 // len(x)) if isinstance(x, (tuple, list)) else (x, x)


# --------------------------------------------------------------------------- ViT layers (timm's names)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv; `tubelet` > 0 makes it a Conv3d over (t, p, p) video cubes."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, tubelet=0):
        super().__init__()
        H, W = pair(img_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f'input size {H}x{W} is not divisible by the patch size {patch_size}')
        self.patch_size, self.grid_size = patch_size, (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        k = (tubelet, patch_size, patch_size) if tubelet else patch_size  # kernel = stride
        self.proj = (nn.Conv3d if tubelet else nn.Conv2d)(in_chans, embed_dim, k, k)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major (t, h, w) order


class Attention(nn.Module):
    """Multi-head self-attention through SDPA. `qv_bias`: no fused qkv bias but learned q_bias/v_bias and a zero
    k bias (BEiT, SimMIM-ViT, VideoMAE). `bias` in forward is an additive (B|1, heads|1, N, N) attention bias."""

    def __init__(self, dim, num_heads, qkv_bias=True, qv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias and not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        B, N, D = x.shape
        b = self.qkv.bias
        if self.q_bias is not None:
            b = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # (3D,)
        qkv = F.linear(x, self.qkv.weight, b).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        bias = None if bias is None else bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth per sample: drop the residual branch with probability p, rescale the kept ones."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)  # (B, 1, 1)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block. `init_values` > 0 adds BEiT's layer scale (`gamma_1`, `gamma_2`)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qv_bias=False, init_values=0.0,
                 drop_path=0.0, eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim)) if init_values > 0 else None
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim)) if init_values > 0 else None

    def forward(self, x, bias=None):
        a = self.attn(self.norm1(x), bias)
        x = x + drop_path(a if self.gamma_1 is None else self.gamma_1 * a, self.drop_path, self.training)
        m = self.mlp(self.norm2(x))
        return x + drop_path(m if self.gamma_2 is None else self.gamma_2 * m, self.drop_path, self.training)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias for a (gh, gw) grid plus a leading cls token: a zero-initialised table of
    (2gh-1)(2gw-1)+3 rows (the 3 extra: cls->token, token->cls, cls->cls), returned as (1, heads, N+1, N+1)."""

    def __init__(self, grid, num_heads):
        super().__init__()
        gh, gw = grid
        n_rel = (2 * gh - 1) * (2 * gw - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_rel + 3, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
        inner = (rel[..., 0] + gh - 1) * (2 * gw - 1) + (rel[..., 1] + gw - 1)  # (N, N)
        index = F.pad(inner, (1, 0, 1, 0))  # (N+1, N+1): row and column 0 for the cls token
        index[0, 0:], index[0:, 0], index[0, 0] = n_rel, n_rel + 1, n_rel + 2
        self.register_buffer('relative_position_index', index)

    def forward(self):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]  # (n*n, heads)
        return bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N+1, N+1)


# --------------------------------------------------------------------------- command line


def parse_args(Args, argv=None, demo=None):
    """Every field of the dataclass `Args` becomes a flag (`--name`; bools get `--no-name`; tuples take several
    values); the comment after a field is its help. `--demo` fills the fields of `demo` that were not given."""
    hints, src, module = typing.get_type_hints(Args), inspect.getsource(Args), sys.modules[Args.__module__]
    helps = dict(re.findall(r'^\s+(\w+):[^#\n]*#\s*(.*)$', src, re.M))
    models = getattr(module, 'MODELS', {})  # --help ends with the presets, under the comment that names their fields
    legend = re.search(r'((?:^#.*\n)*)^MODELS\b', inspect.getsource(module), re.M) if models else None
    fields = ' '.join(line.lstrip('# ') for line in legend.group(1).splitlines()) if legend else ''
    presets = 'presets for --model' + (f' ({fields})' if fields else '') + ':\n' + '\n'.join(
        f'  {name}: ' + (' '.join(f'{k}={x}' for k, x in v.items()) if isinstance(v, dict) else str(v))
        for name, v in models.items())
    parser = argparse.ArgumentParser(description=(module.__doc__ or '').split('\n')[0], epilog=presets,
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        t, default, h = hints[f.name], f.default, helps.get(f.name, '')
        h = f'{h} (default: {default})'.replace('%', '%%')  # argparse formats help with %
        inner = ([a for a in typing.get_args(t) if a is not type(None)] or [t])[0]  # Optional[X] -> X
        if t is bool:
            parser.add_argument(f'--{f.name}', action=argparse.BooleanOptionalAction, help=h)
        elif isinstance(default, tuple) or typing.get_origin(inner) is tuple:  # tuple[int, ...] or a tuple default
            elem = type(default[0]) if isinstance(default, tuple) else typing.get_args(inner)[0]
            parser.add_argument(f'--{f.name}', nargs='+', type=elem, help=h)
        else:
            parser.add_argument(f'--{f.name}', type=inner, help=h)
    given = vars(parser.parse_args(argv))
    if given.get('demo') and demo:  # under torchrun the demo's global batch is split over the processes
        world, total = int(os.environ.get('WORLD_SIZE', 1)), given.get('global_batch', demo.get('global_batch', 1))
        split = {'batch_size': max(1, min(demo['batch_size'], total // world))} if 'batch_size' in demo else {}
        given = {**demo, **split, **given}
    args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    if hasattr(args, 'data') and not args.data and not getattr(args, 'eval_only', False):
        parser.error('no data: give --data PATH (an image folder, or "synthetic"), or --demo for a quick CPU run')
    return args


# Shared flags and what they may be: a zero or negative size, count, rate or epoch is an error at start.
POSITIVE = ('batch_size', 'global_batch', 'epochs', 'input_size', 'log_every', 'save_every', 'keep_every',
            'max_bad_steps', 'blr', 'lr', 'std', 'dist_timeout', 'eval_max', 'eval_k', 'eval_t')
NON_NEGATIVE = ('warmup_epochs', 'min_lr', 'warmup_lr', 'weight_decay', 'clip_grad', 'num_workers', 'max_steps', 'seed')
BELOW_ONE = ('drop_path', 'betas')  # in [0, 1)


def check_args(args, models, positive=(), non_negative=()):
    """Stop at start, with one line, on a value the run cannot use: unknown --model/--amp, sizes and counts out of range
    (the shared ones above, the method's own; absent fields skipped), --in_chans not 1 or 3, wrong --mean/--std."""
    if args.model not in models:
        raise SystemExit(f'--model {args.model} is not one of {", ".join(models)}')
    for name, value in vars(args).items():  # inf or nan in any number: a run that trains NaN weights
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise SystemExit(f'--{name} {" ".join(map(str, values))}: must be a finite number')
    for flag in ('data', 'eval_data'):
        data = getattr(args, flag, None) or ''
        if data.startswith('synthetic') and not re.fullmatch(r'synthetic(:[1-9]\d*)?', data):
            raise SystemExit(f'--{flag} {data}: give synthetic or synthetic:N with N a number of images, e.g. '
                             f'synthetic:2048')
    if len(getattr(args, 'input_size', None) or (0,)) not in (1, 2):  # None: the preset's size
        raise SystemExit(f'--input_size {" ".join(map(str, args.input_size))}: give one size or two (H W)')
    if getattr(args, 'amp', None) not in (None, 'bf16', 'fp16', 'none'):
        raise SystemExit(f'--amp {args.amp} is not one of bf16, fp16, none')
    for names, ok, what in ((POSITIVE + tuple(positive), lambda v: v > 0, 'greater than 0'),
                            (NON_NEGATIVE + tuple(non_negative), lambda v: v >= 0, '0 or more'),
                            (BELOW_ONE, lambda v: 0 <= v < 1, 'in [0, 1)')):
        for name in names:
            value = getattr(args, name, None)
            values = value if isinstance(value, (tuple, list)) else (value,)
            if value is not None and not all(ok(v) for v in values):
                raise SystemExit(f'--{name} {" ".join(map(str, values))}: must be {what}')
    if (in_chans := getattr(args, 'in_chans', 3)) not in (1, 3):
        raise SystemExit(f'--in_chans {in_chans}: images are read as RGB (3) or grayscale (1)')
    if len(args.mean) != in_chans or len(args.std) != in_chans:
        raise SystemExit(f'--mean/--std need {in_chans} values for --in_chans {in_chans}')


def check_mask_ratio(ratio, n_hidden, n, unit, all_ok=False):
    """The method hides `n_hidden` of `n` units at --mask_ratio `ratio` (by its own rounding rule): at least one must
    be hidden and, unless `all_ok`, at least one left visible; otherwise stop with the valid range."""
    top = n if all_ok else n - 1
    if not (0 < ratio <= 1 and 1 <= n_hidden <= top):
        hides = f'hides {n_hidden} of {n} {unit}' if 0 < ratio <= 1 else f'is outside (0, 1{"]" if all_ok else ")"}'
        raise SystemExit(f'--mask_ratio {ratio} {hides}: give 0 < ratio {"<= 1" if all_ok else "< 1"} that hides '
                         f'1 to {top} of the {n} {unit}')


# --------------------------------------------------------------------------- distributed


def dist_env():
    """(world, rank, local rank) from torchrun's variables, checked: a stale or partial set stops with one line."""
    names = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK')
    try:
        world, rank, local = (int(os.environ.get(k, d)) for k, d in zip(names, (1, 0, 0)))
    except ValueError as e:
        raise SystemExit(f'WORLD_SIZE/RANK/LOCAL_RANK must be numbers ({e}): start with torchrun, or unset them')
    vars_ = ' '.join(f'{k}={os.environ[k]}' for k in names if k in os.environ)
    if not (0 <= rank < world and 0 <= local):
        raise SystemExit(f'{vars_}: no such process in a job of {world}; start with torchrun, or unset these '
                         f'variables to run as one process')
    if world > 1 and not {'MASTER_ADDR', 'MASTER_PORT'} <= set(os.environ):
        raise SystemExit(f'{vars_} are set but MASTER_ADDR/MASTER_PORT are not: start with torchrun (it sets them '
                         f'all), or unset these variables to run as one process')
    return world, rank, local


def init_distributed(timeout_min=10):
    """torchrun (single or multi-node) sets RANK/LOCAL_RANK/WORLD_SIZE; plain `python x.py` is one process. Meeting the
    other processes, and every collective after, waits at most `timeout_min` minutes (--dist_timeout)."""
    world, rank, local = dist_env()
    device = torch.device('cuda', local) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():  # once per process: a second group in one torchrun job can hang
        where = f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}'
        if rank == 0 and 'TORCHELASTIC_RUN_ID' not in os.environ:  # launched by hand: say what it waits for
            print(f'waiting up to {timeout_min:g} min (--dist_timeout) for the {world} processes to meet at {where}')
        try:
            dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=timedelta(minutes=timeout_min),
                                    device_id=device if device.type == 'cuda' else None)
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f'process {rank} of {world}: the others did not meet at {where} within {timeout_min:g} '
                             f'min (--dist_timeout): {str(e).splitlines()[0]}') from None
    return SimpleNamespace(rank=rank, local_rank=local, world=world, device=device, main=rank == 0)


def setup_run(args):
    """Process group, seeds + rank (data and masks differ across ranks), output folder, CUDA TF32 -> (d, output_dir)."""
    world, rank, _ = dist_env()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f'--output_dir {out} is a file, not a folder')
    try:  # every rank checks (they may be on different nodes); a shared folder is what resume needs
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write_test_{rank}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise SystemExit(f'--output_dir {out} cannot be written: {e.strerror or e}') from None
    if rank == 0:
        lock_output(out)
    try:
        d = init_distributed(getattr(args, 'dist_timeout', 10))
    except SystemExit:
        release_output(out)
        raise
    torch.manual_seed(args.seed + d.rank)
    random.seed(args.seed + d.rank)
    if d.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return d, out


def lock_output(out):
    """Rank 0 holds a lock on output_dir/.lock (the file says "pid host") while it runs, so a second run on the folder
    stops instead of interleaving its log and checkpoints. The system drops the lock when its process dies."""
    path, me = out.resolve() / '.lock', f'{os.getpid()} {socket.gethostname()}'
    while path not in LOCKS:
        f = open(path, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            pid, _, host = f.read().strip().partition(' ')
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SystemExit(f'--output_dir {out} is in use by process {pid} on {host} (its lock {path}): wait for '
                                 f'that run to end, or give another --output_dir') from None
            print(f'note: {path} cannot be locked on this file system ({e.strerror}): runs are not kept apart')
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:  # not removed meanwhile
            f.seek(0)
            old = f.read().strip()
            if old and old != me:
                print(f'note: taking over {path} from process {old} (pid host), which ended without releasing it')
            f.truncate(0)  # append mode: the write lands at 0
            f.write(me)
            f.flush()
            LOCKS[path] = f
            atexit.register(release_output, out)


def release_output(out):
    path = Path(out).resolve() / '.lock'
    if path in LOCKS:
        path.unlink(missing_ok=True)
        LOCKS.pop(path).close()


def amp_setup(amp, device):
    """(autocast, scaler) for --amp bf16, fp16 (+ GradScaler) or none (fp32); None: bf16 on CUDA, fp32 on the CPU."""
    amp = amp or ('bf16' if device.type == 'cuda' else 'none')
    if amp == 'none':
        return nullcontext(), torch.amp.GradScaler(enabled=False)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype), torch.amp.GradScaler(device.type, enabled=amp == 'fp16')


class Preemption:
    """SIGTERM/SIGUSR1 (schedulers' preemption notice) and Ctrl-C set a flag; the loop saves at the next log step and
    exits 0. A second Ctrl-C stops at once, without saving. Loader workers ignore these signals (`ignore_signals`), so
    a signal to the whole process group (timeout, scancel, Ctrl-C) reaches the main process alone."""

    def __init__(self):
        self.flag = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)
        global WATCHDOG
        if WATCHDOG is None:  # once per process
            r, w = os.pipe()
            os.set_blocking(w, False)
            signal.set_wakeup_fd(w)
            WATCHDOG = threading.Thread(target=watchdog, args=(r, os.getppid()), daemon=True)
            WATCHDOG.start()

    def handle(self, sig, frame):
        if sig == signal.SIGINT:
            if self.flag:
                raise KeyboardInterrupt
            print('interrupted: saving at the next log step (Ctrl-C again stops without saving)', file=sys.stderr)
        self.flag = True


def watchdog(fd, parent):
    """A thread that ends the process when the main thread cannot act, e.g. blocked in a collective whose peer is gone:
    on a second signal 5 s or more after the first (not the copy torchrun forwards of a signal to the whole group),
    or when the torchrun that started the process has died (an orphaned rank would otherwise wait forever)."""
    first, why = None, None
    while why is None:
        if select.select([fd], [], [], 5)[0] and STOP_SIGNALS & set(os.read(fd, 512)):  # signal numbers, one a byte
            first = first or time.monotonic()
            why = 'second signal: stopping now, without saving' if time.monotonic() - first >= 5 else None
        if 'TORCHELASTIC_RUN_ID' in os.environ and os.getppid() != parent:
            why = 'torchrun has gone: stopping'
    try:
        print(why, file=sys.stderr, flush=True)  # stderr may be a pipe nobody reads any more
    finally:
        os._exit(1)


def ignore_signals(worker_id=None):
    """DataLoader workers leave SIGTERM/SIGINT/SIGUSR1 to the main process, which saves and then shuts them down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------- data


def to_mode(img, in_chans):
    """Decode and convert any mode to RGB (or L for in_chans 1): 16/32-bit greys are scaled to 8 bits, not clipped;
    a palette with transparency goes through RGBA as PIL asks."""
    img.load()
    if img.mode.startswith('I') or img.mode == 'F':
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if img.mode.startswith('I;16') or a.max() > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), 'L')
    elif img.mode == 'P' and 'transparency' in img.info:
        img = img.convert('RGBA')
    mode = 'RGB' if in_chans == 3 else 'L'
    return img if img.mode == mode else img.convert(mode)


def random_resized_crop_params(W, H, scale, ratio, rng):
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and log-uniform aspect ratio, then
    a centre crop clamped to the ratio range. Returns (top, left, height, width)."""
    area, log_r = H * W, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    w = W if W / H <= max(ratio) else int(round(H * max(ratio)))  # the centre crop: the image, ratio clamped
    h = H if W / H >= min(ratio) else int(round(W / min(ratio)))
    return (H - h) // 2, (W - w) // 2, h, w


class ImageFiles(torch.utils.data.Dataset):
    """Images under `root` (its `train/` if present), found recursively, class subfolders optional. Items are (uint8
    (C, H, W) tensor, label, bad) as `read_or_next` makes them: RandomResizedCrop + optional flip, an unreadable file
    replaced by the next one; normalisation happens on the device."""

    def __init__(self, root, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bicubic', flip=True,
                 in_chans=3, seed=0):
        root = data_root(root)
        self.files = sorted(Path(folder, f) for folder, files, _ in scan(root, IMAGE_EXTENSIONS) for f in files)
        if not self.files:
            raise SystemExit(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found under {root}')
        classes = sorted({p.relative_to(root).parts[0] for p in self.files if len(p.relative_to(root).parts) > 1})
        cls_idx = {c: i for i, c in enumerate(classes)}
        self.labels = [cls_idx.get(p.relative_to(root).parts[0], 0) for p in self.files]
        self.size, self.scale, self.ratio, self.flip = pair(size), scale, ratio, flip
        self.resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'lanczos': Image.LANCZOS}[interpolation]
        self.in_chans, self.seed, self.warned = in_chans, seed, set()

    def __len__(self):
        return len(self.files)

    def load(self, idx, rng):
        img = Image.open(self.files[idx])
        W0, H0 = img.size
        top, left, h, w = random_resized_crop_params(W0, H0, self.scale, self.ratio, rng)
        out_h, out_w = self.size
        if img.format == 'JPEG':  # decode at 1/2, 1/4 or 1/8 scale while the crop still covers the output size
            img.draft('RGB' if self.in_chans == 3 else 'L', (math.ceil(W0 * out_w / w), math.ceil(H0 * out_h / h)))
        img = to_mode(img, self.in_chans)
        fx, fy = img.size[0] / W0, img.size[1] / H0
        img = img.resize((out_w, out_h), self.resample, box=(left * fx, top * fy, (left + w) * fx, (top + h) * fy))
        x = torch.from_numpy(np.array(img, dtype=np.uint8).reshape(out_h, out_w, self.in_chans)).permute(2, 0, 1)
        return x.flip(-1) if self.flip and rng.random() < 0.5 else x  # (C, H, W)

    def __getitem__(self, key):
        return read_or_next(self, key, 'image')


def data_root(root):
    """--data: the folder, or its train/ when it has one."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f'--data {root}: ' + ('is a file, not a folder' if root.exists() else 'does not exist') +
                         ' (give a data folder, or --data synthetic)')
    return root / 'train' if (root / 'train').is_dir() else root


def scan(root, extensions):
    """[(folder, [regular files with these extensions], has subfolders)] under root, following links but each real
    folder and file once (a link up the tree cannot loop); what is left out (duplicates, FIFOs) is counted and said."""
    found, seen, stack, dup, odd = [], set(), [str(root)], 0, 0
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            entries = list(os.scandir(folder))
        except OSError:
            odd += 1
            continue
        if (st.st_dev, st.st_ino) in seen:  # a folder met before, under another path
            dup += 1
            continue
        seen.add((st.st_dev, st.st_ino))
        names, subs = [], [e.path for e in entries if e.is_dir()]
        for e in entries:
            if e.name.lower().endswith(extensions) and not e.is_dir():
                try:
                    ok = e.is_file()
                    key = (e.stat().st_dev, e.stat().st_ino) if e.is_symlink() else (st.st_dev, e.inode())
                except OSError:  # a broken link
                    ok = False
                if not ok:
                    odd += 1
                elif key in seen:
                    dup += 1
                else:
                    seen.add(key)
                    names.append(e.name)
        stack += sorted(subs, reverse=True)
        found.append((folder, names, bool(subs)))
    if dup or odd:
        print(f'note: under {root}, left out {dup} duplicate path(s) of files or folders already found (links) and '
              f'{odd} entr(ies) that are not regular files', file=sys.stderr)
    return found


def read_or_next(dataset, key, what):
    """An item (x, label, bad) of a file dataset (with `files`, `labels`, `seed`, `warned`, `load(i, rng)`). For an
    unreadable file the next readable one stands in (warned once), `bad` its index (else -1): the loop counts each
    once. The randomness is a function of (seed, epoch, index), so a resumed run sees the same crops."""
    epoch, idx = key if isinstance(key, tuple) else (0, key)
    n, warned = len(dataset.files), dataset.warned
    for k in range(n):
        i = (idx + k) % n
        try:
            return dataset.load(i, random.Random(f'{dataset.seed}-{epoch}-{i}')), dataset.labels[i], idx if k else -1
        except Exception as e:  # unreadable: warn, use the next file
            if i not in warned:
                warned.add(i)
                print(f'warning: skipping unreadable {what} {dataset.files[i]}: {type(e).__name__}: {e}',
                      file=sys.stderr)
    raise RuntimeError(f'no readable {what} among the {n}')


def check_readable(dataset, what):
    """At start: stop with one line when no file of the dataset can be read (reads files until one can)."""
    first = None
    for i in range(len(dataset.files)):
        try:
            dataset.load(i, random.Random(0))
            return
        except Exception as e:
            first = first or f'{dataset.files[i]}: {type(e).__name__}: {e}'
    raise SystemExit(f'0 of {len(dataset.files)} {what} files could be read; first error: {first}')


class SyntheticImages(torch.utils.data.Dataset):
    """Deterministic procedural images (gradient background, striped texture, 1-3 shapes) with a class label
    (the shape of the largest one). Same (uint8 tensor, label, bad = -1) items as `ImageFiles`; any size, no files."""

    def __init__(self, n, size, in_chans=3, seed=0):
        self.n, self.size, self.in_chans, self.seed = n, pair(size), in_chans, seed

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        idx = key[1] if isinstance(key, tuple) else key
        rng = np.random.default_rng([self.seed, idx])
        H, W = self.size
        y, x = np.mgrid[0:H, 0:W] / max(H, W)  # (H, W) each, in [0, 1)
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * x + np.sin(a) * y)[..., None]  # (H, W, 1)
        img = (1 - t) * rng.uniform(0, 1, 3) + t * rng.uniform(0, 1, 3)  # (H, W, 3) gradient
        f, b = rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
        img += 0.15 * np.sin(f * (np.cos(b) * x + np.sin(b) * y))[..., None]  # stripes
        areas = []
        for _ in range(rng.integers(1, 4)):
            kind, (cy, cx), r = rng.integers(3), rng.uniform(0.15, 0.85, 2), rng.uniform(0.08, 0.3)
            inside = ((y - cy) ** 2 + (x - cx) ** 2 < r ** 2,  # disc
                      (abs(y - cy) < r) & (abs(x - cx) < r * 0.7),  # rectangle
                      (y - cy < r) & (y - cy > -r + 2 * abs(x - cx)))[kind]  # triangle
            img[inside] = rng.uniform(0, 1, 3)
            areas.append((inside.sum(), kind))
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)  # (H, W, 3)
        if self.in_chans == 1:
            img = img.mean(-1, keepdims=True).astype(np.uint8)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), int(max(areas)[1]), -1  # (C, H, W)


class EpochSampler(torch.utils.data.Sampler):
    """Shards a per-epoch permutation over ranks (drop_last) and yields (epoch, index) keys, so the dataset's
    augmentation is reproducible; `skip` resumes inside an epoch."""

    def __init__(self, n, rank, world, seed, shuffle=True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        mine = order[:self.n // self.world * self.world][self.rank::self.world][self.skip:]  # drop_last
        return iter([(self.epoch, int(i)) for i in mine])

    def __len__(self):
        return self.n // self.world - self.skip


def image_dataset(args, scale, interpolation, flip=True):
    """`--data synthetic` (or `synthetic:N` for N images, default 10000), else an image folder."""
    if args.data.startswith('synthetic'):  # check_args made sure it is synthetic or synthetic:N
        n = int(args.data.split(':')[1]) if ':' in args.data else 10000
        return SyntheticImages(n, args.input_size, args.in_chans, args.seed)
    dataset = ImageFiles(args.data, args.input_size, scale, interpolation=interpolation, flip=flip,
                         in_chans=args.in_chans, seed=args.seed)
    check_readable(dataset, 'image')
    return dataset


def make_loader(dataset, batch_size, num_workers, d, seed):
    sampler = EpochSampler(len(dataset), d.rank, d.world, seed)
    if len(sampler) < batch_size:
        raise SystemExit(f'{len(dataset)} images over {d.world} process(es) do not fill one batch of {batch_size}')
    return torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        pin_memory=d.device.type == 'cuda', persistent_workers=num_workers > 0, worker_init_fn=ignore_signals,
        generator=torch.Generator()), sampler  # its own generator: the loader never draws from the training RNG


def normalize(imgs, mean, std):
    """uint8 (B, C, ...) on the device -> float, ImageNet-style normalised (done here, not in the workers)."""
    shape = (1, -1) + (1,) * (imgs.dim() - 2)  # mean/std: sequences, or tensors already on the device (no copy)
    mean, std = (torch.as_tensor(v, dtype=torch.float, device=imgs.device).view(shape) for v in (mean, std))
    return (imgs.float() / 255 - mean) / std


# --------------------------------------------------------------------------- optimisation


def cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs, warmup_lr=0.0):
    """Linear warmup from warmup_lr, then half-cosine to min_lr; `epoch` is fractional (MAE util/lr_sched.py)."""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def param_groups(model, weight_decay, skip=()):
    """timm's add_weight_decay: no decay for 1-D params, '.bias' names and `skip`; frozen params left out.
    Groups in the reference's order: [no_decay, decay]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith('.bias') or name in skip else decay).append(p)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def optimizer_step(optimizer, scaler, params, clip_grad=None):
    """Unscale (fp16), measure the global grad norm, clip if asked, and step unless the norm is non-finite. The skip
    happens on the device (a fused AdamW reads `found_inf`; other optimizers refuse it): no host sync.
    Returns (grad_norm, skipped) as device tensors."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    skipped = ~torch.isfinite(norm)
    if clip_grad:
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.found_inf = skipped.float()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


# --------------------------------------------------------------------------- checkpoints


def unwrap(model):
    """The bare module under DDP and torch.compile, so state-dict keys carry no 'module.' / '_orig_mod.'."""
    model = model.module if hasattr(model, 'module') else model
    return getattr(model, '_orig_mod', model)


def accumulation(args, d):
    """Gradient accumulation so that per-GPU batch x GPUs x accum = --global_batch (the paper's batch)."""
    accum = args.global_batch // (args.batch_size * d.world)
    if accum < 1 or accum * args.batch_size * d.world != args.global_batch:
        raise SystemExit(f'--global_batch {args.global_batch} is not a multiple of --batch_size {args.batch_size} x '
                         f'{d.world} processes')
    return accum


def resume(args, model, optimizer, scaler, d, check=lambda ckpt: None):
    """Continue from --resume, or from output_dir/checkpoint.pth when it exists (a restarted job resumes by itself);
    otherwise start from --init weights if given; returns the step to continue from. A file that is not this method's
    and model's training state (or that `check(ckpt)` objects to, in words) stops the run, and is left as it is."""
    last = Path(args.output_dir) / 'checkpoint.pth'
    path = args.resume or (last if last.exists() else None)
    if path is None:
        if args.init:
            load_weights(model, args.init)
        return 0
    flag = '--resume' if args.resume else 'resuming'
    ckpt = load_checkpoint(path, flag)
    if not isinstance(ckpt, dict) or not {'model', 'optimizer', 'step'} <= set(ckpt):
        raise SystemExit(f'{flag} {path}: not a training checkpoint of these files (no model/optimizer/step); to '
                         f'start from its weights use --init {path}')
    ours, theirs = Path(inspect.getfile(type(args))).name, ckpt.get('method')  # the file of Args: mae.py, ...
    saved_model = (ckpt.get('args') or {}).get('model')
    if theirs and (theirs != ours or saved_model != args.model):
        raise SystemExit(f'{flag} {path}: written by {theirs} --model {saved_model}, this is {ours} --model '
                         f'{args.model}; resume with the same file and model, or give another --output_dir')
    own = model.state_dict()
    sd = ckpt['model'] if isinstance(ckpt['model'], dict) else {}
    misfit = {'missing': sorted(set(own) - set(sd)), 'extra': sorted(set(sd) - set(own)),
              'of another shape': [k for k in own if k in sd and own[k].shape != sd[k].shape]}
    if any(misfit.values()):  # checked before loading, so the model is never half-loaded
        raise SystemExit(f'{flag} {path}: its model does not fit {ours} --model {args.model}: ' + '; '.join(
            f'{len(v)} {k}, e.g. {v[:2]}' for k, v in misfit.items() if v))
    if problem := check(ckpt):
        raise SystemExit(f'{flag} {path}: {problem}')
    model.load_state_dict(sd)
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if len(ckpt['rng']) != d.world:
        print(f'note: checkpoint has RNG states of {len(ckpt["rng"])} ranks, this run has {d.world}: RNG reseeded')
    else:
        rng = ckpt['rng'][d.rank]
        torch.set_rng_state(rng['torch'])
        random.setstate(rng['python'])
        if rng['cuda'] is not None and d.device.type == 'cuda':
            torch.cuda.set_rng_state(rng['cuda'])
    if d.main:
        print(f'resumed from {path} at step {ckpt["step"]}')
    return ckpt['step']


def save_training_state(args, d, model, optimizer, scaler, step, steps_per_epoch, epoch_done, extra=None):
    """output_dir/checkpoint.pth (with the entries of `extra`), plus checkpoint-<epoch>.pth every --keep_every epochs
    and at the last. Collective (every rank's RNG state is gathered: each draws its own masks); only rank 0 writes,
    and it alone gets True back. Weights not all finite are never saved: every rank stops, the file keeps the last."""
    out = Path(args.output_dir)
    check_finite(unwrap(model).state_dict(), out / 'checkpoint.pth')
    mine = {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'cuda': torch.cuda.get_rng_state() if d.device.type == 'cuda' else None}
    states = [mine] * d.world
    if d.world > 1:
        dist.all_gather_object(states, mine)
    if not d.main:
        return False
    ckpt = {'model': unwrap(model).state_dict(), 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'epoch': step / steps_per_epoch, 'step': step, 'args': dataclasses.asdict(args), 'rng': states,
            'method': Path(inspect.getfile(type(args))).name, **(extra or {})}  # another method file refuses it
    save_checkpoint(out / 'checkpoint.pth', ckpt)
    if epoch_done is not None and (epoch_done % args.keep_every == 0 or epoch_done == args.epochs):
        save_checkpoint(out / f'checkpoint-{epoch_done}.pth', ckpt)
    return True


def finish(d, out, step, stop, encoder):
    """The end of main(): after a preemption say how to resume; otherwise rank 0 writes `encoder` (the encoder's
    state dict, in the layout the method's fine-tuning code loads) to output_dir/encoder.pth. Closes the group."""
    if d.main and stop == 'preempted':
        print(f'preempted at step {step}: saved {out / "checkpoint.pth"}; the same command resumes')
    elif d.main:  # the end, or --max_steps
        save_checkpoint(out / 'encoder.pth', {'model': check_finite(encoder, out / 'encoder.pth')})
    if d.main:
        release_output(out)
    close_group()


def close_group():
    """Leave the process group. A gloo worker thread frees a finished collective's tensors just after wait() returns
    in the main thread; freeing one that Python made takes the GIL, and a thread that asks for it once the interpreter
    is shutting down exits inside a C++ destructor, which aborts the process (SIGABRT, "terminate called without an
    active exception"). So: a barrier, then wait with the GIL released until gloo's workers are all asleep."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        settle_workers()


def gloo_worker_states():
    """The scheduler state ('R' running or runnable, 'S' asleep, ...) of this process's gloo worker threads (none
    without /proc)."""
    states = []
    for task in Path('/proc/self/task').glob('*'):
        try:
            if (task / 'comm').read_text().strip() == 'pt_gloo_runloop':
                states.append((task / 'stat').read_text().rsplit(')', 1)[1].split()[0])
        except OSError:  # the thread ended meanwhile
            pass
    return states


def settle_workers(states=gloo_worker_states, poll=0.005, quiet=3, limit=2.0):
    """Sleep until every gloo worker thread has been asleep for `quiet` polls in a row, at most `limit` seconds."""
    calm, end = 0, time.monotonic() + limit
    while calm < quiet and time.monotonic() < end:
        time.sleep(poll)
        calm = calm + 1 if all(s == 'S' for s in states()) else 0
    return calm >= quiet


def check_finite(state_dict, path):
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f'stopping: {len(bad)} weight tensors are not finite (e.g. {bad[0]}), so {path} is not '
                         f'written{" and keeps the last good state" if Path(path).exists() else ""}; if it recurs, '
                         f'lower the learning rate or try --amp bf16 or --amp none')
    return state_dict


def save_checkpoint(path, obj):
    """Atomic: write a temp file then rename, so a kill mid-write never leaves a broken checkpoint. A failed write
    (disk full, quota) stops with one line and leaves the previous file as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        why = getattr(e, 'strerror', None) or 'the write stopped short: disk full, quota or a file-size limit?'
        raise SystemExit(f'saving {path} failed ({why}); ' + (f'the previous {path.name} is intact' if path.exists()
                         else 'no earlier copy existed')) from None


def load_weights(model, path, convert=lambda ckpt: None):
    """--init: start from weights (our checkpoint, an encoder.pth, or a reference release), keys as the reference
    names them: 'module.' stripped, an encoder.pth's keys get the model's 'encoder.' prefix back, tensors of another
    shape (e.g. pos tables) left out. SlowFast's .pyth files (MaskFeat) keep them under 'model_state'; `convert(loaded)`
    may give the state dict of a release in another layout (I-JEPA's), or None."""
    ckpt = load_checkpoint(path)
    if (sd := convert(ckpt)) is None:
        sd = ckpt.get('model', ckpt.get('model_state', ckpt.get('module', ckpt))) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        held = (f'a bare tensor of shape {tuple(sd.shape)}' if isinstance(sd, torch.Tensor) else
                f'a dict with a {next(type(v).__name__ for v in sd.values() if not isinstance(v, torch.Tensor))} value'
                if isinstance(sd, dict) else f'a {type(sd).__name__}')
        raise SystemExit(f'--init {path}: holds {held}, not a state dict of named tensors (nor one under "model")')
    sd = {k.removeprefix('module.'): v for k, v in sd.items()}
    own = model.state_dict()
    sd = {f'encoder.{k}' if k not in own and f'encoder.{k}' in own else k: v for k, v in sd.items()}
    shape_mismatch = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    res = model.load_state_dict({k: v for k, v in sd.items() if k not in shape_mismatch}, strict=False)
    loaded = len(sd) - len(shape_mismatch) - len(res.unexpected_keys)
    if loaded == 0:
        raise SystemExit(f'--init {path}: no tensor matches this model (keys like {list(sd)[:3]})')
    print(f'--init {path}: loaded {loaded} tensors; not in the file (kept as initialised): {len(res.missing_keys)} '
          f'{res.missing_keys[:6]}; ignored: {res.unexpected_keys[:6]}; shape differs: {shape_mismatch}')
    return res


def load_checkpoint(path, flag='--init'):
    """weights_only load. Reference checkpoints keep their configuration in an argparse.Namespace (MAE, BEiT) or a
    yacs CfgNode (SimMIM); the latter is read as a plain OrderedDict, so yacs is not needed. A missing, truncated or
    foreign file stops with one line that names it (`flag` says which option gave it)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f'{flag} {path}: no such file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace, (collections.OrderedDict, 'yacs.config.CfgNode')]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'{flag} {path}: {checkpoint_problem(path, e)}') from None


def checkpoint_problem(path, error):
    """Why torch.load failed, in words: cut short, a pickle of Python objects (never run: it could execute code), or
    not a checkpoint at all."""
    with open(path, 'rb') as f:
        head = f.read(4)
    size = path.stat().st_size
    detail = f'{type(error).__name__}: ' + re.sub(r'\x1b\[[0-9;]*m', '', str(error)).strip().split('\n')[0][:200]
    if size == 0:
        return 'is empty (0 bytes)'
    if head == b'PK\x03\x04' and not zipfile.is_zipfile(path):
        return f'looks cut short ({size} bytes, the end of the archive is missing): an interrupted copy or save?'
    if found := re.search(r'GLOBAL ([\w.]+)', str(error)):  # torch leaves out the module of builtins
        name = found.group(1) if '.' in found.group(1) else f'builtins.{found.group(1)}'
        return (f'holds Python objects ({name}), not only tensors; refused, since loading them could run code. '
                f'Save its state_dict() instead')
    if head[:2] == b'\x80\x02':  # torch.save(_use_new_zipfile_serialization=False): a pickle of protocol 2
        return f'is in torch\'s legacy (pre-1.6) format and cannot be read ({detail})'
    if head != b'PK\x03\x04':
        return f'not a PyTorch checkpoint ({size} bytes beginning {head!r})'
    return f'cannot be read ({detail})'


# --------------------------------------------------------------------------- logging and pictures


def peak_tflops(gpu_name):
    """The dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s of a GPU, from NVIDIA's datasheets; 0: unknown."""
    peaks = {'H100 PCIe': 756, 'H100 NVL': 835, 'H100': 989, 'H200 NVL': 835, 'H200': 989, 'GH200': 989, 'A100': 312,
             'L40S': 362}  # the first found in gpu_name as a word: 'NVIDIA H100 80GB HBM3' is an H100 SXM
    return next((v for k, v in peaks.items() if re.search(rf'\b{k}\b', gpu_name)), 0)


def count_flops(module, *inputs):
    """FLOPs (2 per multiply-add) of `module(*inputs)` and of the backward of its first output if that needs gradients
    (a training loss), on fake tensors: nothing computed, the RNG untouched, no gradient kept; attention as matmuls."""
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        out = module(*inputs)
        if out[0].requires_grad:
            out[0].backward()
    module.zero_grad(set_to_none=True)  # the fake gradients
    return c.get_total_flops()


def report_flops(d, flops, global_batch, unit='img', **frozen):
    """Print the training FLOPs per image and per optimizer step, a frozen network's forward (BEiT's tokenizer, MILAN's
    teacher: GPU work too) split out. Returns the total per image, for the Logger's TFLOP/s and MFU."""
    total = flops + sum(frozen.values())
    if d.main:
        print(f'train GFLOPs per {unit}: model {flops / 1e9:.4g} (forward + backward)' + ''.join(
            f' + {k} {v / 1e9:.4g} (frozen, forward only: {v / flops:.0%} of the model)' for k, v in frozen.items())
            + f' = {total / 1e9:.4g}; x {global_batch} per optimizer step = {total * global_batch / 1e12:.4g} TFLOP')
    return total


class Logger:
    """The loop's bookkeeping between log steps, on the device (no per-step host sync): loss and metric sums (e.g.
    BEiT's masked-token accuracy), micro-steps, unreadable files, the run of non-finite steps. `log_step` agrees on
    averages and preemption (one all-reduce), prints a line (ending in `note`), appends it to output_dir/log.jsonl."""

    def __init__(self, output_dir, d, step, unit='img', note='', flops=0.0):
        self.d, self.path, self.last_step, self.unit, self.note = d, Path(output_dir) / 'log.jsonl', step, unit, note
        gpu = torch.cuda.get_device_name(d.device) if d.device.type == 'cuda' else ''
        self.flops, self.peak = flops, peak_tflops(gpu)  # training FLOPs per image (report_flops), the GPU's peak
        self.last, self.wait, self.preempt = time.perf_counter(), 0.0, Preemption()
        self.loss_sum, self.micro, self.bad_files, self.new_bad = torch.zeros((), device=d.device), 0, set(), set()
        self.metrics = {}  # name -> device sum over micro-steps; every rank adds the same names
        self.bad_total, self.bad_run = torch.zeros((), device=d.device), torch.zeros((), device=d.device)

    def add(self, loss, bad, metrics=None):
        """After each micro-step: its loss, the loader's (CPU) `bad` column (indices of unreadable files, else -1) and
        optionally {name: device scalar} metrics, logged as their average like the loss."""
        self.loss_sum += loss.detach().float()
        for k, v in (metrics or {}).items():
            self.metrics[k] = self.metrics.get(k, 0) + v.detach().float()
        self.micro += 1
        self.new_bad.update(bad[bad >= 0].tolist())

    def stepped(self, bad):
        """After each optimizer step: `bad` is optimizer_step's skipped flag (a device tensor)."""
        self.bad_total += bad
        self.bad_run = (self.bad_run + 1) * bad

    def log_step(self, epoch, step, total_steps, lr, global_batch, max_bad_steps):
        """'preempted' when any rank got SIGTERM/SIGUSR1/Ctrl-C; stops after max_bad_steps bad steps in a row."""
        host = torch.tensor([self.micro, len(self.new_bad), float(self.preempt.flag)], device=self.d.device)
        names = sorted(self.metrics)  # (4 + metrics,): micro-steps, new bad files, preempted, loss and metric sums
        summed = torch.cat([host, torch.stack([self.loss_sum] + [self.metrics[k] for k in names])])
        if self.d.world > 1:
            dist.all_reduce(summed)
        if summed[1].item() > 0:  # some rank met unreadable files: the union, so each counts once
            found = [self.new_bad] * self.d.world
            if self.d.world > 1:
                dist.all_gather_object(found, self.new_bad)
            self.bad_files.update(*found)
            self.new_bad = set()
        now = time.perf_counter()
        dt, n = now - self.last, step - self.last_step
        avg = dict(zip(['loss'] + names, (summed[3:] / summed[0]).tolist()))
        rec = dict(epoch=round(epoch, 4), step=step, total_steps=total_steps, **avg, lr=lr,
                   img_per_s=n * global_batch / dt, data_wait=self.wait / dt,
                   mem_gb=torch.cuda.max_memory_allocated() / 2**30 if self.d.device.type == 'cuda' else 0.0,
                   skipped=len(self.bad_files), bad_steps=int(self.bad_total.item()),
                   eta_s=dt / max(n, 1) * (total_steps - step))
        if self.flops:  # achieved training FLOP/s per GPU; MFU against the GPU's dense bf16 peak when it is known
            rec['tflops'] = self.flops * rec['img_per_s'] / self.d.world / 1e12
            if self.peak:
                rec['mfu'] = rec['tflops'] / self.peak
        if self.d.main:
            eta = rec['eta_s']
            print(f"ep {rec['epoch']} step {step}/{total_steps} " + ''.join(f'{k} {v:.4f} ' for k, v in avg.items())
                  + f"lr {lr:.3g} {rec['img_per_s']:.1f} {self.unit}/s "
                  + (f"{rec['tflops']:.3g} TFLOP/s/GPU " if 'tflops' in rec else '')
                  + (f"MFU {rec['mfu']:.1%} " if 'mfu' in rec else '') + f"data {rec['data_wait']:.0%} "
                  f"mem {rec['mem_gb']:.1f}G skipped {rec['skipped']} bad {rec['bad_steps']} eta {int(eta // 3600)}:"
                  f"{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}{self.note}", flush=True)
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
        self.last, self.wait, self.last_step = now, 0.0, step
        self.loss_sum, self.micro, self.metrics = torch.zeros_like(self.loss_sum), 0, {}
        if self.bad_run.item() >= max_bad_steps:  # the checkpoint on disk predates the bad run: resume from it
            last = self.path.parent / 'checkpoint.pth'
            again = f'Resume from {last} (the last good state)' if last.exists() else 'No checkpoint was saved before'
            raise SystemExit(f'stopping: {max_bad_steps} steps in a row had a non-finite loss or gradient (skipped). '
                             f'{again}; if it recurs, lower the learning rate or try --amp bf16 or --amp none.')
        return 'preempted' if summed[2].item() > 0 else None


def save_grid(path, columns, note='', pad=2, min_width=128, captions=None):
    """columns: list of (title, (B, C, H, W) float tensor in [0, 1]); one row per sample, titles on top, an optional
    note below and optional `captions` (one text per row) under each row; small images enlarged so the titles fit."""
    titles, ims = zip(*columns)
    s = max(1, math.ceil(min_width / ims[0].shape[-1]))
    ims = [F.interpolate(im.detach().float().cpu(), scale_factor=s, mode='nearest') for im in ims]
    B, _, H, W = ims[0].shape
    tall = lambda text: ImageDraw.Draw(Image.new('1', (1, 1))).multiline_textbbox((0, 0), text, font=FONT)[3]  # noqa
    head, foot = max(tall(t) for t in titles) + 4, tall(note) + 6 if note else 0
    row = H + pad + (max(tall(c) for c in captions) + 4 if captions else 0)  # an image row and its caption
    canvas = Image.new('RGB', (len(ims) * (W + pad) + pad, head + B * row + pad + foot), 'white')
    draw = ImageDraw.Draw(canvas)
    for c, (title, im) in enumerate(zip(titles, ims)):
        draw.multiline_text((pad + c * (W + pad), 1), title, fill='black', font=FONT)
        im = (im.clamp(0, 1) * 255).round().byte()
        im = im.expand(-1, 3, -1, -1) if im.shape[1] == 1 else im
        for r in range(B):
            canvas.paste(Image.fromarray(im[r].permute(1, 2, 0).numpy()), (pad + c * (W + pad), head + pad + r * row))
    for r, caption in enumerate(captions or []):
        draw.multiline_text((pad, head + pad + r * row + H + 2), caption, fill='black', font=FONT)
    if note:
        draw.multiline_text((pad, canvas.height - foot + 2), note, fill='black', font=FONT)
    canvas.save(path)


def save_loss_curve(path, log_path, key='loss', size=(640, 360)):
    """The training loss (or another logged `key`) against step, from log.jsonl."""
    recs = [json.loads(line) for line in open(log_path)] if Path(log_path).exists() else []
    pts = [(r['step'], r[key]) for r in recs if math.isfinite(r.get(key, math.nan))]
    W, H, m = size[0], size[1], 40
    img = Image.new('RGB', size, 'white')
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline='black')
    if len(pts) >= 2:
        xs, ys = zip(*pts)
        (x0, x1), (y0, y1) = (min(xs), max(xs)), (min(ys), max(ys))
        sx, sy = (W - 1.5 * m) / max(x1 - x0, 1), (H - 1.5 * m) / max(y1 - y0, 1e-12)
        d.line([(m + (x - x0) * sx, H - m - (y - y0) * sy) for x, y in pts], fill='blue', width=2)
        d.text((m, H - m + 4), f'step {x0}', fill='black', font=FONT)
        d.text((W - m // 2 - d.textlength(f'{x1}', font=FONT), H - m + 4), f'{x1}', fill='black', font=FONT)
        d.text((2, m // 2), f'{y1:.3g}', fill='black', font=FONT)
        d.text((2, H - m - 10), f'{y0:.3g}', fill='black', font=FONT)
    d.text((W // 2 - 30, 4), f'training {key}', fill='black', font=FONT)
    img.save(path)


# --------------------------------------------------------------------------- evaluation: online k-NN, linear probe


class Evaluation:
    """--eval_data: labelled items (`folder(root)`, `synthetic(n, seed)`; default: the largest centred crop, no flip),
    up to --eval_max of train and of val, embedded each call by `features(model, x) -> (B, D)` over the ranks (eval
    mode, no grad, the run's autocast, RNG restored); rank 0 logs DINO's k-NN top-1 (+ linear probe if `final`)."""

    def __init__(self, args, features, folder=None, synthetic=None):
        self.args, self.features, self.sets, (H, W), data = args, features, [], pair(args.input_size), args.eval_data
        C = getattr(args, 'in_chans', 3)
        if args.eval_only and not (args.init and data):
            raise SystemExit('--eval_only needs --init PATH (a checkpoint or encoder.pth) and --eval_data DIR')
        folder = folder or (lambda r: ImageFiles(r, (H, W), (1, 1), (W / H,) * 2, flip=False, in_chans=C))
        if not data:
            return
        if data.startswith('synthetic'):  # another seed than the training images'
            n = int(data.split(':')[1]) if ':' in data else 1000
            sets = [(synthetic or (lambda n, s: SyntheticImages(n, (H, W), C, s)))(n, args.seed + 1)]
        elif not Path(data).is_dir():
            raise SystemExit(f'--eval_data {data}: no such folder (give one with class subfolders, or synthetic:N)')
        else:  # its train/ and val/, else the folder (or its train/ alone)
            try:
                both = all((Path(data) / s).is_dir() for s in ('train', 'val'))
                sets = [folder(Path(data) / s) for s in ('train', 'val')] if both else [folder(data)]
                [check_readable(ds, '--eval_data') for ds in sets]
            except SystemExit as e:
                raise SystemExit(f'--eval_data {data}: {e.code}') from None
            if min(len(set(ds.labels)) for ds in sets) < 2:
                raise SystemExit(f'--eval_data {data}: no class subfolders (a label is the first subfolder\'s name)')
        seen = collections.Counter()  # one set: each class's every 5th file in name order (synthetic: item) is val
        val = [seen.update([y]) or seen[y] % 5 == 0 for y in getattr(sets[0], 'labels', [0] * len(sets[0]))]
        sets = [(ds, range(len(ds))) for ds in sets] if len(sets) == 2 else [
            (sets[0], [i for i, v in enumerate(val) if v == w]) for w in (False, True)]
        if min(len(i) for _, i in sets) == 0:
            raise SystemExit(f'--eval_data {data}: an empty split: give val/, or 5 or more files per class')
        self.sets = [(ds, list(i)[::-(-len(i) // args.eval_max)]) for ds, i in sets]  # evenly spread

    @torch.no_grad()
    def __call__(self, model, step, final=False):
        if not self.sets:
            return None
        a, t0, dev, was = self.args, time.perf_counter(), next(model.parameters()).device, model.training
        state = random.getstate()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        with torch.random.fork_rng(devices=[dev] if dev.type == 'cuda' else []), amp_setup(a.amp, dev)[0]:
            model.eval()
            (xt, yt), (xv, yv) = (self.embed(model, ds, idx, rank, world, dev) for ds, idx in self.sets)
        model.train(was)
        random.setstate(state)
        if rank:
            return None
        rec = {'step': step, 'knn_top1': knn_top1(xt, yt, xv, yv, a.eval_k, a.eval_t)}
        rec.update({'linprobe_top1': linear_probe(xt, yt, xv, yv)} if final else {}, eval_s=time.perf_counter() - t0)
        print(f'eval step {step}: ' + ''.join(f'{k} {rec[k]:.2f}% ' for k in rec if k.endswith('top1')) + f'({len(yt)} '
              f'train, {len(yv)} val, k {a.eval_k}, T {a.eval_t}) in {rec["eval_s"]:.1f}s', flush=True)
        if not a.eval_only:  # beside the training records, and a plot
            with open(Path(a.output_dir) / 'log.jsonl', 'a') as f:
                f.write(json.dumps(rec) + '\n')
            save_loss_curve(Path(a.output_dir) / 'knn.png', Path(a.output_dir) / 'log.jsonl', 'knn_top1')
        return rec

    def embed(self, model, ds, idx, rank, world, dev):
        """Each rank embeds its slice of `idx`; every rank gets all features (n, D) and labels (n,) in `idx`'s order."""
        a, per, out = self.args, -(-len(idx) // world), []
        for x, y, _ in torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx[rank * per:(rank + 1) * per]),
                                                   a.batch_size, num_workers=a.num_workers,
                                                   worker_init_fn=ignore_signals, generator=torch.Generator()):
            out.append((self.features(model, normalize(x.to(dev, non_blocking=True), a.mean, a.std)).float().cpu(), y))
        parts = [out]
        if world > 1:
            dist.all_gather_object(parts := [None] * world, out)
        return tuple(torch.cat(t).to(dev) for t in zip(*sum(parts, [])))

    def only(self, model, convert=lambda ckpt: None):
        """--eval_only: the numbers of --init's weights (a checkpoint, or an encoder.pth that `convert` maps)."""
        d = init_distributed()
        load_weights(model, self.args.init, convert)
        rec = self(model.to(d.device), 0, final=True)
        close_group()
        return rec


def knn_top1(train, train_labels, val, val_labels, k=20, T=0.07):
    """DINO's weighted k-NN (ref eval_knn.py): on cosine similarity of the features, the k nearest train items vote
    for their class with weight exp(sim / T). Top-1 accuracy on val, in %."""
    train, val = F.normalize(train, dim=1), F.normalize(val, dim=1)
    votes = torch.zeros(len(val), int(max(train_labels.max(), val_labels.max())) + 1, device=val.device)
    for i in range(0, len(val), 1024):  # (1024, n_train) similarities at a time
        sim, nn_idx = (val[i:i + 1024] @ train.T).topk(min(k, len(train)), dim=1)  # (b, k)
        votes[i:i + 1024].scatter_add_(1, train_labels[nn_idx], (sim / T).exp())
    return 100.0 * (votes.argmax(1) == val_labels).float().mean().item()


@torch.enable_grad()
def linear_probe(train, train_labels, val, val_labels, wds=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0), steps=1000):
    """CLIP's linear probe (Radford et al. 2021, Sec. 3.2, A.3): multinomial logistic regression on the standardised
    features by L-BFGS, the L2 strength chosen from a log-spaced sweep on a held-out fifth of train, then refitted on
    all of train. Top-1 accuracy on val, in %."""
    mean, std, C = train.mean(0), train.std(0) + 1e-6, int(max(train_labels.max(), val_labels.max())) + 1
    train, val, held = (train - mean) / std, (val - mean) / std, torch.arange(len(train), device=train.device) % 5 == 4

    def fit(x, y, wd):  # -> predict(z)
        w = torch.zeros(x.shape[1] + 1, C, device=x.device, requires_grad=True)  # (D + 1, C): weights, bias
        opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn='strong_wolfe')

        def closure():
            opt.zero_grad()
            (loss := F.cross_entropy(x @ w[:-1] + w[-1], y) + wd * w[:-1].square().sum()).backward()
            return loss
        opt.step(closure)
        return lambda z: (z @ w[:-1] + w[-1]).argmax(1)
    score = {wd: (fit(train[~held], train_labels[~held], wd)(train[held]) == train_labels[held]).sum() for wd in wds}
    best = max(wds, key=lambda wd: (score[wd], wd))  # ties: the stronger regularisation
    return 100.0 * (fit(train, train_labels, best)(val) == val_labels).float().mean().item()
