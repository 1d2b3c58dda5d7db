"""End-to-end tests of milan.py's command line: outputs, the random-teacher notice, resume, torchrun (gloo), a
teacher file, teacher errors at start and --init from reference-style files. Every run is tiny (32 px, CPU).
(SIGTERM to the process group and bad input: tests/test_bad_input.py runs them for every method file.)"""
import argparse
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import common
import milan
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env
from test_milan import OpenAIStyle, reference_keys, tiny_teacher

TINY = ['--model', 'tiny', '--input_size', '32', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1']
DEPTH, DEC_DEPTH = milan.MODELS['tiny'][2], milan.MODELS['tiny'][5]
KEYS = reference_keys(DEPTH, DEC_DEPTH)
ENCODER_KEYS = {k for k in KEYS if not k.startswith(('decoder', 'mask_token'))}


def run_milan(*args, timeout=120):
    return run_script('milan.py', *args, timeout=timeout)


def run_main(*argv):
    return milan.main(common.parse_args(milan.Args, argv=[str(a) for a in argv]))


def main_exit(argv):
    with pytest.raises(SystemExit) as e:
        run_main(*argv)
    return str(e.value.code)


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_milan(*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                       '--keep_every', 1, '--output_dir', out))
    return out, res


def check_checkpoint(path, steps):
    ckpt = load(path)
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'rng', 'method'} <= set(ckpt)
    assert ckpt['step'] == steps and ckpt['method'] == 'milan.py'
    assert set(ckpt['model']) == KEYS  # the reference's names, and no teacher inside
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())
    assert len(ckpt['optimizer']['state']) == len(KEYS) - 2  # two frozen position tables
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]
    return ckpt


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9))  # 32 images / 8 = 4 steps x 2 epochs
    assert all(math.isfinite(r['loss']) and 0 <= r['loss'] <= 4 for r in recs)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith('ep ')]
    assert len(lines) == 8 and all('RANDOM teacher' in ln for ln in lines)  # every line says so
    assert 'RANDOM teacher (no CLIP file): targets carry no language' in res.stdout
    assert 'batch: 8 per GPU x 1 GPUs x 1 accum = 8; lr = 0.00015 x 8 / 256' in res.stdout
    ckpt = check_checkpoint(out / 'checkpoint.pth', 8)
    for e in (1, 2):
        assert load(out / f'checkpoint-{e}.pth')['step'] == 4 * e
        with Image.open(out / f'vis_{e}.png') as im:
            im.load()
            assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2
    enc = load(out / 'encoder.pth')['model']
    assert set(enc) == ENCODER_KEYS
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model'][k]), k
    assert ckpt['model']['decoder_pred.weight'].shape == (512, milan.MODELS['tiny'][4])  # random teacher: 512 out


def test_resume_equals_straight_run(tmp_path, restore_signals, capsys):
    """In process (as a restarted job runs the same code): 4 steps straight equal 2 steps, then 2 resumed."""
    cmd = [*TINY, '--data', 'synthetic:24', '--batch_size', 4, '--global_batch', 8, '--epochs', 3, '--blr', 1e-2]
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
    assert [r['loss'] for r in la] == [r['loss'] for r in lb] and len(la) == 4  # same teacher, data and masks
    torch.manual_seed(0)
    fresh = milan.MILAN(32, *milan.MODELS['tiny']).state_dict()
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], b['model']['blocks.0.attn.qkv.weight'])


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import common
import milan

model = milan.main(common.parse_args(milan.Args, demo=milan.DEMO))  # exactly what `python milan.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), *TINY,
           '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 8, '--epochs', 2, '--blr', 1e-2,
           '--max_steps', 2, '--output_dir', out]
    res = ok(subprocess.run(list(map(str, cmd)), cwd=REPO, env=_env(threads=1), capture_output=True, text=True,
                            timeout=180))
    assert res.stdout.count('batch: 4 per GPU x 2 GPUs x 1 accum = 8') == 1
    assert [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = check_checkpoint(out / 'checkpoint.pth', 2)
    assert len(ckpt['rng']) == 2 and set(load(out / 'encoder.pth')['model']) == ENCODER_KEYS
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # same random teacher and init on both ranks, DDP-averaged gradients
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')


def test_teacher_file_run_and_errors(tmp_path, restore_signals):
    """A run reads an OpenAI-style TorchScript teacher (fp16); bad teacher files stop before any output."""
    src = tiny_teacher(5, out=48)
    path = tmp_path / 'ViT-tiny.pt'
    torch.jit.save(torch.jit.trace(OpenAIStyle(src).half(), torch.ones(2, dtype=torch.half)), str(path))
    out = tmp_path / 'out'
    base = [*TINY, '--data', 'synthetic:8', '--batch_size', 8, '--global_batch', 8, '--epochs', 1]
    model = run_main(*base, '--teacher', path, '--output_dir', out)
    assert model.decoder_pred.out_features == 48  # the prediction width follows the teacher's projection
    assert read_log(out)[-1]['step'] == 1 and (out / 'vis_1.png').exists()
    (tmp_path / 'corrupt.pt').write_bytes(b'\x00' * 100)
    for teacher, words in [(tmp_path / 'missing.pt', 'no such file'), (tmp_path / 'corrupt.pt', 'not a PyTorch'),
                           (path, 'the student has patch 8, 65 tokens')]:
        size = ['--input_size', 64] if teacher == path else []
        code = main_exit([*base, '--teacher', teacher, *size, '--output_dir', tmp_path / 'o2'])
        assert f'--teacher {teacher}' in code and words in code, code
        assert not (tmp_path / 'o2').exists()  # stopped at start
    (tmp_path / 'imgs').mkdir()
    Image.new('RGB', (40, 40)).save(tmp_path / 'imgs' / 'a.png')
    code = main_exit([*TINY, '--data', tmp_path / 'imgs', '--output_dir', tmp_path / 'o3'])
    assert 'no teacher: give --teacher' in code and 'random' in code


@pytest.mark.parametrize('kind', ['reference_full', 'encoder'])
def test_init_from_reference_style_files(kind, synthetic_run, tmp_path, restore_signals):
    src_out, _ = synthetic_run
    src = load(src_out / 'checkpoint.pth')
    if kind == 'reference_full':  # the reference's save_model: model, optimizer, epoch, scaler, args (Namespace)
        path = tmp_path / 'checkpoint-399.pth'
        torch.save({'model': src['model'], 'optimizer': src['optimizer'], 'epoch': 399, 'scaler': src['scaler'],
                    'args': argparse.Namespace(model='mae_vit_base_patch16', use_clip=True)}, path)
        expected, n_missing = src['model'], 0
    else:
        path = src_out / 'encoder.pth'
        expected, n_missing = load(path)['model'], len(KEYS - ENCODER_KEYS)
    out = tmp_path / 'out'
    res = run_main(*TINY, '--data', 'synthetic:8', '--batch_size', 8, '--global_batch', 8, '--epochs', 2,
                   '--max_steps', 1, '--blr', 1e-30, '--init', path, '--output_dir', out)
    model = load(out / 'checkpoint.pth')['model']
    for k in expected:  # lr ~1e-32: one step leaves the loaded weights as they were
        torch.testing.assert_close(model[k], expected[k], rtol=0, atol=1e-30, msg=k)
    assert len(KEYS - set(expected)) == n_missing
    if kind == 'encoder':
        assert not torch.equal(res.decoder_embed.weight.detach(), src['model']['decoder_embed.weight'])
