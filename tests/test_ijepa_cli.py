"""End-to-end tests of ijepa.py's command line: the demo's outputs, the EMA after the optimizer step, resume
(EMA weights and mask counter included), torchrun (gloo), --init from reference release files and the min_keep
check. Every run is tiny (tiny preset, 32 px = an 8x8 patch grid, CPU). (SIGTERM to the process group and bad
input: tests/test_bad_input.py runs them for every method file.)"""
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import ijepa
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env

TINY = ['--model', 'tiny', '--input_size', '32', '--min_keep', '4', '--num_workers', '0', '--warmup_epochs', '1',
        '--log_every', '1']
DEPTH, PRED_DEPTH = ijepa.MODELS['tiny'][2], ijepa.MODELS['tiny'][6]


def vit_keys(depth, prefix=''):
    keys = {'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    keys |= {f'blocks.{i}.{m}.{t}' for i in range(depth) for t in ('weight', 'bias')
             for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')}
    return {prefix + k for k in keys}


def run_main(*argv, demo=False):
    return ijepa.main(common.parse_args(ijepa.Args, [str(a) for a in argv], demo=ijepa.DEMO if demo else None))


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """`python ijepa.py --demo` as a user runs it, made small: 32 images, 2 epochs of 4 steps."""
    out = tmp_path_factory.mktemp('demo') / 'out'
    res = ok(run_script('ijepa.py', '--demo', '--eval_data', '', '--data', 'synthetic:32', '--batch_size', 8,
                        '--global_batch', 8, '--epochs', 2, '--num_workers', 0, '--log_every', 1, '--keep_every', 1,
                        '--input_size', 32, '--min_keep', 4, '--output_dir', out))
    return out, res


def test_demo_outputs(demo_run):
    out, res = demo_run
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9))
    assert all(math.isfinite(r['loss']) and 0 < r['loss'] < 2 and 0 < r['tgt_std'] < 1.5 for r in recs)
    assert 'masks on the 8x8 patch grid: 4 target blocks of 9-12 patches; context block 7x7 minus' in res.stdout
    assert 'batch: 8 per GPU x 1 GPUs x 1 accum = 8; lr 0.0002 -> 0.001 -> 1e-06' in res.stdout
    assert re.search(r'^ep [\d.]+ step 8/8 loss [\d.]+ tgt_std [\d.]+ lr', res.stdout, re.M)
    ckpt = load(out / 'checkpoint.pth')
    keys = vit_keys(DEPTH, 'encoder.') | vit_keys(DEPTH, 'target_encoder.') | {
        f'predictor.{k}' for k in ijepa.IJEPA(32, *ijepa.MODELS['tiny'][:7]).predictor.state_dict()}
    assert set(ckpt['model']) == keys and ckpt['step'] == 8 and ckpt['method'] == 'ijepa.py'
    n_trainable = len(keys) - len(vit_keys(DEPTH)) - 2  # not the target encoder, not the two position tables
    assert len(ckpt['optimizer']['state']) == n_trainable  # the tables sit in the groups (as the reference) unused
    assert sum(len(g['params']) for g in ckpt['optimizer']['param_groups']) == n_trainable + 2
    lr, wd, _ = ijepa.schedules(8, ijepa.Args(epochs=2, warmup_epochs=1), 4)
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [wd, wd, 0.0, 0.0]
    assert ckpt['optimizer']['param_groups'][0]['lr'] == lr and wd == pytest.approx(0.4)
    for e in (1, 2):
        assert load(out / f'checkpoint-{e}.pth')['step'] == 4 * e
        with Image.open(out / f'vis_{e}.png') as im:
            im.load()
            assert im.format == 'PNG' and im.width > 4 * 128 and len(im.getcolors(1 << 20) or range(1000)) > 50
    for name in ('loss.png', 'tgt_std.png'):
        assert (out / name).stat().st_size > 1000
    enc = load(out / 'encoder.pth')['model']  # the target encoder, timm's ViT without cls token
    assert set(enc) == vit_keys(DEPTH)
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model']['target_encoder.' + k]), k
    assert not torch.equal(enc['blocks.0.attn.qkv.weight'], ckpt['model']['encoder.blocks.0.attn.qkv.weight'])


