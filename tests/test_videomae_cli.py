"""End-to-end tests of videomae.py's command line: outputs, batch and lr arithmetic, frame folders and GIFs, resume,
torchrun (gloo), preemption, bad input, --init, --demo resolution and the non-finite guard. Every run is tiny (tiny
preset, 32 px, 4 frames, CPU)."""
import argparse
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
import videomae as vm

TINY = ['--model', 'tiny', '--input_size', '32', '--num_frames', '4', '--num_workers', '0', '--warmup_epochs', '1',
        '--log_every', '1']
D, DEPTH, DEC_DEPTH = 128, 4, 2  # tiny preset: patch 8, D 128, depth 4, decoder 64 x 2


# --------------------------------------------------------------------------- helpers


def run_vm(*args, timeout=120):
    return run_script('videomae.py', *args, timeout=timeout)


def _blocks(prefix, depth):
    keys = set()
    for i in range(depth):
        keys |= {f'{prefix}blocks.{i}.attn.{k}' for k in ('q_bias', 'v_bias', 'qkv.weight')}
        for m in ('norm1', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'{prefix}blocks.{i}.{m}.weight', f'{prefix}blocks.{i}.{m}.bias'}
    return keys


def finetune_keys(depth=DEPTH):
    """What run_class_finetuning.py finds after stripping 'encoder.' (no pos_embed: it is a fixed table there)."""
    return {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'} | _blocks('', depth)


def reference_keys(depth=DEPTH, dec_depth=DEC_DEPTH):
    """modeling_pretrain.PretrainVisionTransformer's state-dict keys."""
    return ({'encoder.' + k for k in finetune_keys(depth)} | _blocks('decoder.', dec_depth)
            | {'encoder_to_decoder.weight', 'mask_token', 'decoder.norm.weight', 'decoder.norm.bias',
               'decoder.head.weight', 'decoder.head.bias'})


def write_videos(root, seed=0, n_per_class=5, classes=('walk', 'run')):
    """Small frame-folder videos (JPEG and PNG, various sizes and lengths, some shorter than a clip) in class
    subfolders, plus one animated GIF per class."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 36), (40, 40), (64, 48), (36, 52), (50, 34)]
    for ci, cls in enumerate(classes):
        for v in range(n_per_class):
            d = Path(root) / cls / f'video{v}'
            d.mkdir(parents=True)
            w, h = sizes[(v + ci) % len(sizes)]
            base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for k in range(3 + (v * 3 + ci) % 9):  # 3 to 11 frames; a 4 x stride 2 clip spans 8
                a = np.roll(base, 2 * k, axis=1)  # a moving texture
                Image.fromarray(a).save(d / f'img_{k + 1:05d}.{"jpg" if (v + ci) % 2 else "png"}', quality=90)
        frames = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]
        frames[0].save(Path(root) / cls / 'clip.gif', save_all=True, append_images=frames[1:], duration=40)
    return Path(root)



@pytest.fixture(scope='module')
def video_folder(tmp_path_factory):
    return write_videos(tmp_path_factory.mktemp('videos') / 'data')  # 10 frame folders + 2 GIFs = 12 videos


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_vm(*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                    '--keep_every', 1, '--output_dir', out))
    return out, res


# --------------------------------------------------------------------------- 1. outputs of a run


def check_log(recs, total_steps):
    required = {'epoch', 'step', 'loss', 'lr', 'img_per_s', 'data_wait', 'mem_gb', 'skipped', 'bad_steps', 'eta_s'}
    for r in recs:
        assert required <= set(r), required - set(r)
        assert math.isfinite(r['loss']) and r['loss'] > 0 and r['img_per_s'] > 0 and 0 <= r['data_wait'] <= 1
        assert r['bad_steps'] == 0 and r['total_steps'] == total_steps
    assert [r['step'] for r in recs] == list(range(1, total_steps + 1))
    assert recs[-1]['eta_s'] == 0


def check_checkpoint(path, steps, epoch, data):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert ckpt['step'] == steps and ckpt['epoch'] == pytest.approx(epoch) and ckpt['args']['data'] == data
    assert set(ckpt['model']) == reference_keys()  # no pos tables, no 'module.' / '_orig_mod.'
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert len(ckpt['optimizer']['state']) == len(ckpt['model'])  # every tensor in the state dict is trained
    groups = ckpt['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.0, 0.05]
    no_decay = [k for k, v in ckpt['model'].items() if v.ndim <= 1 or k.endswith('.bias') or k == 'mask_token']
    assert len(groups[0]['params']) == len(no_decay)  # mask_token is in no_decay: ref no_weight_decay()
    assert len(groups[1]['params']) == len(ckpt['model']) - len(no_decay)
    return ckpt


def check_encoder(out, ckpt):
    enc = load(Path(out) / 'encoder.pth')['model']
    assert set(enc) == finetune_keys()
    assert enc['patch_embed.proj.weight'].shape == (D, 3, 2, 8, 8)
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model']['encoder.' + k]), k


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2
        return im.size


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    assert '32 tokens (2 x 16); 32 videos, 4 steps/epoch' in res.stdout
    assert 'batch: 8 per GPU x 1 GPUs x 1 accum = 8' in res.stdout
    assert ('lr = 0.00015 x 8 / 256 = 4.6875e-06, warmup_lr = 0 x 8 / 256 = 0, min_lr = 1e-05 x 8 / 256 = '
            '3.125e-07') in res.stdout
    recs = read_log(out)
    check_log(recs, 8)
    assert [r['epoch'] for r in recs] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    lr, min_lr = 1.5e-4 * 8 / 256, 1e-5 * 8 / 256  # all scaled by global_batch / 256 (ref)
    for r in recs:  # the lr of step s is set at the fractional epoch of its first micro-batch
        e = r['epoch'] - 0.25
        want = lr * e if e < 1 else min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - 1)))
        assert r['lr'] == pytest.approx(want, rel=1e-12, abs=1e-18)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8, 2.0, 'synthetic:32')
    c1 = check_checkpoint(out / 'checkpoint-1.pth', 4, 1.0, 'synthetic:32')
    assert_same(check_checkpoint(out / 'checkpoint-2.pth', 8, 2.0, 'synthetic:32')['model'], ckpt['model'])
    assert not all(torch.equal(c1['model'][k], ckpt['model'][k]) for k in ckpt['model'])
    check_encoder(out, ckpt)
    w, h = check_png(out / 'vis_1.png')
    assert w == 4 * (4 * 32 + 2) + 2 and h > 2 * 4 * (4 * 32 + 2)  # 4 columns; 2 clips x 4 frames as rows
    check_png(out / 'vis_2.png')
    check_png(out / 'loss.png')
    assert not list(out.glob('*.tmp'))


def test_cli_frames_folder_end_to_end(video_folder, tmp_path):
    out = tmp_path / 'out'
    res = ok(run_vm(*TINY, '--data', video_folder, '--sampling_rate', 2, '--batch_size', 4, '--global_batch', 4,
                    '--epochs', 2, '--output_dir', out))
    assert 'skipping' not in res.stderr  # JPEG and PNG frames, GIFs, clips longer than short videos
    assert '12 videos, 3 steps/epoch' in res.stdout
    recs = read_log(out)
    check_log(recs, 6)
    assert all(r['skipped'] == 0 for r in recs)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 6, 2.0, str(video_folder))
    assert (out / 'checkpoint-2.pth').exists() and not (out / 'checkpoint-1.pth').exists()  # keep_every 20
    check_encoder(out, ckpt)
    check_png(out / 'vis_1.png')
    check_png(out / 'vis_2.png')


# --------------------------------------------------------------------------- 2. resume


def test_resume_equals_straight_run(video_folder, tmp_path):
    """Random clip starts, crops and tube masks, with accumulation: 12 videos / (2 x 2 accum) = 3 steps/epoch."""
    cmd = [*TINY, '--data', video_folder, '--sampling_rate', 2, '--batch_size', 2, '--global_batch', 4, '--epochs', 3,
           '--blr', 1e-2]
    A, B = tmp_path / 'A', tmp_path / 'B'
    ra = ok(run_vm(*cmd, '--output_dir', A, '--max_steps', 4))
    assert 'batch: 2 per GPU x 1 GPUs x 2 accum = 4' in ra.stdout and '12 videos, 3 steps/epoch' in ra.stdout
    r1 = ok(run_vm(*cmd, '--output_dir', B, '--max_steps', 2))
    assert 'resumed from' not in r1.stdout and load(B / 'checkpoint.pth')['step'] == 2
    r2 = ok(run_vm(*cmd, '--output_dir', B, '--max_steps', 4))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', r2.stdout), r2.stdout[-2000:]
    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4 and a['epoch'] == b['epoch']
    for key in ('model', 'optimizer', 'scaler', 'rng'):
        assert_same(a[key], b[key], key)
    assert_same(load(A / 'encoder.pth'), load(B / 'encoder.pth'), 'encoder')
    la, lb = read_log(A), read_log(B)
    assert [r['step'] for r in lb] == [1, 2, 3, 4]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]  # same clips, crops and tube masks after the resume
    assert [r['lr'] for r in la] == [r['lr'] for r in lb]
    torch.manual_seed(0)
    fresh = vm.VideoMAE(32, *vm.MODELS['tiny'], num_frames=4).state_dict()
    assert not torch.equal(fresh['encoder.blocks.0.attn.qkv.weight'], b['model']['encoder.blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- 3. torchrun, 2 processes, gloo


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import videomae

model = videomae.main(common.parse_args(videomae.Args, demo=videomae.DEMO))  # what `python videomae.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out = tmp_path / 'out'
    script = tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), *TINY,
           '--data', 'synthetic:32', '--batch_size', '4', '--global_batch', '8', '--epochs', '2', '--blr', '1e-2',
           '--max_steps', '2', '--output_dir', str(out)]
    res = ok(subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180))
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1  # rank 0 alone prints
    assert '32 videos, 4 steps/epoch' in res.stdout  # 32 videos over 2 ranks of 4 -> 4 steps
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2] and all(math.isfinite(r['loss']) for r in recs)
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and set(ckpt['model']) == reference_keys()
    assert not torch.equal(ckpt['rng'][0]['torch'], ckpt['rng'][1]['torch'])  # each rank draws its own masks
    assert set(load(out / 'encoder.pth')['model']) == finetune_keys()
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # DDP kept the replicas identical
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')
    torch.manual_seed(0)
    fresh = vm.VideoMAE(32, *vm.MODELS['tiny'], num_frames=4).state_dict()
    assert not torch.equal(fresh['encoder.blocks.0.attn.qkv.weight'], m0['encoder.blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- 4. preemption


# --------------------------------------------------------------------------- 5. bad input


def test_unreadable_and_empty_videos_are_skipped(tmp_path):
    data = write_videos(tmp_path / 'data', n_per_class=2)  # 4 frame folders + 2 GIFs
    bad = tmp_path / 'data' / 'walk' / 'broken'
    bad.mkdir()
    for k in range(4):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad / f'img_{k + 1:05d}.jpg')
    (bad / 'img_00001.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg' + bytes(200))  # every clip reads it
    (tmp_path / 'data' / 'run' / 'not_extracted').mkdir()  # an empty video folder
    (tmp_path / 'data' / 'run' / 'bad.gif').write_bytes(b'GIF89a garbage')
    out = tmp_path / 'out'
    res = ok(run_vm(*TINY, '--data', data, '--sampling_rate', 2, '--batch_size', 8, '--global_batch', 8,
                    '--epochs', 2, '--output_dir', out))
    assert 'skipping 1 folder(s) without frames' in res.stderr and 'not_extracted' in res.stderr
    assert 'skipping unreadable video' in res.stderr and 'broken' in res.stderr and 'bad.gif' in res.stderr
    assert '8 videos, 1 steps/epoch' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2] and [r['skipped'] for r in recs] == [2, 2]  # 2 bad files, each once
    assert all(torch.isfinite(v).all() for v in load(out / 'checkpoint.pth')['model'].values())
    assert (out / 'encoder.pth').exists()


def _main_exit(argv):
    with pytest.raises(SystemExit) as e:
        vm.main(common.parse_args(vm.Args, argv=[str(a) for a in argv]))
    return e.value.code


def test_missing_and_empty_data_folder(tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', tmp_path / 'nope', '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and 'does not exist' in code and 'nope' in code
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'notes.txt').write_text('not a video')
    code = _main_exit([*TINY, '--data', tmp_path / 'empty', '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and 'no videos' in code and 'empty' in code


def test_no_data_names_both_flags(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(vm.Args, argv=['--output_dir', 'x'], demo=vm.DEMO)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert '--data' in err and '--demo' in err


@pytest.mark.parametrize('argv,words', [
    (['--batch_size', 3, '--global_batch', 8], ['--global_batch 8 is not a multiple of --batch_size 3']),
    (['--num_frames', 5], ['--num_frames 5', '--tubelet 2']),
    (['--input_size', 30], ['divisible', '30']),
    (['--model', 'giant'], ['--model giant is not one of', 'small']),
    (['--in_chans', 1], ['--mean', '--in_chans 1']),
    (['--data', 'synthetic:4', '--batch_size', 8, '--global_batch', 8], ['batch'])])
def test_bad_configuration_stops_with_a_message(argv, words, tmp_path, restore_signals):
    code = _main_exit([*TINY, '--data', 'synthetic:32', *argv, '--output_dir', tmp_path / 'out'])
    assert isinstance(code, str) and all(w in code for w in words), code
    assert not (tmp_path / 'out' / 'checkpoint.pth').exists()


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_args(vm.Args, argv=['--data', 'synthetic', '--no_such_flag', '1'])
    assert e.value.code == 2 and 'no_such_flag' in capsys.readouterr().err


# --------------------------------------------------------------------------- 6. --demo and defaults


def test_demo_flag_fills_demo_fields_and_keeps_given_ones():
    args = common.parse_args(vm.Args, argv=['--demo'], demo=vm.DEMO)
    for k, v in vm.DEMO.items():
        assert getattr(args, k) == v, k
    assert args.demo and args.data.startswith('synthetic') and args.model == 'tiny'
    args = common.parse_args(vm.Args, argv=['--demo', '--epochs', '1', '--output_dir', '/tmp/x'], demo=vm.DEMO)
    assert args.epochs == 1 and args.output_dir == '/tmp/x' and args.model == 'tiny'
    assert args.mask_ratio == 0.9 and args.num_frames == vm.DEMO['num_frames']  # the rest: the recipe


def test_defaults_are_the_reference_recipe():
    a = vm.Args()
    assert (a.model, vm.INPUT_SIZE[a.model], a.num_frames, a.sampling_rate, a.tubelet, a.mask_ratio) == (
        'base', 224, 16, 4, 2, 0.9)  # a.input_size None: the preset's
    assert (a.batch_size, a.global_batch, a.epochs, a.warmup_epochs) == (32, 2048, 800, 40)
    assert (a.blr, a.min_lr, a.warmup_lr, a.weight_decay, a.betas, a.clip_grad) == (1.5e-4, 1e-5, 0.0, 0.05,
                                                                                    (0.9, 0.95), 0.0)
    assert a.norm_pix_loss and a.keep_every == 20 and a.num_workers == 10
    assert (a.mean, a.std) == (common.IMAGENET_MEAN, common.IMAGENET_STD)


# --------------------------------------------------------------------------- 7. --init


def test_init_from_reference_style_checkpoint(tmp_path):
    torch.manual_seed(5)
    src = vm.VideoMAE(32, *vm.MODELS['tiny'], num_frames=4).state_dict()
    path = tmp_path / 'checkpoint-1599.pth'  # the reference's utils.save_model layout, args as a Namespace
    ns = argparse.Namespace(model='pretrain_videomae_base_patch16_224', mask_ratio=0.9, decoder_depth=4)
    torch.save({'model': src, 'optimizer': {}, 'epoch': 1599, 'scaler': {}, 'args': ns}, path)
    out = tmp_path / 'out'
    res = ok(run_vm(*TINY, '--data', 'synthetic:16', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                    '--max_steps', 1, '--blr', 1e-30, '--min_lr', 0, '--init', path, '--output_dir', out))
    assert f'--init {path}: loaded {len(src)} tensors' in res.stdout and '(kept as initialised): 0 ' in res.stdout
    model = load(out / 'checkpoint.pth')['model']
    for k in src:  # lr ~1e-31 (0 is refused): one step moves no weight by more than 1e-30
        torch.testing.assert_close(model[k], src[k], rtol=0, atol=1e-30, msg=k)
    enc = load(out / 'encoder.pth')['model']
    assert all(torch.equal(enc[k], src['encoder.' + k]) for k in finetune_keys())


# --------------------------------------------------------------------------- 8. non-finite guard


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, restore_signals):
    orig, calls = vm.forward_loss, [0]

    def nan_from_step_3(*a):
        loss = orig(*a)
        if torch.is_grad_enabled() and not is_fake(loss):  # training steps: not the pictures, nor the FLOP count
            calls[0] += 1
            if calls[0] > 2:
                return loss * float('nan')
        return loss

    monkeypatch.setattr(vm, 'forward_loss', nan_from_step_3)
    out = tmp_path / 'out'
    code = _main_exit([*TINY, '--data', 'synthetic:16', '--batch_size', 8, '--global_batch', 8, '--epochs', 5,
                       '--blr', 1e-2, '--keep_every', 1, '--max_bad_steps', 3, '--output_dir', out])
    assert isinstance(code, str) and 'non-finite' in code and str(out / 'checkpoint.pth') in code
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4, 5] and [r['bad_steps'] for r in recs] == [0, 0, 1, 2, 3]
    c1, last = load(out / 'checkpoint-1.pth'), load(out / 'checkpoint.pth')
    assert c1['step'] == 2 and last['step'] == 4
    assert_same(c1['model'], last['model'], 'model')  # the skipped steps changed nothing
    assert_same(c1['optimizer']['state'], last['optimizer']['state'], 'optimizer state')
    assert not (out / 'encoder.pth').exists()
