"""End-to-end tests of simmim.py's command line: outputs, batch arithmetic, resume, torchrun (gloo), preemption,
bad input, --init and --demo. Every run is tiny (tiny Swin or vit_tiny preset, 32 px, CPU, a few steps)."""
import functools
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

import common
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
import simmim

# tiny Swin at 32 px: token grids 8, 4, 2, 1; 8-px mask blocks -> 16 blocks, 10 masked
TINY = ['--model', 'tiny', '--input_size', '32', '--mask_patch_size', '8', '--num_workers', '0', '--warmup_epochs', '1',
        '--log_every', '1']
# vit_tiny at 32 px: patch 8, 4x4 grid; 16-px mask blocks -> 4 blocks, 3 masked
VIT = ['--model', 'vit_tiny', '--input_size', '32', '--mask_patch_size', '16', '--num_workers', '0',
       '--warmup_epochs', '1', '--log_every', '1']


# --------------------------------------------------------------------------- helpers


def run_simmim(*args, timeout=120):
    return run_script('simmim.py', *args, timeout=timeout)


@functools.lru_cache
def _fresh_state(name, size):
    torch.manual_seed(0)  # what main() does for rank 0 with --seed 0
    return simmim.build_model(name, (size, size)).state_dict()


def fresh_state(name='tiny', size=32):
    """The state dict of a freshly initialised model (a copy of a cached one: building takes ~0.5 s)."""
    return dict(_fresh_state(name, size))


