"""End-to-end tests of maskfeat.py's command line: the demo's outputs, batch arithmetic, resume, torchrun (gloo),
--init from a SlowFast .pyth file. Every run is tiny (tiny preset at 64 px: 4x4 patches, up to 6 masked, CPU)."""
import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import maskfeat as mf
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env

# --demo with a small synthetic set at 64 px; 2 images per micro-batch x 2 accumulation = 4: 4 steps per epoch
SYNTH = ['--demo', '--eval_data', '', '--data', 'synthetic:16', '--input_size', 64, '--batch_size', 2,
         '--global_batch', 4, '--epochs', 2, '--keep_every', 1, '--num_workers', 0, '--log_every', 1, '--blr', 1e-2]


@functools.lru_cache
def _keys():
    torch.manual_seed(0)
    return frozenset(mf.MaskFeat((64, 64), *mf.MODELS['tiny']).state_dict())


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'out'
    return out, ok(run_script('maskfeat.py', *SYNTH, '--output_dir', out))


def test_demo_outputs(demo_run):
    out, res = demo_run
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9))
    assert all(math.isfinite(r['loss']) and 0 < r['loss'] < 1 and r['bad_steps'] == 0 for r in recs)
    # the logged lr is the reference's schedule at each step's start: warmup from 1e-6 over epoch 1, then cosine to
    # 1e-6, all scaled by 4 / 256
    want = [common.cosine_lr(i / 4, 1e-2 * 4 / 256, 1e-6 * 4 / 256, 1, 2, 1e-6 * 4 / 256) for i in range(8)]
    np.testing.assert_allclose([r['lr'] for r in recs], want, rtol=1e-12)
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 8 and ckpt['epoch'] == 2.0 and set(ckpt['model']) == _keys()
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.05, 0.0]  # ref [decay, no decay]
    assert sum(len(g['params']) for g in ckpt['optimizer']['param_groups']) == len(_keys()) - 2  # hogs.* buffers
    one = load(out / 'checkpoint-1.pth')
    assert one['step'] == 4 and not torch.equal(one['model']['mask_token'], ckpt['model']['mask_token'])
    enc = load(out / 'encoder.pth')['model']
    assert set(enc) == {k for k in _keys() if not k.startswith(('mask_token', 'hogs.', 'pred_head.'))}
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model'][k]), k
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        with Image.open(out / name) as im:
            im.load()
            assert len(im.getcolors(1 << 20) or range(1000)) > 2
    with Image.open(out / 'vis_2.png') as im:  # 5 columns (64 px drawn 4x: glyph cells of 32 px), 4 images
        assert im.size[0] == 5 * (256 + 2) + 2 and im.size[1] > 4 * 256
    assert not list(out.glob('*.tmp'))


def test_banner(demo_run):
    _, res = demo_run
    assert 'batch: 2 per GPU x 1 GPUs x 2 accum = 4; lr = 0.01 x 4 / 256 = 0.00015625' in res.stdout
    assert '4x4 patches, up to 6 masked in blocks of >= 1; 16 images, 4 steps/epoch' in res.stdout
    assert 'target: 108 HOG values/patch' in res.stdout
    config = json.loads(next(line for line in res.stdout.splitlines() if line.startswith('{')))
    assert config['model'] == 'tiny' and config['output_dir'] != 'output_maskfeat_demo'


def test_demo_flag_resolution():
    args = common.parse_args(mf.Args, ['--demo'], demo=mf.DEMO)
    assert (args.data, args.model, args.input_size, args.epochs, args.output_dir) == \
        ('synthetic:2048', 'tiny', (96,), 8, 'output_maskfeat_demo')
    assert (args.clip_grad, args.mask_ratio, args.warmup_lr) == (0.02, 0.4, 1e-6)  # the recipe, kept
    args = common.parse_args(mf.Args, ['--data', 'x'])
    assert (args.model, args.input_size, args.global_batch, args.blr, args.amp) == ('base', None, 2048, 2e-4, None)
    assert mf.INPUT_SIZE == {'tiny': 64, 'base': 224, 'large': 224}  # None: the preset's size


def test_resume_equals_straight_run(demo_run, tmp_path):
    """Stopped by --max_steps 2 mid-epoch and restarted with --max_steps 4: bit-identical to the straight run's
    state after step 4 (its checkpoint-1.pth), masks included (they are a function of seed, epoch and index)."""
    straight, _ = demo_run
    B = tmp_path / 'B'
    ok(run_script('maskfeat.py', *SYNTH, '--output_dir', B, '--max_steps', 2))
    r2 = ok(run_script('maskfeat.py', *SYNTH, '--output_dir', B, '--max_steps', 4))
    assert 'resumed from' in r2.stdout and 'at step 2' in r2.stdout
    a, b = load(straight / 'checkpoint-1.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 4
    for k in ('model', 'optimizer', 'scaler', 'rng'):
        assert_same(a[k], b[k], k)
    assert [r['loss'] for r in read_log(straight)[:4]] == [r['loss'] for r in read_log(B)]


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import maskfeat

model = maskfeat.main(common.parse_args(maskfeat.Args, demo=maskfeat.DEMO))  # what `python maskfeat.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, SYNTH), '--max_steps', '2', '--output_dir', str(out)]  # 2 per GPU x 2 GPUs: no accumulation
    res = ok(subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=180))
    assert res.stdout.count('batch: 2 per GPU x 2 GPUs x 1 accum = 4') == 1  # rank 0 alone prints
    assert [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and (out / 'encoder.pth').exists()
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # DDP averaged the gradients
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')


def test_init_from_a_slowfast_pyth(tmp_path, restore_signals):
    """A file shaped like the released in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth: {'epoch', 'model_state' (the
    reference's keys, hogs buffers included), 'optimizer_state', 'cfg' (a YAML string)}."""
    torch.manual_seed(5)
    sd = {k: v if k.startswith('hogs.') else v + torch.randn_like(v)  # not our init
          for k, v in mf.MaskFeat((64, 64), *mf.MODELS['tiny']).state_dict().items()}
    path = tmp_path / 'checkpoint_epoch_01600.pyth'
    torch.save({'epoch': 1600, 'model_state': sd, 'optimizer_state': {'state': {}, 'param_groups': []},
                'cfg': 'MODEL:\n  ARCH: maskmvit\n'}, path)
    out = tmp_path / 'out'
    argv = [*SYNTH, '--max_steps', 1, '--blr', 1e-30, '--warmup_lr', 0, '--min_lr', 0, '--warmup_epochs', 0,
            '--init', path, '--output_dir', out]
    mf.main(common.parse_args(mf.Args, [str(a) for a in argv], demo=mf.DEMO))
    model = load(out / 'checkpoint.pth')['model']
    for k, v in sd.items():  # lr ~1e-32: one step moves nothing, so the weights are the file's
        torch.testing.assert_close(model[k], v, rtol=0, atol=1e-28, msg=k)
