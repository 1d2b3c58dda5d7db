"""End-to-end tests of mixmim.py's command line: outputs, batch arithmetic, resume, torchrun (gloo), preemption,
size checks and --init from reference-style files. Every run is tiny (tiny preset, 64 px = 2x2 mask units, CPU)."""
import argparse
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import mixmim
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
from test_mixmim import reference_keys

TINY = ['--model', 'tiny', '--input_size', '64', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1']
DEPTHS, DEC_DEPTH = mixmim.MODELS['tiny'][1], mixmim.MODELS['tiny'][5]
KEYS = reference_keys(DEPTHS, DEC_DEPTH)
ENCODER_KEYS = {k for k in KEYS if not k.startswith(('decoder', 'mask_token'))}  # models_mixmim_ft without head
N_FIXED = 2 + sum(DEPTHS)  # two frozen position tables, one relative_position_index buffer per block


def run_mixmim(*args, timeout=120):
    return run_script('mixmim.py', *args, timeout=timeout)


def main_exit(argv):
    with pytest.raises(SystemExit) as e:
        mixmim.main(common.parse_args(mixmim.Args, argv=[str(a) for a in argv]))
    return e.value.code


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_mixmim(*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                        '--keep_every', 1, '--output_dir', out))
    return out, res


def check_checkpoint(path, steps):
    ckpt = load(path)
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng', 'method'} <= set(ckpt)
    assert ckpt['step'] == steps and ckpt['method'] == 'mixmim.py'
    assert set(ckpt['model']) == KEYS  # the reference's names: its releases load with --init, ours load in it
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert len(ckpt['optimizer']['state']) == len(KEYS) - N_FIXED
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]
    return ckpt


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2
        return im.size


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    assert 'batch: 8 per GPU x 1 GPUs x 1 accum = 8' in res.stdout
    assert 'lr = 0.00015 x 8 / 256 = 4.6875e-06' in res.stdout
    assert 'windows [4, 4, 4, 2], 4 mask units (2 from the partner); 32 images, 4 steps/epoch' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9)) and recs[-1]['epoch'] == 2.0
    assert recs[0]['lr'] == 0.0 and all(math.isfinite(r['loss']) and r['bad_steps'] == 0 for r in recs)
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8)
    c1, c2 = check_checkpoint(out / 'checkpoint-1.pth', 4), check_checkpoint(out / 'checkpoint-2.pth', 8)
    assert_same(c2['model'], ckpt['model'])
    assert not torch.equal(c1['model']['decoder_pred.weight'], ckpt['model']['decoder_pred.weight'])
    enc = load(out / 'encoder.pth')['model']  # the layout models_mixmim_ft.py loads (strict=False, head aside)
    assert set(enc) == ENCODER_KEYS
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model'][k]), k
    w, h = check_png(out / 'vis_2.png')
    assert w == 5 * (128 + 2) + 2  # A | B | mixed | reconstruction of A | of B, 64 px shown at 128
    check_png(out / 'vis_1.png')
    check_png(out / 'loss.png')
    assert not list(out.glob('*.tmp'))