def write_images(folder, n, seed=0):
    """n small images of various sizes, formats and modes in two class subfolders."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (64, 48), (33, 77), (100, 20), (36, 36), (50, 60)]
    modes = ['RGB', 'L', 'RGBA', 'P', 'RGB', 'LA']
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'RGB')
        img = img.convert(mode) if mode != 'P' else img.quantize(16)
        d = Path(folder) / ('cat', 'dog')[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        if mode in ('RGB', 'L'):
            img.save(d / f'img{i:03d}.jpg', quality=90)
        else:
            img.save(d / f'img{i:03d}.png')
    return Path(folder)


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG'
        assert len(im.getcolors(1 << 20) or range(1000)) > 2  # not blank
        return im.size


def check_log(recs, total_steps):
    required = {'epoch', 'step', 'total_steps', 'loss', 'lr', 'img_per_s', 'data_wait', 'mem_gb', 'skipped',
                'bad_steps', 'eta_s'}
    for r in recs:
        assert required <= set(r), required - set(r)
        assert math.isfinite(r['loss']) and r['loss'] > 0 and math.isfinite(r['lr']) and r['lr'] > 0
        assert r['total_steps'] == total_steps and r['bad_steps'] == 0 and r['img_per_s'] > 0
    assert [r['step'] for r in recs] == list(range(1, total_steps + 1))


def check_checkpoint(path, step, epoch, data, reference_keys):
    ckpt = load(path)  # a plain weights_only load, no allow-list
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert ckpt['step'] == step and ckpt['epoch'] == pytest.approx(epoch)
    assert type(ckpt['args']) is dict and ckpt['args']['data'] == data
    assert isinstance(ckpt['rng'], list) and len(ckpt['rng']) == 1 and isinstance(ckpt['rng'][0]['torch'], torch.Tensor)
    assert set(ckpt['model']) == reference_keys  # the reference's names, no 'module.' / '_orig_mod.'
    assert all(torch.isfinite(v.float()).all() for v in ckpt['model'].values())
    # optimizer: [decay, no_decay] as in the reference, every trainable parameter in it
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.05, 0.0]
    n_params = sum(len(g['params']) for g in ckpt['optimizer']['param_groups'])
    assert n_params == sum(1 for k in reference_keys if not k.endswith(('relative_position_index', 'attn_mask')))
    assert len(ckpt['optimizer']['state']) == n_params
    return ckpt


def check_encoder(out, ckpt):
    enc = load(Path(out) / 'encoder.pth')['model']
    assert set(enc) == {k.removeprefix('encoder.') for k in ckpt['model'] if k.startswith('encoder.')}
    assert not any(k.startswith(('encoder.', 'decoder')) for k in enc)
    for k, v in enc.items():  # the export is the final model's encoder
        assert torch.equal(v, ckpt['model']['encoder.' + k]), k
    return enc



# tiny Swin, 16 synthetic images, 2 per micro-batch x 2 accumulation = 4: 4 optimizer steps per epoch
SYNTH = [*TINY, '--data', 'synthetic:16', '--batch_size', 2, '--global_batch', 4, '--epochs', 2, '--keep_every', 1,
         '--blr', 1e-2]


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_simmim(*SYNTH, '--output_dir', out))
    return out, res


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
    """vit_tiny on an image folder: 16 readable images (JPEG and PNG, several modes and sizes) and 3 unreadable
    files, batch 4 -> 19 // 4 = 4 steps per epoch, 2 epochs."""
    data = write_images(tmp_path_factory.mktemp('imgs') / 'data', 16)
    (data / 'cat' / 'bad0_corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg' + bytes(200))
    full = (data / 'cat' / 'img000.jpg').read_bytes()
    (data / 'dog' / 'bad1_truncated.jpg').write_bytes(full[:len(full) // 2])
    (data / 'dog' / 'bad2_empty.png').write_bytes(b'')
    out = tmp_path_factory.mktemp('folder') / 'out'
    res = ok(run_simmim(*VIT, '--data', data, '--batch_size', 4, '--global_batch', 4, '--epochs', 2,
                        '--output_dir', out))
    return data, out, res


# --------------------------------------------------------------------------- 1. outputs of a run


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    recs = read_log(out)
    check_log(recs, total_steps=8)
    assert [r['epoch'] for r in recs] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert all(r['skipped'] == 0 for r in recs)
    # the logged lr is the schedule at the start of each step: warmup from warmup_lr over epoch 1, then cosine
    args = simmim.resolve(simmim.Args(data='x', model='tiny', epochs=2, warmup_epochs=1, blr=1e-2))
    lr, wlr, mlr = (v * 4 / 512 for v in (1e-2, args.warmup_lr, args.min_lr))
    want = [simmim.lr_at(i / 4, lr, wlr, mlr, args) for i in range(8)]
    np.testing.assert_allclose([r['lr'] for r in recs], want, rtol=1e-12)
    keys = set(fresh_state())
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8, 2.0, 'synthetic:16', keys)
    c1 = check_checkpoint(out / 'checkpoint-1.pth', 4, 1.0, 'synthetic:16', keys)  # --keep_every 1
    c2 = check_checkpoint(out / 'checkpoint-2.pth', 8, 2.0, 'synthetic:16', keys)
    assert_same(c2['model'], ckpt['model'])
    assert not torch.equal(c1['model']['encoder.mask_token'], ckpt['model']['encoder.mask_token'])
    assert not (out / 'checkpoint-3.pth').exists()
    # trained: the weights moved away from the initialisation
    assert not torch.equal(fresh_state()['encoder.layers.0.blocks.0.attn.qkv.weight'],
                           ckpt['model']['encoder.layers.0.blocks.0.attn.qkv.weight'])
    check_encoder(out, ckpt)
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        check_png(out / name)
    assert not list(out.glob('*.tmp'))  # atomic writes leave nothing behind


def test_cli_image_folder_end_to_end(folder_run):
    data, out, res = folder_run
    assert '19 images, 4 steps/epoch' in res.stdout
    assert 'mask 3 of 4 blocks of 16 px' in res.stdout
    recs = read_log(out)
    check_log(recs, total_steps=8)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8, 2.0, str(data), set(fresh_state('vit_tiny')))
    # default --keep_every 5: only the last epoch is kept
    assert (out / 'checkpoint-2.pth').exists() and not (out / 'checkpoint-1.pth').exists()
    enc = check_encoder(out, ckpt)
    assert 'cls_token' in enc and 'rel_pos_bias.relative_position_bias_table' in enc
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        check_png(out / name)


def test_unreadable_images_are_skipped_and_counted(folder_run):
    _, out, res = folder_run
    assert 'skipping unreadable image' in res.stderr
    assert re.search(r'bad[012]_', res.stderr)
    recs = read_log(out)
    assert sum(r['skipped'] for r in recs) > 0  # counted in the log
    assert recs[-1]['step'] == 8 and (out / 'encoder.pth').exists()  # and training went on to the end
    warned = [line for line in res.stderr.splitlines() if 'skipping unreadable image' in line]
    assert warned and all(re.search(r'bad[012]_', line) for line in warned)  # L, RGBA, P, LA, JPEG all decode


# --------------------------------------------------------------------------- 2. batch arithmetic


