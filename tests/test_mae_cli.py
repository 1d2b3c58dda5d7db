"""End-to-end tests of mae.py's command line: outputs, batch arithmetic, resume, torchrun (gloo), preemption,
bad input, custom data options, --init and the non-finite guard. Every run is tiny (tiny preset, 32 px, CPU)."""
import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import is_fake

import common
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
import mae

TINY = ['--model', 'tiny', '--input_size', '32', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1']
D, DEPTH, DEC_DEPTH = 128, 4, 2  # tiny preset: patch 8, D 128, depth 4, decoder depth 2


# --------------------------------------------------------------------------- helpers


def run_mae(*args, timeout=120):
    return run_script('mae.py', *args, timeout=timeout)


def timm_vit_keys(depth):
    keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    for i in range(depth):
        for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'blocks.{i}.{m}.weight', f'blocks.{i}.{m}.bias'}
    return keys


def mae_reference_keys(depth, dec_depth):
    """models_mae.MaskedAutoencoderViT's state-dict keys."""
    keys = timm_vit_keys(depth) | {'mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias',
                                   'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight',
                                   'decoder_pred.bias'}
    for i in range(dec_depth):
        for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'decoder_blocks.{i}.{m}.weight', f'decoder_blocks.{i}.{m}.bias'}
    return keys


