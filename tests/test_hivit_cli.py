"""End-to-end tests of hivit.py's command line: outputs, batch arithmetic and schedule, resume, torchrun (gloo),
preemption, bad input, --init and --demo. Every run is tiny (micro preset, 32 px: 16 units of 8 px, 4 visible)."""
import argparse
import functools
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import is_fake

import common
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
import hivit

MICRO = ['--model', 'micro', '--input_size', '32', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1']
# 16 synthetic images, 2 per micro-batch x 2 accumulation = 4: 4 optimizer steps per epoch
SYNTH = [*MICRO, '--data', 'synthetic:16', '--batch_size', 2, '--global_batch', 4, '--epochs', 2, '--keep_every', 1,
         '--blr', 1e-2]


def run_hivit(*args, timeout=120):
    return run_script('hivit.py', *args, timeout=timeout)


@functools.lru_cache
def _fresh_state():
    torch.manual_seed(0)  # what main() does for rank 0 with --seed 0
    return hivit.HiViTMAE(32, *hivit.MODELS['micro']).state_dict()


def fresh_state():
    return dict(_fresh_state())


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2  # not blank


def check_checkpoint(path, step, epoch):
    ckpt = load(path)  # a plain weights_only load, no allow-list
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng'} <= set(ckpt)
    assert ckpt['step'] == step and ckpt['epoch'] == pytest.approx(epoch) and type(ckpt['args']) is dict
    assert set(ckpt['model']) == set(fresh_state())  # the reference's names, no 'module.' / '_orig_mod.'
    assert all(torch.isfinite(v.float()).all() for v in ckpt['model'].values())
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]  # ref order
    assert len(ckpt['optimizer']['state']) == len(ckpt['model']) - 1  # all but the frozen decoder_pos_embed
    return ckpt


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    return out, ok(run_hivit(*SYNTH, '--output_dir', out))


# --------------------------------------------------------------------------- 1. outputs, batch arithmetic, schedule


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    assert 'batch: 2 per GPU x 1 GPUs x 2 accum = 4' in res.stdout and 'lr = 0.01 x 4 / 256 = 0.00015625' in res.stdout
    assert '16 units of 8 px, 4 visible; 16 images, 4 steps/epoch' in res.stdout
    config = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{')))
    assert config['global_batch'] == 4 and config['model'] == 'micro'
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9)) and all(r['total_steps'] == 8 for r in recs)
    assert [r['epoch'] for r in recs] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    assert all(math.isfinite(r['loss']) and r['bad_steps'] == 0 and r['img_per_s'] > 0 for r in recs)
    # the schedule is NOT shifted by an epoch (the reference passes epoch + 1): warmup starts at 0
    lr = 1e-2 * 4 / 256
    np.testing.assert_allclose([r['lr'] for r in recs[:5]], [0, lr / 4, lr / 2, 3 * lr / 4, lr], rtol=1e-12)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8, 2.0)
    c1 = check_checkpoint(out / 'checkpoint-1.pth', 4, 1.0)
    assert_same(load(out / 'checkpoint-2.pth')['model'], ckpt['model'])
    assert not torch.equal(c1['model']['absolute_pos_embed'], ckpt['model']['absolute_pos_embed'])  # it trains
    assert torch.equal(ckpt['model']['decoder_pos_embed'], fresh_state()['decoder_pos_embed'])  # it does not
    enc = load(out / 'encoder.pth')['model']  # the fine-tuning code's layout: no decoder, mask token, hifeat norm
    assert set(enc) == {k for k in ckpt['model'] if k.startswith(('patch_embed.', 'absolute_pos_embed', 'blocks.'))}
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model'][k]), k
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        check_png(out / name)
    assert not list(out.glob('*.tmp'))


def test_accumulation_matches_one_big_batch(synthetic_run, tmp_path):
    """4 x 1 sees the same images and (CPU generator stream) the same masks as 2 x 2 accumulated, and the loss is a
    mean over equal mask counts: the logged losses agree."""
    out = tmp_path / 'out'
    res = ok(run_hivit(*MICRO, '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 4, '--epochs', 2,
                       '--blr', 1e-2, '--max_steps', 4, '--output_dir', out))
    assert 'batch: 4 per GPU x 1 GPUs x 1 accum = 4' in res.stdout
    ref = read_log(synthetic_run[0])[:4]
    np.testing.assert_allclose([r['loss'] for r in read_log(out)], [r['loss'] for r in ref], rtol=1e-4)