def test_banner_batch_and_lr(synthetic_run):
    _, res = synthetic_run
    assert 'batch: 2 per GPU x 1 GPUs x 2 accum = 4; lr = 0.01 x 4 / 512 = 7.8125e-05' in res.stdout
    assert 'mask 10 of 16 blocks of 8 px; 16 images, 4 steps/epoch' in res.stdout
    assert 'encoder stride 32' in res.stdout
    config = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{')))
    assert config['global_batch'] == 4 and config['lr_schedule'] == 'cosine' and config['blr'] == 0.01


def test_global_batch_not_a_multiple(tmp_path, restore_signals):
    with pytest.raises(SystemExit) as e:
        simmim.main(common.parse_args(simmim.Args, argv=[*TINY, '--data', 'synthetic:16', '--batch_size', '3',
                                                         '--global_batch', '8', '--output_dir', str(tmp_path)]))
    assert '--global_batch 8 is not a multiple of --batch_size 3' in str(e.value.code)


# --------------------------------------------------------------------------- 3. resume


def test_resume_equals_straight_run(synthetic_run, tmp_path):
    """The straight run is the fixture's (its checkpoint-1.pth is the state after step 4); the same command stopped
    by --max_steps 2 mid-epoch and restarted with --max_steps 4 in the same output_dir must end bit-identical."""
    straight, _ = synthetic_run
    B = tmp_path / 'B'
    r1 = ok(run_simmim(*SYNTH, '--output_dir', B, '--max_steps', 2))
    assert 'resumed from' not in r1.stdout and load(B / 'checkpoint.pth')['step'] == 2
    r2 = ok(run_simmim(*SYNTH, '--output_dir', B, '--max_steps', 4))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', r2.stdout), r2.stdout[-2000:]

    a, b = load(straight / 'checkpoint-1.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4 and a['epoch'] == b['epoch'] == 1.0
    assert_same(a['model'], b['model'], 'model')  # bit-identical: same data, masks (restored RNG) and updates
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert_same(a['scaler'], b['scaler'], 'scaler')
    assert_same(a['rng'], b['rng'], 'rng')
    assert_same(load(B / 'checkpoint-1.pth')['model'], b['model'], 'checkpoint-1')  # epoch 1 ended after the resume
    la, lb = read_log(straight)[:4], read_log(B)
    assert [r['step'] for r in lb] == [1, 2, 3, 4]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]  # the same masks after the resume
    assert [r['lr'] for r in la] == [r['lr'] for r in lb]
    assert (B / 'vis_1.png').exists() and (B / 'encoder.pth').exists()
    # the weights really moved, so the equality is not trivial
    assert not torch.equal(fresh_state()['encoder.mask_token'], b['model']['encoder.mask_token'])


# --------------------------------------------------------------------------- 4. --init


def test_init_from_reference_style_file(tmp_path):
    """A file like the reference's ckpt_epoch_*.pth: {'model': state dict with the reference's key names, ...}."""
    sd = fresh_state()
    torch.manual_seed(123)
    sd = {k: (v + torch.randn_like(v) if v.is_floating_point() else v) for k, v in sd.items()}  # not our init
    sd['encoder.layers.1.blocks.1.attn.qkv.weight'] = torch.full_like(sd['encoder.layers.1.blocks.1.attn.qkv.weight'], 0.125)
    sd['decoder.0.bias'] = torch.arange(sd['decoder.0.bias'].numel(), dtype=torch.float) / 1000
    path = tmp_path / 'ckpt_epoch_99.pth'
    torch.save({'model': sd, 'max_accuracy': 0.0, 'epoch': 99}, path)
    out = tmp_path / 'out'
    # lr ~1e-32 (0 is refused): one step moves no weight by more than 1e-30, so the weights are the file's
    res = ok(run_simmim(*TINY, '--data', 'synthetic:8', '--batch_size', 4, '--global_batch', 4, '--epochs', 1,
                        '--max_steps', 1, '--blr', 1e-30, '--warmup_lr', 0, '--warmup_epochs', 0, '--min_lr', 0,
                        '--init', path, '--output_dir', out))
    assert f'--init {path}: loaded {len(sd)} tensors' in res.stdout
    assert '(kept as initialised): 0 ' in res.stdout and 'resumed from' not in res.stdout
    model = load(out / 'checkpoint.pth')['model']
    assert (model['encoder.layers.1.blocks.1.attn.qkv.weight'] == 0.125).all()
    for k in sd:
        torch.testing.assert_close(model[k], sd[k], rtol=0, atol=1e-30, msg=k)
    assert torch.equal(load(out / 'encoder.pth')['model']['layers.1.blocks.1.attn.qkv.weight'],
                       sd['encoder.layers.1.blocks.1.attn.qkv.weight'])


# --------------------------------------------------------------------------- 5. torchrun, 2 processes, gloo


def torchrun(script, *args, timeout=180):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=timeout)


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import simmim