def write_images(folder, n, seed=0, classes=('cat', 'dog')):
    """n small images of various sizes, formats and modes in class subfolders."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (64, 48), (33, 77), (100, 20), (25, 25), (50, 60), (36, 36)]
    modes = ['RGB', 'L', 'RGBA', 'P', 'CMYK', 'LA', 'RGB']
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(a, 'RGB')
        img = img.convert(mode) if mode != 'P' else img.quantize(16)
        d = Path(folder) / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        if mode == 'CMYK' or mode in ('RGB', 'L') and i % 2 == 0:
            img.save(d / f'img{i:03d}.{"JPG" if i % 4 == 0 else "jpg"}', quality=90)
        else:
            img.save(d / f'img{i:03d}.png')
    return Path(folder)



@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp('imgs') / 'data', 24)


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_mae(*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                     '--keep_every', 1, '--output_dir', out))
    return out, res


# --------------------------------------------------------------------------- 1. outputs of a run


def check_log(recs, total_steps, global_batch):
    required = {'epoch', 'step', 'loss', 'lr', 'img_per_s', 'data_wait', 'mem_gb', 'skipped', 'bad_steps', 'eta_s'}
    for r in recs:
        assert required <= set(r), required - set(r)
        assert math.isfinite(r['loss']) and r['img_per_s'] > 0 and 0 <= r['data_wait'] <= 1
        assert r['mem_gb'] == 0.0 and r['bad_steps'] == 0 and r['eta_s'] >= 0 and r['total_steps'] == total_steps
    steps = [r['step'] for r in recs]
    assert steps == list(range(1, total_steps + 1))
    epochs = [r['epoch'] for r in recs]
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)
    assert recs[-1]['eta_s'] == 0


def check_checkpoint(path, steps, step_epoch, data, batch_size):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)  # plain weights_only load, no allow-list
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert ckpt['step'] == steps and ckpt['epoch'] == pytest.approx(step_epoch)
    assert type(ckpt['args']) is dict and ckpt['args']['data'] == data and ckpt['args']['batch_size'] == batch_size
    assert isinstance(ckpt['rng'], list) and len(ckpt['rng']) == 1 and isinstance(ckpt['rng'][0]['torch'], torch.Tensor)
    assert set(ckpt['model']) == mae_reference_keys(DEPTH, DEC_DEPTH)  # also: no 'module.' / '_orig_mod.'
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    n_trainable = len(ckpt['model']) - 2  # pos_embed and decoder_pos_embed are fixed
    assert len(ckpt['optimizer']['state']) == n_trainable
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]
    return ckpt


def check_encoder(out, ckpt, grid=(4, 4), in_chans=3):
    enc = load(Path(out) / 'encoder.pth')['model']
    assert set(enc) == timm_vit_keys(DEPTH)
    assert enc['pos_embed'].shape == (1, 1 + grid[0] * grid[1], D) and enc['cls_token'].shape == (1, 1, D)
    assert enc['patch_embed.proj.weight'].shape == (D, in_chans, 8, 8)
    assert enc['blocks.0.attn.qkv.weight'].shape == (3 * D, D)
    for k, v in enc.items():  # the exported encoder is the final model's encoder
        assert torch.equal(v, ckpt['model'][k]), k
    return enc


def check_png(path, size=None):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG'
        if size:
            assert im.size == size
        assert len(im.getcolors(1 << 20) or range(1000)) > 2  # not blank
        return im.size


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    recs = read_log(out)
    check_log(recs, total_steps=8, global_batch=8)
    assert recs[0]['lr'] == 0.0 and max(r['lr'] for r in recs) <= 1.5e-4 * 8 / 256 + 1e-12  # warmup from 0
    assert [r['epoch'] for r in recs][3] == 1.0 and recs[-1]['epoch'] == 2.0
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8, 2.0, 'synthetic:32', 8)
    # --keep_every 1: one checkpoint-<epoch>.pth per epoch with that epoch's state
    c1 = check_checkpoint(out / 'checkpoint-1.pth', 4, 1.0, 'synthetic:32', 8)
    c2 = check_checkpoint(out / 'checkpoint-2.pth', 8, 2.0, 'synthetic:32', 8)
    assert_same(c2['model'], ckpt['model'])
    assert not all(torch.equal(c1['model'][k], ckpt['model'][k]) for k in ckpt['model'] if 'pos_embed' not in k)
    assert not (out / 'checkpoint-3.pth').exists()
    check_encoder(out, ckpt)
    check_png(out / 'vis_1.png')
    check_png(out / 'vis_2.png')
    check_png(out / 'loss.png')
    assert not list(out.glob('*.tmp'))  # atomic writes leave nothing behind


def test_cli_image_folder_end_to_end(image_folder, tmp_path):
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', image_folder, '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                     '--output_dir', out))
    assert 'skipping' not in res.stderr  # every mode (L, RGBA, P, CMYK, LA) and .JPG decodes
    assert '24 images, 3 steps/epoch' in res.stdout
    recs = read_log(out)
    check_log(recs, total_steps=6, global_batch=8)
    assert all(r['skipped'] == 0 for r in recs)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 6, 2.0, str(image_folder), 8)
    # default --keep_every 20: only the last epoch is kept
    assert (out / 'checkpoint-2.pth').exists() and not (out / 'checkpoint-1.pth').exists()
    check_encoder(out, ckpt)
    check_png(out / 'vis_1.png')
    check_png(out / 'vis_2.png')
    check_png(out / 'loss.png')


# --------------------------------------------------------------------------- 2. batch arithmetic


def test_banner_batch_and_lr(synthetic_run):
    out, res = synthetic_run
    assert 'batch: 8 per GPU x 1 GPUs x 1 accum = 8' in res.stdout
    assert 'lr = 0.00015 x 8 / 256 = 4.6875e-06' in res.stdout
    config = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{')))
    assert config['global_batch'] == 8 and config['batch_size'] == 8 and config['data'] == 'synthetic:32'


def test_gradient_accumulation_steps_and_losses(synthetic_run, tmp_path):
    out8, _ = synthetic_run
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', 'synthetic:32', '--batch_size', 4, '--global_batch', 8, '--epochs', 2,
                     '--output_dir', out))
    assert 'batch: 4 per GPU x 1 GPUs x 2 accum = 8' in res.stdout
    assert '32 images, 4 steps/epoch' in res.stdout  # 8 micro-batches of 4 per epoch -> 4 optimizer steps
    recs = read_log(out)
    check_log(recs, total_steps=8, global_batch=8)
    assert [r['epoch'] for r in recs] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert load(out / 'checkpoint.pth')['step'] == 8
    # 2 x 4 accumulated sees the same images and (CPU generator stream) the same masks as 1 x 8, and the loss
    # is a mean over equal mask counts, so the logged losses agree with the batch-8 run
    ref = read_log(out8)
    np.testing.assert_allclose([r['loss'] for r in recs], [r['loss'] for r in ref], rtol=1e-4)
    np.testing.assert_allclose([r['lr'] for r in recs], [r['lr'] for r in ref], rtol=1e-12)


def test_global_batch_not_a_multiple(tmp_path):
    res = run_mae(*TINY, '--data', 'synthetic:32', '--batch_size', 3, '--global_batch', 8, '--epochs', 1,
                  '--output_dir', tmp_path / 'out')
    assert res.returncode != 0
    assert '--global_batch 8 is not a multiple of --batch_size 3' in res.stderr
    assert 'Traceback' not in res.stderr
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


def test_global_batch_smaller_than_batch(tmp_path, restore_signals):
    argv = [*TINY, '--data', 'synthetic:32', '--batch_size', '16', '--global_batch', '8', '--output_dir',
            str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        mae.main(common.parse_args(mae.Args, argv=argv))
    assert 'not a multiple' in str(e.value.code)


# --------------------------------------------------------------------------- 3. resume


@pytest.mark.parametrize('variant', ['synthetic_accum2', 'folder'])
def test_resume_equals_straight_run(variant, image_folder, tmp_path):
    if variant == 'folder':  # crop augmentation; 24 images / batch 8 = 3 steps per epoch
        data = ['--data', image_folder, '--batch_size', 8, '--global_batch', 8]
    else:  # 24 images / (4 x 2 accum) = 3 steps per epoch
        data = ['--data', 'synthetic:24', '--batch_size', 4, '--global_batch', 8]
    cmd = [*TINY, *data, '--epochs', 3, '--blr', 1e-2]
    A, B = tmp_path / 'A', tmp_path / 'B'
    ok(run_mae(*cmd, '--output_dir', A, '--max_steps', 4))
    r1 = ok(run_mae(*cmd, '--output_dir', B, '--max_steps', 2))
    assert 'resumed from' not in r1.stdout and load(B / 'checkpoint.pth')['step'] == 2
    r2 = ok(run_mae(*cmd, '--output_dir', B, '--max_steps', 4))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', r2.stdout), r2.stdout[-2000:]

    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4
    assert_same(a['model'], b['model'], 'model')
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert_same(a['scaler'], b['scaler'], 'scaler')
    assert_same(a['rng'], b['rng'], 'rng')
    assert a['epoch'] == b['epoch']
    assert_same(load(A / 'encoder.pth'), load(B / 'encoder.pth'), 'encoder')
    la, lb = read_log(A), read_log(B)
    assert [r['step'] for r in la] == [1, 2, 3, 4] and [r['step'] for r in lb] == [1, 2, 3, 4]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]  # same data, crops and masks after the resume
    assert [r['lr'] for r in la] == [r['lr'] for r in lb]
    assert (A / 'vis_1.png').exists() and (B / 'vis_1.png').exists()  # epoch 1 ended inside the resumed part
    # the weights really moved (lr > 0), so the equality is not trivial
    torch.manual_seed(0)
    fresh = mae.MAE((32, 32), *mae.MODELS['tiny']).state_dict()
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], b['model']['blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- 4. torchrun, 2 processes, gloo


def torchrun(script, *args, timeout=180):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=timeout)


GRAD_SCRIPT = '''
import os
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import mae

dist.init_process_group('gloo')
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same init on both ranks
patch, dim, depth, heads, dec_dim, dec_depth, dec_heads = mae.MODELS['tiny']
model = mae.MAE((32, 32), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads)
ddp = torch.nn.parallel.DistributedDataParallel(model)
batch = torch.load(sys.argv[1])
imgs, noise = batch['imgs'], batch['noise']
b = imgs.shape[0] // world
loss, _ = ddp(imgs[rank * b:(rank + 1) * b], 0.75, noise[rank * b:(rank + 1) * b])
loss.backward()
mean_loss = loss.detach().clone()
dist.all_reduce(mean_loss)
torch.save({{'grads': {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}},
            'loss': mean_loss / world, 'init': model.state_dict()}}, sys.argv[2] + f'/rank{{rank}}.pt')
dist.destroy_process_group()
'''


def test_ddp_gradients_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    imgs, noise = torch.randn(8, 3, 32, 32, generator=g), torch.rand(8, 16, generator=g)
    torch.save({'imgs': imgs, 'noise': noise}, tmp_path / 'batch.pt')
    script = tmp_path / 'ddp_grads.py'
    script.write_text(GRAD_SCRIPT.format(repo=str(REPO)))
    ok(torchrun(script, tmp_path / 'batch.pt', tmp_path))
    r0, r1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')

    torch.manual_seed(0)
    patch, dim, depth, heads, dec_dim, dec_depth, dec_heads = mae.MODELS['tiny']
    model = mae.MAE((32, 32), patch, dim, depth, heads, dec_dim, dec_depth, dec_heads)
    assert_same(model.state_dict(), r0['init'], 'init')
    loss, _ = model(imgs, 0.75, noise)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(r0['grads']) == set(r1['grads'])
    assert len(grads) == len(mae_reference_keys(DEPTH, DEC_DEPTH)) - 2
    torch.testing.assert_close(r0['loss'], loss.detach(), rtol=1e-6, atol=1e-6)
    for n in grads:
        assert torch.equal(r0['grads'][n], r1['grads'][n]), n  # DDP leaves both ranks with the same average
        torch.testing.assert_close(r0['grads'][n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import mae

model = mae.main(common.parse_args(mae.Args, demo=mae.DEMO))  # exactly what `python mae.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out = tmp_path / 'out'
    script = tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    res = ok(torchrun(script, *TINY, '--data', 'synthetic:32', '--batch_size', 4, '--global_batch', 8, '--epochs', 2,
                      '--blr', 1e-2, '--max_steps', 2, '--output_dir', out))
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1  # rank 0 alone prints
    assert '32 images, 4 steps/epoch' in res.stdout  # 32 images sharded over 2 ranks of 4 -> 4 steps
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2] and all(r['img_per_s'] > 0 for r in recs)
    assert all(math.isfinite(r['loss']) and r['total_steps'] == 2 for r in recs)
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2  # every rank's RNG state
    assert set(ckpt['model']) == mae_reference_keys(DEPTH, DEC_DEPTH)
    assert set(load(out / 'encoder.pth')['model']) == timm_vit_keys(DEPTH)
    assert not (out / 'checkpoint-1.pth').exists()  # no epoch ended
    # both ranks ended with the same weights, and they are the ones checkpointed
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')
    # and training moved them
    torch.manual_seed(0)
    fresh = mae.MAE((32, 32), *mae.MODELS['tiny']).state_dict()
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], m0['blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- 5. preemption


# --------------------------------------------------------------------------- 6. bad input


def test_unreadable_images_are_skipped(tmp_path):
    data = tmp_path / 'data'  # flat folder, no class subfolders
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / f'good{i}.jpg')
    (data / 'bad0_corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg' + bytes(200))
    full = (data / 'good0.jpg').read_bytes()
    (data / 'bad1_truncated.jpg').write_bytes(full[:len(full) // 2])
    (data / 'bad2_empty.png').write_bytes(b'')
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', data, '--batch_size', 8, '--global_batch', 8, '--epochs', 2, '--output_dir', out))
    assert 'skipping unreadable image' in res.stderr
    for name in ('bad0_corrupt.jpg', 'bad1_truncated.jpg', 'bad2_empty.png'):
        assert name in res.stderr, name
    assert '11 images, 1 steps/epoch' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2]
    assert sum(r['skipped'] for r in recs) > 0
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert (out / 'encoder.pth').exists()


def test_empty_folder(tmp_path):
    data = tmp_path / 'empty'
    (data / 'sub').mkdir(parents=True)
    (data / 'notes.txt').write_text('not an image')
    res = run_mae(*TINY, '--data', data, '--batch_size', 8, '--global_batch', 8, '--output_dir', tmp_path / 'out')
    assert res.returncode != 0 and 'no images' in res.stderr and 'Traceback' not in res.stderr


def test_no_data_names_both_flags(tmp_path):
    res = run_mae('--output_dir', tmp_path / 'out')
    assert res.returncode == 2
    assert '--data' in res.stderr and '--demo' in res.stderr


def _main_exit(argv):
    with pytest.raises(SystemExit) as e:
        mae.main(common.parse_args(mae.Args, argv=[str(a) for a in argv]))
    return e.value.code


def test_missing_folder(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', tmp_path / 'nope', '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and 'does not exist' in code


def test_input_size_not_divisible(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:32', '--input_size', 30, '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and 'divisible' in code and '30' in code


def test_too_few_images_for_a_batch(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:4', '--batch_size', 8, '--global_batch', 8,
                       '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and 'batch' in code


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(mae.Args, argv=['--data', 'synthetic', '--no_such_flag', '1'])
    assert e.value.code == 2
    assert 'no_such_flag' in capsys.readouterr().err


# --------------------------------------------------------------------------- 7. custom data options


def test_grayscale_with_custom_mean_std(tmp_path):
    data = tmp_path / 'grey'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (36 + i, 40, 1), dtype=np.uint8)[..., 0], 'L').save(data / f'g{i}.png')
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(data / 'deep16.png')  # I;16 grey
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data / 'colour.jpg')  # converted to L
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', data, '--in_chans', 1, '--mean', 0.5, '--std', 0.25, '--batch_size', 8,
                     '--global_batch', 8, '--epochs', 1, '--output_dir', out))
    assert 'skipping' not in res.stderr
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['model']['patch_embed.proj.weight'].shape == (D, 1, 8, 8)
    assert ckpt['model']['decoder_pred.weight'].shape[0] == 8 * 8 * 1
    assert tuple(ckpt['args']['mean']) == (0.5,) and tuple(ckpt['args']['std']) == (0.25,)
    check_encoder(out, ckpt, in_chans=1)
    check_png(out / 'vis_1.png')


def reference_pos_embed(dim, gh, gw):
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, with the grid built as (gh, gw)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32)), axis=0)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)  # w (x) half first
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), emb], axis=0)).float()


def test_non_square_input(image_folder, tmp_path):
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', image_folder, '--input_size', 32, 48, '--batch_size', 8, '--global_batch', 8,
                     '--epochs', 1, '--output_dir', out))
    assert '24 patches' in res.stdout
    ckpt = load(out / 'checkpoint.pth')
    enc = check_encoder(out, ckpt, grid=(4, 6))
    assert torch.equal(enc['pos_embed'], common.sincos_2d(D, 4, 6, cls_token=True)[None])
    # and independently of common.py: the MAE reference's numpy construction (util/pos_embed.py), row-major
    torch.testing.assert_close(enc['pos_embed'][0], reference_pos_embed(D, 4, 6), rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt['model']['decoder_pos_embed'][0], reference_pos_embed(96, 4, 6), rtol=0, atol=1e-6)
    assert torch.equal(ckpt['model']['decoder_pos_embed'], common.sincos_2d(96, 4, 6, cls_token=True)[None])
    # vis grid: 4 columns of 48-px-wide images, each enlarged x3 to reach 128 px -> wider than tall per image
    w, h = check_png(out / 'vis_1.png')
    assert w == 4 * (3 * 48 + 2) + 2


def test_in_chans_needs_matching_mean(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:32', '--in_chans', 1, '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and '--mean' in code and '--in_chans 1' in code


# --------------------------------------------------------------------------- 8. --init


@pytest.mark.parametrize('kind', ['encoder', 'full_namespace'])
def test_init_from_weights(kind, synthetic_run, tmp_path):
    src_out, _ = synthetic_run
    src = load(src_out / 'checkpoint.pth')
    if kind == 'encoder':  # like the reference's mae_pretrain_vit_*.pth: encoder only
        path, expected = src_out / 'encoder.pth', load(src_out / 'encoder.pth')['model']
        n_loaded, n_missing = len(timm_vit_keys(DEPTH)), len(mae_reference_keys(DEPTH, DEC_DEPTH) - timm_vit_keys(DEPTH))
    else:  # like the reference's *_full.pth: args stored as an argparse.Namespace
        path = tmp_path / 'full.pth'
        torch.save({'model': src['model'], 'optimizer': src['optimizer'], 'epoch': 1, 'scaler': src['scaler'],
                    'args': argparse.Namespace(**src['args'])}, path)
        expected, n_loaded, n_missing = src['model'], len(src['model']), 0
        with pytest.raises(Exception):  # a plain weights_only load refuses the Namespace: the loader must allow it
            torch.load(path, weights_only=True)
    out = tmp_path / 'out'
    res = ok(run_mae(*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                     '--max_steps', 1, '--blr', 1e-30, '--init', path, '--output_dir', out))
    assert f'--init {path}: loaded {n_loaded} tensors' in res.stdout
    assert f'(kept as initialised): {n_missing} ' in res.stdout
    assert 'resumed from' not in res.stdout
    assert load(out / 'checkpoint.pth')['step'] == 1
    # lr ~3e-32 (0 is refused): one step moves no weight by more than 1e-30, so the exported weights are the init's
    enc = load(out / 'encoder.pth')['model']
    for k in timm_vit_keys(DEPTH):
        torch.testing.assert_close(enc[k], expected[k], rtol=0, atol=1e-30, msg=k)
    model = load(out / 'checkpoint.pth')['model']
    for k in expected:
        torch.testing.assert_close(model[k], expected[k], rtol=0, atol=1e-30, msg=k)
    if kind == 'encoder':  # the decoder was not in the file: it is freshly initialised, not the source's
        assert not torch.equal(model['decoder_embed.weight'], src['model']['decoder_embed.weight'])


# --------------------------------------------------------------------------- 9. non-finite guard


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, restore_signals):
    orig, calls = mae.forward_loss, [0]

    def nan_from_step_3(imgs, pred, mask, p, norm_pix_loss):
        loss = orig(imgs, pred, mask, p, norm_pix_loss)
        if torch.is_grad_enabled() and not is_fake(loss):  # training steps: not the pictures, nor the FLOP count
            calls[0] += 1
            if calls[0] > 2:
                return loss * float('nan')
        return loss

    monkeypatch.setattr(mae, 'forward_loss', nan_from_step_3)
    out = tmp_path / 'out'
    argv = [*TINY, '--data', 'synthetic:16', '--batch_size', 8, '--global_batch', 8, '--epochs', 5, '--blr', 1e-2,
            '--keep_every', 1, '--max_bad_steps', 3, '--output_dir', out]
    code = _main_exit(argv)  # 2 steps/epoch: steps 1-2 fine, steps 3, 4, 5 NaN -> stop after step 5
    assert isinstance(code, str) and 'non-finite' in code and str(out / 'checkpoint.pth') in code
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4, 5]
    assert [r['bad_steps'] for r in recs] == [0, 0, 1, 2, 3]
    assert math.isfinite(recs[1]['loss']) and math.isnan(recs[2]['loss'])
    c1, c2, last = load(out / 'checkpoint-1.pth'), load(out / 'checkpoint-2.pth'), load(out / 'checkpoint.pth')
    assert c1['step'] == 2 and c2['step'] == last['step'] == 4
    assert all(torch.isfinite(v).all() for v in last['model'].values())
    # the skipped steps changed nothing: not the weights (no weight decay either), not the Adam moments
    assert_same(c1['model'], last['model'], 'model')
    for s in last['optimizer']['state'].values():
        assert torch.isfinite(s['exp_avg']).all() and torch.isfinite(s['exp_avg_sq']).all()
    assert_same(c1['optimizer']['state'], last['optimizer']['state'], 'optimizer state')
    assert not (out / 'encoder.pth').exists()


def test_stop_on_an_epochs_last_step_still_saves_that_epoch(tmp_path, restore_signals):
    """--max_steps (or a preemption) landing on the last step of an epoch must still write that epoch's
    checkpoint-<epoch>.pth and vis_<epoch>.png: a resumed run starts at the next epoch and never writes them."""
    out = tmp_path / 'out'
    mae.main(common.parse_args(mae.Args, argv=[*TINY, '--data', 'synthetic:32', '--batch_size', '8',
                                               '--global_batch', '8', '--epochs', '3', '--keep_every', '1',
                                               '--max_steps', '4', '--output_dir', str(out)]))
    assert load(out / 'checkpoint.pth')['step'] == 4  # 4 steps/epoch: epoch 1 is complete
    assert (out / 'checkpoint-1.pth').exists() and load(out / 'checkpoint-1.pth')['step'] == 4
    assert (out / 'vis_1.png').exists()