# --------------------------------------------------------------------------- 2. resume


def test_resume_equals_straight_run(synthetic_run, tmp_path):
    """The fixture's checkpoint-1.pth is the state after step 4; the same command stopped by --max_steps 2 mid-epoch
    and restarted with --max_steps 4 in the same output_dir must end bit-identical."""
    straight, _ = synthetic_run
    B = tmp_path / 'B'
    r1 = ok(run_hivit(*SYNTH, '--output_dir', B, '--max_steps', 2))
    assert 'resumed from' not in r1.stdout and load(B / 'checkpoint.pth')['step'] == 2
    r2 = ok(run_hivit(*SYNTH, '--output_dir', B, '--max_steps', 4))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', r2.stdout), r2.stdout[-2000:]
    a, b = load(straight / 'checkpoint-1.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4
    for key in ('model', 'optimizer', 'scaler', 'rng'):
        assert_same(a[key], b[key], key)
    assert [r['loss'] for r in read_log(straight)[:4]] == [r['loss'] for r in read_log(B)]  # same masks after resume
    assert not torch.equal(fresh_state()['mask_token'], b['model']['mask_token'])  # the weights really moved


# --------------------------------------------------------------------------- 3. torchrun, 2 processes, gloo

TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import hivit

model = hivit.main(common.parse_args(hivit.Args, demo=hivit.DEMO))  # exactly what `python hivit.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, [*MICRO, '--data', 'synthetic:16', '--batch_size', 2, '--global_batch', 4, '--epochs', 2,
                      '--blr', 1e-2, '--max_steps', 2, '--output_dir', out])]
    res = ok(subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=180))
    assert res.stdout.count('batch: 2 per GPU x 2 GPUs x 1 accum = 4') == 1  # rank 0 alone prints
    assert '16 images, 4 steps/epoch' in res.stdout
    assert [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and (out / 'encoder.pth').exists()
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # DDP averaged the gradients
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')
    assert not torch.equal(fresh_state()['mask_token'], m0['mask_token'])


# --------------------------------------------------------------------------- 4. preemption


# --------------------------------------------------------------------------- 5. --init


def test_init_from_reference_style_file(tmp_path):
    """Like the reference's checkpoint-1600.pth: {'model': its keys, 'optimizer', 'epoch', 'scaler', 'args':
    argparse.Namespace}."""
    torch.manual_seed(123)
    sd = {k: v + torch.randn_like(v) for k, v in fresh_state().items()}  # not our init
    sd['blocks.7.attn.qkv.weight'] = torch.full_like(sd['blocks.7.attn.qkv.weight'], 0.125)
    path = tmp_path / 'checkpoint-1600.pth'
    torch.save({'model': sd, 'optimizer': {}, 'epoch': 1600, 'scaler': {},
                'args': argparse.Namespace(model='mae_hivit_base_dec512d6b', norm_pix_loss=True)}, path)
    out = tmp_path / 'out'
    res = ok(run_hivit(*MICRO, '--data', 'synthetic:4', '--batch_size', 4, '--global_batch', 4, '--epochs', 1,
                       '--blr', 1e-30, '--init', path, '--output_dir', out))  # lr ~1e-32 (0 is refused)
    assert f'--init {path}: loaded {len(sd)} tensors' in res.stdout and '(kept as initialised): 0 ' in res.stdout
    model = load(out / 'checkpoint.pth')['model']
    for k in sd:
        torch.testing.assert_close(model[k], sd[k], rtol=0, atol=1e-30, msg=k)  # one step moves nothing visibly
    assert (load(out / 'encoder.pth')['model']['blocks.7.attn.qkv.weight'] == 0.125).all()


# --------------------------------------------------------------------------- 6. bad input


def test_unreadable_images_are_skipped(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(data / f'good{i}.jpg')
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), 'L').save(data / 'grey.png')
    (data / 'bad0.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' + bytes(100))
    out = tmp_path / 'out'
    res = ok(run_hivit(*MICRO, '--data', data, '--batch_size', 4, '--global_batch', 4, '--epochs', 2,
                       '--output_dir', out))
    assert 'skipping unreadable image' in res.stderr and 'bad0.jpg' in res.stderr
    assert '8 images, 2 steps/epoch' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and sum(r['skipped'] for r in recs) > 0
    assert (out / 'encoder.pth').exists()