model = simmim.main(common.parse_args(simmim.Args, demo=simmim.DEMO))  # exactly what `python simmim.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out = tmp_path / 'out'
    script = tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    res = ok(torchrun(script, *TINY, '--data', 'synthetic:16', '--batch_size', 2, '--global_batch', 4, '--epochs', 2,
                      '--blr', 1e-2, '--max_steps', 2, '--output_dir', out))
    assert res.stdout.count('batch: 2 per GPU x 2 GPUs x 1 accum = 4') == 1  # rank 0 alone prints
    assert '16 images, 4 steps/epoch' in res.stdout  # 16 images over 2 ranks of 2 -> 4 steps
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2] and all(math.isfinite(r['loss']) for r in recs)
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2  # every rank's RNG state
    assert set(ckpt['model']) == set(fresh_state())
    assert (out / 'encoder.pth').exists()
    # both ranks ended with the same weights (DDP averaged the gradients), and they are the ones checkpointed
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')
    assert not torch.equal(fresh_state()['encoder.mask_token'], m0['encoder.mask_token'])


# --------------------------------------------------------------------------- 6. preemption


# --------------------------------------------------------------------------- 7. bad input


def test_missing_data_folder(tmp_path):
    res = run_simmim(*TINY, '--data', tmp_path / 'nope', '--output_dir', tmp_path / 'out')
    assert res.returncode != 0
    assert 'does not exist' in res.stderr and str(tmp_path / 'nope') in res.stderr
    assert 'Traceback' not in res.stderr


def _main_exit(argv):
    with pytest.raises(SystemExit) as e:
        simmim.main(common.parse_args(simmim.Args, argv=[str(a) for a in argv]))
    return e.value.code


def test_unknown_model(tmp_path, restore_signals):
    code = _main_exit(['--data', 'synthetic:16', '--model', 'bogus', '--output_dir', tmp_path])
    assert isinstance(code, str) and '--model bogus is not one of' in code and 'swin_base' in code and 'vit_tiny' in code


def test_input_size_not_a_multiple_of_the_stride(tmp_path, restore_signals):
    # 48 px with tiny Swin: token grids 12, 6, 3 -> the 3x3 stage does not split into 2x2 windows
    code = _main_exit([*TINY, '--data', 'synthetic:16', '--input_size', 48, '--output_dir', tmp_path])
    assert isinstance(code, str) and '--input_size' in code
    # a mask block that is not a whole number of patches
    code = _main_exit([*TINY, '--data', 'synthetic:16', '--mask_patch_size', 6, '--output_dir', tmp_path])
    assert isinstance(code, str) and 'mask_patch_size 6' in code and 'patch size 4' in code


@pytest.mark.parametrize('argv', [
    [*TINY, '--input_size', 30],  # not a multiple of the patch size 4
    [*VIT, '--input_size', 36],  # not a multiple of the ViT patch (= stride) 8
    [*TINY, '--input_size', 16, '--mask_patch_size', 16],  # multiple of the patch but not of the stride 32
])
def test_input_size_not_divisible_gives_a_message(argv, tmp_path, restore_signals):
    # checked before the model is built, so the user gets the message, not a traceback from a layer
    code = _main_exit([*argv, '--data', 'synthetic:16', '--output_dir', tmp_path])
    assert isinstance(code, str) and '--input_size' in code


def test_too_few_images_for_a_batch(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:3', '--batch_size', 4, '--global_batch', 4, '--output_dir',
                       tmp_path])
    assert isinstance(code, str) and 'batch' in code


def test_in_chans_needs_matching_mean(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:16', '--in_chans', 1, '--output_dir', tmp_path])
    assert isinstance(code, str) and '--mean' in code and '--in_chans 1' in code


# --------------------------------------------------------------------------- 8. --demo


def test_demo_flag_resolution():
    args = simmim.resolve(common.parse_args(simmim.Args, ['--demo'], demo=simmim.DEMO))
    assert args.demo and args.model == 'tiny' and args.data == 'synthetic:2048'
    assert args.input_size == (64,) and args.mask_patch_size == 16 and args.epochs == 6 and args.warmup_epochs == 1
    assert (args.batch_size, args.global_batch, args.num_workers) == (64, 64, 2)
    assert (args.lr_schedule, args.blr, args.warmup_lr, args.min_lr) == ('cosine', 4e-3, 1e-5, 1e-5)
    assert args.drop_path == 0.0 and args.output_dir == 'output_simmim_demo' and args.keep_every == 3
    # the demo's sizes are consistent: 64 px is a multiple of the stride 32 and of the 16-px mask blocks
    assert 64 % 32 == 0 and 64 % args.mask_patch_size == 0 and args.mask_patch_size % 4 == 0
    # given flags win over the demo's values
    args = simmim.resolve(common.parse_args(simmim.Args, ['--demo', '--epochs', '2', '--model', 'vit_tiny'],
                                            demo=simmim.DEMO))
    assert args.epochs == 2 and args.model == 'vit_tiny' and args.data == 'synthetic:2048' and args.drop_path == 0.1
    # without --demo or --data: a usage error naming both
    with pytest.raises(SystemExit) as e:
        common.parse_args(simmim.Args, [], demo=simmim.DEMO)
    assert e.value.code == 2