def test_ema_follows_the_optimizer_step(tmp_path, restore_signals):
    """One step from known weights whose target differs from the encoder: the target is 0.996 x target +
    0.004 x the encoder AFTER its update (the momentum's first value); the predictor and encoder did move."""
    torch.manual_seed(3)
    start = ijepa.IJEPA(32, *ijepa.MODELS['tiny'][:7])
    with torch.no_grad():
        for p in start.target_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save({'model': start.state_dict()}, tmp_path / 'start.pth')
    run_main(*TINY, '--data', 'synthetic:8', '--batch_size', 8, '--global_batch', 8, '--epochs', 3, '--max_steps', 1,
             '--init', tmp_path / 'start.pth', '--output_dir', tmp_path / 'out')
    after = load(tmp_path / 'out' / 'checkpoint.pth')['model']
    t0 = start.state_dict()
    for k in vit_keys(DEPTH):
        want = 0.996 * t0['target_encoder.' + k] + (1 - 0.996) * after['encoder.' + k]
        torch.testing.assert_close(after['target_encoder.' + k], want, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(after['encoder.blocks.0.attn.qkv.weight'], t0['encoder.blocks.0.attn.qkv.weight'])
    assert not torch.equal(after['predictor.mask_token'], t0['predictor.mask_token'])


def test_resume_equals_straight_run(tmp_path, restore_signals, capsys):
    """In process, with accumulation (2 micro-batches per step) and an epoch boundary: 4 steps straight equal 2
    steps, then 2 resumed; the EMA target, the optimizer and the masks (the counter) continue exactly."""
    cmd = [*TINY, '--data', 'synthetic:24', '--batch_size', 4, '--global_batch', 8, '--epochs', 3]
    A, B = tmp_path / 'A', tmp_path / 'B'
    run_main(*cmd, '--output_dir', A, '--max_steps', 4)
    run_main(*cmd, '--output_dir', B, '--max_steps', 2)
    capsys.readouterr()
    run_main(*cmd, '--output_dir', B, '--max_steps', 4)
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', capsys.readouterr().out)
    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    for k in ('model', 'optimizer', 'scaler', 'rng', 'step'):
        assert_same(a[k], b[k], k)
    la, lb = read_log(A), read_log(B)
    assert [(r['loss'], r['tgt_std']) for r in la] == [(r['loss'], r['tgt_std']) for r in lb] and len(la) == 4
    assert not torch.equal(a['model']['target_encoder.norm.weight'], a['model']['encoder.norm.weight'])


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import ijepa

model = ijepa.main(common.parse_args(ijepa.Args, demo=ijepa.DEMO))  # exactly what `python ijepa.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), *TINY,
           '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 8, '--epochs', 2, '--max_steps', 2,
           '--output_dir', out]
    res = ok(subprocess.run(list(map(str, cmd)), cwd=REPO, env=_env(threads=1), capture_output=True, text=True,
                            timeout=180))
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1
    assert [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and set(load(out / 'encoder.pth')['model']) == vit_keys(DEPTH)
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # same init (broadcast), averaged gradients, the same EMA on both
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')


def test_init_from_a_reference_release(tmp_path, restore_signals):
    """The released files hold {'encoder', 'predictor', 'target_encoder'} with 'module.' keys (DDP), plus 'opt',
    'epoch', ...: with an lr of 1e-30, one step leaves the loaded encoder and predictor as they were."""
    torch.manual_seed(5)
    src = ijepa.IJEPA(32, *ijepa.MODELS['tiny'][:7])
    ddp = lambda m: {'module.' + k: v for k, v in m.state_dict().items()}  # noqa: E731
    path = tmp_path / 'IN1K-vit.h.14-300e.pth.tar'
    torch.save({'encoder': ddp(src.encoder), 'predictor': ddp(src.predictor), 'target_encoder': ddp(src.encoder),
                'opt': {'state': {}}, 'scaler': None, 'epoch': 300, 'loss': 0.1, 'batch_size': 128, 'world_size': 16,
                'lr': 1e-3}, path)
    model = run_main(*TINY, '--data', 'synthetic:8', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                     '--max_steps', 1, '--lr', 1e-30, '--warmup_lr', 1e-30, '--min_lr', 0, '--init', path,
                     '--output_dir', tmp_path / 'out')
    for k, v in src.state_dict().items():
        if not k.startswith('target_encoder'):
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-28, msg=k)


def test_min_keep_and_scales_stop_at_start(tmp_path, restore_signals):
    for extra, words in [(['--min_keep', 9], '--min_keep 9: blocks of 9 patches can be drawn on the 8x8 patch grid'),
                         (['--pred_mask_scale', 0.3, 0.2], '--pred_mask_scale 0.3 0.2: give two values 0 < min'),
                         (['--ema', 0.996, 1.01], '--ema 0.996 1.01: give two values')]:
        with pytest.raises(SystemExit) as e:
            run_main(*TINY, '--data', 'synthetic:8', '--output_dir', tmp_path / 'out', *extra)
        assert words in str(e.value.code) and '\n' not in str(e.value.code), e.value.code
        assert not (tmp_path / 'out').exists()