def _main_exit(argv):
    with pytest.raises(SystemExit) as e:
        hivit.main(common.parse_args(hivit.Args, argv=[str(a) for a in argv]))
    return e.value.code


@pytest.mark.parametrize('argv,words', [
    (['--model', 'huge'], ['--model huge is not one of', 'micro', 'base']),
    (['--input_size', '36'], ['--input_size 36 36', 'unit size 8']),  # 36 px is not a whole number of 8-px units
    (['--in_chans', '1'], ['--mean', '--in_chans 1']),
    (['--batch_size', '3', '--global_batch', '8'], ['--global_batch 8 is not a multiple of --batch_size 3']),
    (['--data', 'synthetic:2', '--batch_size', '4', '--global_batch', '4'], ['batch']),
])
def test_bad_configuration_stops_with_a_message(argv, words, tmp_path, restore_signals):
    code = _main_exit([*MICRO, '--data', 'synthetic:16', *argv, '--output_dir', tmp_path])
    assert isinstance(code, str) and all(w in code for w in words), code


def test_missing_folder_and_no_data(tmp_path):
    res = run_hivit(*MICRO, '--data', tmp_path / 'nope', '--output_dir', tmp_path / 'out')
    assert res.returncode != 0 and 'does not exist' in res.stderr and 'Traceback' not in res.stderr
    with pytest.raises(SystemExit) as e:
        common.parse_args(hivit.Args, [], demo=hivit.DEMO)
    assert e.value.code == 2


# --------------------------------------------------------------------------- 7. --demo


def test_demo_flag_resolution():
    args = common.parse_args(hivit.Args, ['--demo'], demo=hivit.DEMO)
    assert args.model == 'micro' and args.data == 'synthetic:2048' and args.input_size == (64,)
    assert (args.batch_size, args.global_batch, args.epochs) == (64, 64, 6)
    assert 64 % hivit.MODELS['micro'][0] == 0  # 64 units of 8 px, 16 visible
    args = common.parse_args(hivit.Args, ['--demo', '--epochs', '2'], demo=hivit.DEMO)
    assert args.epochs == 2 and args.model == 'micro'


# --------------------------------------------------------------------------- 8. non-finite guard


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, restore_signals):
    orig, calls = hivit.forward_loss, [0]

    def nan_from_step_3(imgs, pred, mask, p):
        loss = orig(imgs, pred, mask, p)
        train = torch.is_grad_enabled() and not is_fake(loss)  # not the pictures (no_grad), not the FLOP count (fake)
        calls[0] += train
        return loss * float('nan') if train and calls[0] > 2 else loss

    monkeypatch.setattr(hivit, 'forward_loss', nan_from_step_3)
    out = tmp_path / 'out'
    code = _main_exit([*MICRO, '--data', 'synthetic:8', '--batch_size', 4, '--global_batch', 4, '--epochs', 5,
                       '--blr', 1e-2, '--keep_every', 1, '--max_bad_steps', 3, '--output_dir', out])
    assert isinstance(code, str) and 'non-finite' in code  # 2 steps/epoch: 1-2 fine, 3-5 NaN -> stop after 5
    recs = read_log(out)
    assert [r['bad_steps'] for r in recs] == [0, 0, 1, 2, 3] and math.isnan(recs[2]['loss'])
    c1, c2 = load(out / 'checkpoint-1.pth'), load(out / 'checkpoint-2.pth')
    assert c1['step'] == 2 and c2['step'] == 4
    assert_same(c1['model'], c2['model'], 'model')  # the skipped steps changed nothing (no weight decay either)
    assert_same(c1['optimizer']['state'], c2['optimizer']['state'], 'optimizer state')