def test_resume_equals_straight_run(tmp_path):
    cmd = [*TINY, '--data', 'synthetic:24', '--batch_size', 4, '--global_batch', 8, '--epochs', 3, '--blr', 1e-2]
    A, B = tmp_path / 'A', tmp_path / 'B'
    res = ok(run_mixmim(*cmd, '--output_dir', A, '--max_steps', 4))
    assert 'batch: 4 per GPU x 1 GPUs x 2 accum = 8' in res.stdout and '24 images, 3 steps/epoch' in res.stdout
    ok(run_mixmim(*cmd, '--output_dir', B, '--max_steps', 2))
    r2 = ok(run_mixmim(*cmd, '--output_dir', B, '--max_steps', 4))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', r2.stdout), r2.stdout[-2000:]
    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4
    for k in ('model', 'optimizer', 'scaler', 'rng'):
        assert_same(a[k], b[k], k)
    assert_same(load(A / 'encoder.pth'), load(B / 'encoder.pth'), 'encoder')
    la, lb = read_log(A), read_log(B)
    assert [r['epoch'] for r in la] == [r['epoch'] for r in lb] == [round(k / 3, 4) for k in range(1, 5)]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]  # same data and the same masks after the resume
    torch.manual_seed(0)
    fresh = mixmim.MixMIM(64, *mixmim.MODELS['tiny']).state_dict()
    assert not torch.equal(fresh['layers.0.blocks.0.attn.qkv.weight'], b['model']['layers.0.blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- torchrun, 2 processes, gloo


def torchrun(script, *args, timeout=180):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=timeout)


GRAD_SCRIPT = '''
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import mixmim

dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)  # the same init on both ranks
model = mixmim.MixMIM(64, *mixmim.MODELS['tiny'])
ddp = torch.nn.parallel.DistributedDataParallel(model)
batch = torch.load(sys.argv[1])
loss, _ = ddp(batch['imgs'][rank * 3:(rank + 1) * 3], 0.5, batch['masks'][rank])  # odd local batch, own mask
loss.backward()
torch.save({{'grads': {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}}},
           sys.argv[2] + f'/rank{{rank}}.pt')
dist.destroy_process_group()
'''

TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import mixmim

model = mixmim.main(common.parse_args(mixmim.Args, demo=mixmim.DEMO))  # exactly what `python mixmim.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_ddp_gradients_are_the_mean_of_the_per_process_losses(tmp_path):
    """Each process mixes within its own batch with its own mask: DDP's gradient is the mean of the two
    processes' loss gradients, computed here in one process."""
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(6, 3, 64, 64, generator=g)
    masks = [torch.tensor([[True, False, False, True]]), torch.tensor([[False, True, True, False]])]
    torch.save({'imgs': imgs, 'masks': masks}, tmp_path / 'batch.pt')
    script = tmp_path / 'ddp_grads.py'
    script.write_text(GRAD_SCRIPT.format(repo=str(REPO)))
    ok(torchrun(script, tmp_path / 'batch.pt', tmp_path))
    r0, r1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    torch.manual_seed(0)
    model = mixmim.MixMIM(64, *mixmim.MODELS['tiny'])
    loss = (model(imgs[:3], 0.5, masks[0])[0] + model(imgs[3:], 0.5, masks[1])[0]) / 2
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(r0['grads']) and len(grads) == len(KEYS) - N_FIXED
    for n in grads:
        assert torch.equal(r0['grads'][n], r1['grads'][n]), n
        torch.testing.assert_close(r0['grads'][n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_torchrun_two_processes_train(tmp_path):
    out = tmp_path / 'out'
    script = tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    res = ok(torchrun(script, *TINY, '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 8, '--epochs', 2,
                      '--blr', 1e-2, '--max_steps', 2, '--output_dir', out))
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1
    assert [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = check_checkpoint(out / 'checkpoint.pth', 2)
    assert len(ckpt['rng']) == 2
    assert set(load(out / 'encoder.pth')['model']) == ENCODER_KEYS
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')


# --------------------------------------------------------------------------- sizes, --init
# (SIGTERM to the process group, save and an exact resume: tests/test_bad_input.py runs it for every method file)


@pytest.mark.parametrize('argv,words', [
    (['--input_size', 48], '--input_size 48 48 is not divisible by 32'),
    (['--input_size', 96], '--input_size 96 96: stage 3 grid 6x6 does not split into windows of 4'),
    (['--mask_ratio', 0.2], '--mask_ratio 0.2 hides 0 of 4 units'),
    (['--mask_ratio', 0.8], '--mask_ratio 0.8 hides 3 of 4 units'),  # allowed: stops only for another reason
    (['--batch_size', 1, '--global_batch', 1, '--max_steps', 1], '--batch_size 1: MixMIM mixes each image with'),
    (['--batch_size', 3, '--global_batch', 3], '--batch_size 3'),  # allowed, as the reference
])
def test_sizes_and_ratios_checked_at_start(argv, words, tmp_path, restore_signals):
    """(A batch of 1 would mix its image with itself: nothing hidden from it. Odd batches above 1 run, as the
    reference: the middle image alone mixes with itself.)"""
    code = main_exit([*TINY, '--data', 'synthetic:2', '--batch_size', 4, '--global_batch', 4,
                      '--output_dir', tmp_path / 'out', *argv])
    if '0.8' in words or words == '--batch_size 3':
        assert 'do not fill one batch' in code, code  # got past the check to the data check (2 images)
    else:
        assert words in code, code
        assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('kind', ['reference_full', 'encoder'])
def test_init_from_reference_style_files(kind, synthetic_run, tmp_path):
    src_out, _ = synthetic_run
    src = load(src_out / 'checkpoint.pth')
    if kind == 'reference_full':  # the reference's save_model: model, optimizer, epoch, scaler, args (Namespace)
        path = tmp_path / 'checkpoint-599.pth'
        torch.save({'model': src['model'], 'optimizer': src['optimizer'], 'epoch': 599, 'scaler': src['scaler'],
                    'args': argparse.Namespace(model='mixmim_base', mask_ratio=0.5)}, path)
        expected, n_missing = src['model'], 0
    else:  # an encoder export, as fine-tuning reads it: the decoder is initialised afresh
        path = src_out / 'encoder.pth'
        expected, n_missing = load(path)['model'], len(KEYS - ENCODER_KEYS)
    out = tmp_path / 'out'
    res = ok(run_mixmim(*TINY, '--data', 'synthetic:8', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                        '--max_steps', 1, '--blr', 1e-30, '--init', path, '--output_dir', out))
    assert f'--init {path}: loaded {len(expected)} tensors' in res.stdout
    assert f'(kept as initialised): {n_missing} ' in res.stdout and 'resumed from' not in res.stdout
    model = load(out / 'checkpoint.pth')['model']
    for k in expected:  # lr ~1e-32: one step leaves the loaded weights as they were
        torch.testing.assert_close(model[k], expected[k], rtol=0, atol=1e-30, msg=k)
    if kind == 'encoder':
        assert not torch.equal(model['decoder_embed.weight'], src['model']['decoder_embed.weight'])
