"""End-to-end tests of um_mae.py's command line: outputs, resume equals a straight run, torchrun (gloo), SIGTERM,
--init from a reference-style file, and the masking-ratio lines. Every run is tiny (tiny preset, 64 px, CPU)."""
import argparse
import math
import re
import subprocess
import sys

import pytest
import torch

import common
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
import um_mae
from test_um_mae import swin_reference_keys

TINY = ['--model', 'tiny', '--input_size', '64', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1']
RUN = [*TINY, '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 8, '--epochs', 2, '--blr', 1e-2]
KEYS = swin_reference_keys((2, 2, 2, 2), 1)  # the tiny preset in the reference's naming


def run(*args, timeout=120):
    return run_script('um_mae.py', *args, timeout=timeout)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """16 images / (4 x 2 accum) = 2 steps per epoch, 2 epochs."""
    out = tmp_path_factory.mktemp('straight') / 'out'
    res = ok(run(*RUN, '--keep_every', 1, '--output_dir', out))
    return out, res


def test_outputs_of_a_run(straight):
    out, res = straight
    assert 'batch: 4 per GPU x 1 GPUs x 2 accum = 8' in res.stdout
    assert '64 units of 8 px, 16 visible, 12 of them seen' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r['loss']) for r in recs)
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 4 and ckpt['method'] == 'um_mae.py' and set(ckpt['model']) == KEYS
    assert len(ckpt['optimizer']['state']) == len(KEYS) - 1  # every tensor but the fixed decoder positions
    assert (out / 'checkpoint-1.pth').exists() and (out / 'checkpoint-2.pth').exists()
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        assert (out / name).stat().st_size > 1000, name
    enc = load(out / 'encoder.pth')['model']
    assert set(enc) == {k for k in KEYS if not k.startswith(('decoder', 'mask_token', 'vis_mask_token'))}
    for k, v in enc.items():  # the exported encoder is the final model's
        assert torch.equal(v, ckpt['model'][k]), k


def test_resume_equals_straight_run(straight, tmp_path):
    A, B = straight[0], tmp_path / 'B'
    ok(run(*RUN, '--keep_every', 1, '--output_dir', B, '--max_steps', 2))
    res = ok(run(*RUN, '--keep_every', 1, '--output_dir', B))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 2\b', res.stdout), res.stdout[-2000:]
    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    for k in ('model', 'optimizer', 'scaler', 'rng'):  # masks, secondary masks and crops continue exactly
        assert_same(a[k], b[k], k)
    assert [r['loss'] for r in read_log(A)] == [r['loss'] for r in read_log(B)]
    torch.manual_seed(0)
    fresh = um_mae.UMMAE(um_mae.MODELS['tiny'], 64).state_dict()  # the weights moved: the equality is not trivial
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], b['model']['blocks.0.attn.qkv.weight'])


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import um_mae

model = um_mae.main(common.parse_args(um_mae.Args, demo=um_mae.DEMO))  # what `python um_mae.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes(tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, [*TINY, '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 8, '--epochs', 2,
                      '--blr', 1e-2, '--max_steps', 2, '--output_dir', out])]
    res = subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and [r['step'] for r in read_log(out)] == [1, 2]
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # the ranks drew different masks but hold the same weights
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')


def main_args(out, *extra):
    return common.parse_args(um_mae.Args, [str(a) for a in [*RUN, '--output_dir', out, *extra]])


def test_init_from_a_reference_style_file(tmp_path, restore_signals):
    """The reference saves {'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace} with its keys."""
    torch.manual_seed(123)
    src = um_mae.UMMAE(um_mae.MODELS['tiny'], 64).state_dict()
    path = tmp_path / 'checkpoint-199.pth'
    torch.save({'model': src, 'epoch': 199, 'args': argparse.Namespace(model='mae_swin_tiny_256')}, path)
    model = um_mae.main(main_args(tmp_path / 'out', '--init', path, '--max_steps', 1, '--blr', 1e-30))
    for k, v in model.state_dict().items():  # lr ~1e-31: one step leaves the loaded weights as they were
        torch.testing.assert_close(v, src[k], rtol=0, atol=1e-28, msg=k)
    enc = {k: v for k, v in src.items() if not k.startswith(('decoder', 'mask_token', 'vis_mask_token'))}
    torch.save({'model': enc}, tmp_path / 'encoder.pth')  # an encoder export loads as a start, decoder fresh
    model = um_mae.main(main_args(tmp_path / 'out2', '--init', tmp_path / 'encoder.pth', '--max_steps', 1,
                                  '--blr', 1e-30))
    torch.testing.assert_close(model.state_dict()['norm.weight'], src['norm.weight'], rtol=0, atol=1e-28)
    assert not torch.equal(model.state_dict()['decoder_embed.weight'], src['decoder_embed.weight'])


def test_init_says_which_decoder_order(straight, tmp_path, restore_signals, capsys):
    """A reference checkpoint's decoder learnt the reference's position order, ours the order its args recorded."""
    src = {'model': um_mae.UMMAE(um_mae.MODELS['tiny'], 64).state_dict(), 'args': argparse.Namespace(model='x')}
    torch.save(src, tmp_path / 'ref.pth')
    cases = [(tmp_path / 'ref.pth', [], 'reference position order; this run uses the own-unit order (add '
                                        '--ref_decoder_order to keep it)'),
             (tmp_path / 'ref.pth', ['--ref_decoder_order'], 'reference position order; this run uses the reference '
                                                             'order\n'),
             (straight[0] / 'checkpoint.pth', ['--ref_decoder_order'], 'own-unit position order; this run uses the '
                                                                       'reference order (drop --ref_decoder_order')]
    for i, (path, flags, words) in enumerate(cases):
        um_mae.main(main_args(tmp_path / f'out{i}', '--init', path, '--max_steps', 1, *flags))
        assert f'--init {path}: its decoder learnt the {words}' in capsys.readouterr().out


@pytest.mark.parametrize('flag,value,words', [
    ('--mask_ratio', 0.5, '--mask_ratio 0.5: uniform masking keeps one unit of every 2x2 block'),
    ('--vis_mask_ratio', 1.0, '--vis_mask_ratio 1.0 leaves 0 of the 16 visible units'),
    ('--vis_mask_ratio', -0.1, '--vis_mask_ratio -0.1 leaves'),
    ('--input_size', 48, '--input_size 48 48 does not fit --model tiny: give multiples of 32 px'),
])
def test_method_lines(flag, value, words, tmp_path, restore_signals):
    with pytest.raises(SystemExit) as e:
        um_mae.main(main_args(tmp_path / 'out', flag, value))
    assert words in str(e.value.code) and '\n' not in str(e.value.code), e.value.code
    assert not (tmp_path / 'out').exists()


def test_no_secondary_masking_runs(tmp_path, restore_signals):
    model = um_mae.main(main_args(tmp_path / 'out', '--vis_mask_ratio', 0, '--max_steps', 1))
    assert 'vis_mask_token' not in model.state_dict() and load(tmp_path / 'out' / 'checkpoint.pth')['step'] == 1
