"""Bad input and scheduler signals, for every method file present (a new file is covered the day it lands): each
case stops at start with one line and a non-zero exit, or is skipped and counted, and no checkpoint is damaged.

The runs are in-process (`main(parse_args(...))`, whose SystemExit message Python prints as the one line, exit
status 1), on each file's own `--demo` configuration shrunk to a batch of 4; one subprocess per file checks what a
user sees: exactly one line on stderr, no traceback."""
import dataclasses
import fractions
import hashlib
import importlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from clitools import METHODS, REPO, assert_same, env, load, ok, read_log, run_and_preempt, run_script

VIDEO = {'videomae'}  # methods whose --data is a folder of videos


def quick(method, out, *extra):
    """The file's --demo configuration (tiny model, small images) with a batch of 4, no loader workers and no
    evaluation (test_eval.py covers it)."""
    return ['--demo', '--data', 'synthetic:64', '--batch_size', 4, '--global_batch', 4, '--num_workers', 0,
            '--log_every', 1, '--eval_data', '', '--output_dir', out,
            *EXTRA.get(method, []), *extra]


EXTRA = {}  # flags a file's demo configuration needs here (BEiT: a small tokenizer file, not the demo's training)


@pytest.fixture(scope='module', autouse=True)
def method_extras(tmp_path_factory):
    if 'beit' in METHODS:
        path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.pth'
        torch.save(importlib.import_module('beit').Encoder(8, 1, 32).state_dict(), path)  # 8x down, 32 codes
        EXTRA['beit'] = ['--tokenizer', path]


def has(method, flag):
    return any(f.name == flag for f in dataclasses.fields(importlib.import_module(method).Args))


def stop_line(method, argv):
    """Run the method's main in-process and return the message it stops with (asserting it is one line)."""
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        mod.main(common.parse_args(mod.Args, [str(a) for a in argv], demo=mod.DEMO))
    code = e.value.code
    assert isinstance(code, str) and code.strip() and '\n' not in code, code
    return code


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def broken_data(root, method, n=3):
    """A data folder in which no file can be read: n broken images, or n videos of broken frames."""
    for i in range(n):
        if method in VIDEO:
            (root / f'v{i}').mkdir(parents=True)
            for k in range(2):
                (root / f'v{i}' / f'img_{k:05d}.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' + bytes(64))
        else:
            root.mkdir(parents=True, exist_ok=True)
            (root / f'b{i}.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' + bytes(64))
    return root


@pytest.fixture(scope='module')
def mae_checkpoint(tmp_path_factory):
    """A real mae.py training checkpoint (tiny, one step), to be refused by the other files and kinds of misuse."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    out = tmp_path_factory.mktemp('mae_ckpt')
    try:
        importlib.import_module('mae').main(common.parse_args(importlib.import_module('mae').Args, [
            str(a) for a in quick('mae', out, '--max_steps', 1)], demo=importlib.import_module('mae').DEMO))
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    return out / 'checkpoint.pth'


# --------------------------------------------------------------------------- values the method cannot use


VALUE_CASES = [
    (['--mask_ratio', 1.5], '--mask_ratio 1.5'),
    (['--mask_ratio', -0.1], '--mask_ratio -0.1'),
    (['--mask_ratio', 0], '--mask_ratio 0'),  # nothing masked: a loss of 0 every step
    (['--epochs', 0], '--epochs 0: must be greater than 0'),
    (['--batch_size', 0], '--batch_size 0: must be greater than 0'),
    (['--batch_size', -4], '--batch_size -4: must be greater than 0'),
    (['--global_batch', 0], '--global_batch 0: must be greater than 0'),
    (['--input_size', 0], '--input_size 0: must be greater than 0'),
    (['--log_every', 0], '--log_every 0: must be greater than 0'),
    (['--save_every', -1], '--save_every -1: must be greater than 0'),
    (['--blr', -0.001], '--blr -0.001: must be greater than 0'),
    (['--warmup_epochs', -1], '--warmup_epochs -1: must be 0 or more'),
    (['--num_workers', -2], '--num_workers -2: must be 0 or more'),
    (['--max_steps', -1], '--max_steps -1: must be 0 or more'),
    (['--weight_decay', -0.05], '--weight_decay -0.05: must be 0 or more'),
    (['--std', 0.2, 0, 0.2], '--std 0.2 0.0 0.2: must be greater than 0'),
    (['--in_chans', 2], '--in_chans 2'),
    (['--model', 'gigantic'], '--model gigantic is not one of'),
    (['--amp', 'fp8'], '--amp fp8 is not one of'),
    (['--input_size', 33], '--input_size 33'),
    (['--input_size', 64, 64, 64], '--input_size 64 64 64: give one size or two (H W)'),
    (['--blr', 'inf'], '--blr inf: must be a finite number'),  # it trained NaN weights and exported them
    (['--mean', 'nan', 0.4, 0.4], '--mean nan 0.4 0.4: must be a finite number'),
    (['--seed', -1], '--seed -1: must be 0 or more'),
    (['--data', 'synthetic:abc'], '--data synthetic:abc: give synthetic or synthetic:N'),
    (['--dist_timeout', 0], '--dist_timeout 0.0: must be greater than 0'),
]


@pytest.mark.parametrize('argv,words', VALUE_CASES, ids=[' '.join(map(str, a)) for a, _ in VALUE_CASES])
@pytest.mark.parametrize('method', METHODS)
def test_bad_value_stops_before_any_work(method, argv, words, tmp_path, restore_signals):
    if not has(method, argv[0][2:]):
        pytest.skip(f'{method}.py has no {argv[0]}')  # BEiT masks a count of patches (its own tests check it)
    out = tmp_path / 'out'
    line = stop_line(method, quick(method, out, *argv))
    assert words in line, line
    assert not out.exists()  # stopped before the output folder was made


@pytest.mark.parametrize('method', METHODS)
def test_mask_ratio_line_gives_the_valid_range(method, tmp_path, restore_signals):
    if not has(method, 'mask_ratio'):
        pytest.skip(f'{method}.py has no --mask_ratio')
    line = stop_line(method, quick(method, tmp_path / 'out', '--mask_ratio', 1.5))
    assert re.search(r'give 0 < ratio <=? 1 ', line) and re.search(r'hides 1 to \d+ of the \d+', line), line


def test_mask_ratio_counts_by_the_methods_rounding(tmp_path, restore_signals):
    """MAE keeps int(N (1 - ratio)) patches: at 64 px / patch 8, 0.99 keeps int(0.64) = 0 of 64: nothing visible;
    SimMIM hides ceil(ratio x blocks): 1.0 hides all 16 blocks of 64 px / 16, which SimMIM can represent."""
    line = stop_line('mae', quick('mae', tmp_path / 'a', '--mask_ratio', 0.99))
    assert '--mask_ratio 0.99 hides 64 of 64 patches' in line and 'hides 1 to 63 of the 64 patches' in line
    if 'simmim' in METHODS:
        mod = importlib.import_module('simmim')
        args = common.parse_args(mod.Args, [str(a) for a in quick('simmim', tmp_path / 'b', '--mask_ratio', 1.0,
                                                                  '--max_steps', 1)], demo=mod.DEMO)
        mod.main(args)  # runs
        assert load(tmp_path / 'b' / 'checkpoint.pth')['step'] == 1


def test_check_args_helpers_directly():
    from types import SimpleNamespace as NS
    base = dict(model='m', amp='none', batch_size=1, in_chans=3, mean=(0, 0, 0), std=(1, 1, 1), betas=(0.9, 0.95))
    common.check_args(NS(**base), {'m': 0})
    for bad, words in [(dict(betas=(0.9, 1.0)), '--betas 0.9 1.0: must be in [0, 1)'),
                       (dict(drop_path=1.0), '--drop_path 1.0: must be in [0, 1)'),
                       (dict(frames=0), '--frames 0: must be greater than 0'),
                       (dict(mean=(0,)), '--mean/--std need 3 values')]:
        with pytest.raises(SystemExit, match=re.escape(words)):
            common.check_args(NS(**{**base, **bad}), {'m': 0}, positive=('frames',))
    common.check_mask_ratio(0.5, 2, 4, 'units')
    common.check_mask_ratio(1.0, 4, 4, 'units', all_ok=True)
    for args in [(1.0, 4, 4, 'units'), (0.1, 0, 4, 'units'), (0.0, 0, 4, 'units'), (-1, 0, 4, 'units')]:
        with pytest.raises(SystemExit, match='--mask_ratio'):
            common.check_mask_ratio(*args)


# --------------------------------------------------------------------------- files: checkpoints, output folder


@pytest.mark.parametrize('method', METHODS)
def test_missing_resume_and_init_files(method, tmp_path, restore_signals):
    line = stop_line(method, quick(method, tmp_path / 'out', '--resume', tmp_path / 'nope.pth'))
    assert line == f'--resume {tmp_path / "nope.pth"}: no such file'
    line = stop_line(method, quick(method, tmp_path / 'out2', '--init', tmp_path / 'gone.pth'))
    assert line == f'--init {tmp_path / "gone.pth"}: no such file'


@pytest.mark.parametrize('method', METHODS)
def test_unreadable_checkpoints_are_refused_and_left_as_they_are(method, tmp_path, restore_signals):
    full = tmp_path / 'full.pth'
    torch.save({'model': {'w': torch.randn(256, 256)}, 'step': 3}, full)
    files = {'cut.pth': full.read_bytes()[:full.stat().st_size // 2],  # an interrupted copy
             'notes.pth': b'these are my notes, not a checkpoint\n' * 20,
             'empty.pth': b''}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({'model': fractions.Fraction(1, 3)}, tmp_path / 'objects.pth')  # a pickled class, not tensors
    for name, call in (('system.pth', os.system), ('eval.pth', eval)):  # functions a pickle would call on load
        torch.save({'model': Call(call, 'touch pwned')}, tmp_path / name)
    torch.save({'w': torch.zeros(3)}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    (tmp_path / 'legacy_cut.pth').write_bytes((tmp_path / 'legacy.pth').read_bytes()[:40])
    for name, words in [('cut.pth', 'looks cut short'), ('notes.pth', 'not a PyTorch checkpoint'),
                        ('empty.pth', 'is empty'), ('objects.pth', 'holds Python objects (fractions.Fraction)'),
                        ('system.pth', f'holds Python objects ({os.name}.system)'),
                        ('eval.pth', 'holds Python objects (builtins.eval)'),
                        ('legacy_cut.pth', "is in torch's legacy (pre-1.6) format and cannot be read (")]:
        path = tmp_path / name
        before = digest(path)
        for flag in ('--resume', '--init'):
            line = stop_line(method, quick(method, tmp_path / f'out_{name}', flag, path))
            assert line.startswith(f'{flag} {path}: ') and words in line, line
            assert 'weights_only' not in line  # torch's advice to unpickle anyway is not ours to give
        assert digest(path) == before
    assert not (REPO / 'pwned').exists() and not (tmp_path / 'pwned').exists()


class Call:
    """Pickles as a call of `fn(arg)`: what a malicious checkpoint holds."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize('method', METHODS)
def test_init_of_the_wrong_kind_of_object(method, tmp_path, restore_signals):
    """--init wants a state dict (or one under 'model'): a bare tensor, a list or a list under 'model' are named."""
    for name, obj, words in [('tensor.pth', torch.zeros(3, 4), 'holds a bare tensor of shape (3, 4)'),
                             ('list.pth', [1, 2, 3], 'holds a list'),
                             ('model_list.pth', {'model': [torch.zeros(2)]}, 'holds a list')]:
        torch.save(obj, tmp_path / name)
        line = stop_line(method, quick(method, tmp_path / f'out_{name}', '--init', tmp_path / name))
        assert line.startswith(f'--init {tmp_path / name}: {words}') and 'state dict' in line, line


@pytest.mark.parametrize('method', METHODS)
def test_checkpoint_of_another_file_or_model_is_refused(method, mae_checkpoint, tmp_path, restore_signals):
    """A restarted run resumes output_dir/checkpoint.pth by itself: one written by another method file or model
    must be refused by name, and left untouched."""
    out = tmp_path / 'out'
    out.mkdir()
    ckpt, model = load(mae_checkpoint), importlib.import_module(method).DEMO['model']
    if method == 'mae':  # the same file refuses another's checkpoint and another model's
        torch.save({**ckpt, 'method': 'simmim.py'}, out / 'checkpoint.pth')
        expect = 'written by simmim.py --model tiny, this is mae.py --model tiny'
    else:
        torch.save(ckpt, out / 'checkpoint.pth')
        expect = f'written by mae.py --model tiny, this is {method}.py --model {model}'
    before = digest(out / 'checkpoint.pth')
    line = stop_line(method, quick(method, out))
    assert line.startswith(f'resuming {out / "checkpoint.pth"}: ') and expect in line, line
    other = tmp_path / 'base.pth'
    torch.save({**ckpt, 'method': f'{method}.py', 'args': {**ckpt['args'], 'model': 'base'}}, other)
    line = stop_line(method, quick(method, tmp_path / 'out2', '--resume', other))
    assert f'written by {method}.py --model base, this is {method}.py --model {model}' in line, line
    assert digest(out / 'checkpoint.pth') == before
    assert sorted(p.name for p in out.iterdir() if p.name != '.lock') == ['checkpoint.pth']  # the lock: in-process


@pytest.mark.parametrize('method', METHODS)
def test_weights_only_file_given_to_resume(method, mae_checkpoint, tmp_path, restore_signals):
    """A reference release or an encoder.pth holds weights, not training state: --resume says to use --init. A file
    without a recorded method whose tensors do not fit is named as such."""
    weights = tmp_path / 'weights.pth'
    torch.save({'model': load(mae_checkpoint)['model']}, weights)
    line = stop_line(method, quick(method, tmp_path / 'out', '--resume', weights))
    assert 'not a training checkpoint' in line and f'--init {weights}' in line, line
    legacy = tmp_path / 'legacy.pth'
    ckpt = {k: v for k, v in load(mae_checkpoint).items() if k != 'method'}
    torch.save({**ckpt, 'model': {'head.weight': torch.zeros(2, 2)}}, legacy)
    line = stop_line(method, quick(method, tmp_path / 'out2', '--resume', legacy))
    model = importlib.import_module(method).DEMO['model']
    assert f'its model does not fit {method}.py --model {model}' in line and 'head.weight' in line, line


@pytest.mark.parametrize('method', METHODS)
def test_unrelated_init_state_dict(method, tmp_path, restore_signals):
    torch.save({'model': {'classifier.weight': torch.zeros(10, 4)}}, tmp_path / 'unrelated.pth')
    line = stop_line(method, quick(method, tmp_path / 'out', '--init', tmp_path / 'unrelated.pth'))
    assert 'no tensor matches this model' in line, line


@pytest.mark.parametrize('method', METHODS)
def test_output_dir_that_is_a_file_or_cannot_be_written(method, tmp_path, restore_signals):
    (tmp_path / 'taken').write_text('a file')
    line = stop_line(method, quick(method, tmp_path / 'taken'))
    assert line == f'--output_dir {tmp_path / "taken"} is a file, not a folder'
    line = stop_line(method, quick(method, tmp_path / 'taken' / 'sub'))
    assert line.startswith(f'--output_dir {tmp_path / "taken" / "sub"} cannot be written: '), line
    assert (tmp_path / 'taken').read_text() == 'a file'


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize('method', METHODS)
def test_missing_empty_and_all_unreadable_data(method, tmp_path, restore_signals):
    line = stop_line(method, quick(method, tmp_path / 'o1', '--data', tmp_path / 'nope'))
    assert line.startswith(f'--data {tmp_path / "nope"}: does not exist'), line
    (tmp_path / 'one.png').write_bytes(b'an image file, not a folder')
    line = stop_line(method, quick(method, tmp_path / 'o0', '--data', tmp_path / 'one.png'))
    assert line.startswith(f'--data {tmp_path / "one.png"}: is a file, not a folder'), line
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'notes.txt').write_text('no images')
    line = stop_line(method, quick(method, tmp_path / 'o2', '--data', tmp_path / 'empty'))
    assert re.search(r'no (images|videos)', line), line
    data = broken_data(tmp_path / 'broken', method)
    what = 'video' if method in VIDEO else 'image'
    line = stop_line(method, quick(method, tmp_path / 'o3', '--data', data))
    assert line.startswith(f'0 of 3 {what} files could be read; first error: {data}'), line


@pytest.mark.parametrize('method', METHODS)
def test_bad_eval_data_stops_at_start(method, tmp_path, restore_signals):
    """--eval_data missing, empty, without class subfolders or a malformed synthetic:N, and --eval_only without
    --init: one line before any work (no output folder; BEiT's demo would train its tokenizer first)."""
    nope, empty, flat = tmp_path / 'nope', tmp_path / 'empty', tmp_path / 'flat'
    (empty / 'sub').mkdir(parents=True)
    for i in range(3):  # readable files, but no class subfolders: one label
        path = flat / f'v{i}' / 'img_00000.png' if method in VIDEO else flat / f'g{i}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (40, 40), (i * 80, 0, 0)).save(path)
    what = 'videos' if method in VIDEO else 'images'
    for data, words in [(nope, f'--eval_data {nope}: no such folder'), (empty, f'--eval_data {empty}: no {what}'),
                        (flat, f'--eval_data {flat}: no class subfolders'),
                        ('synthetic:x', '--eval_data synthetic:x: give synthetic or synthetic:N')]:
        line = stop_line(method, quick(method, tmp_path / 'out', '--eval_data', data))
        assert line.startswith(words), line
    line = stop_line(method, quick(method, tmp_path / 'out', '--eval_only', '--eval_data', 'synthetic:20'))
    assert line.startswith('--eval_only needs --init PATH'), line
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('method', METHODS)
def test_non_multiple_global_batch_and_too_small_data(method, tmp_path, restore_signals):
    line = stop_line(method, quick(method, tmp_path / 'o1', '--batch_size', 3, '--global_batch', 8))
    assert '--global_batch 8 is not a multiple of --batch_size 3' in line, line
    line = stop_line(method, quick(method, tmp_path / 'o2', '--data', 'synthetic:2'))
    assert 'batch' in line, line


@pytest.mark.parametrize('method', METHODS)
def test_unknown_flag(method, capsys):
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        common.parse_args(mod.Args, ['--data', 'synthetic', '--mask_ration', '0.5'], demo=mod.DEMO)
    assert e.value.code == 2 and 'unrecognized arguments: --mask_ration' in capsys.readouterr().err


@pytest.mark.parametrize('method', METHODS)
def test_unreadable_files_are_counted_once_each(method, tmp_path, restore_signals):
    """8 files, 2 of them broken, batch 4: every epoch meets every file, so 3 epochs meet each broken one 3 times
    (and more as the stand-in search runs over them); the log counts 2."""
    data = tmp_path / 'data'
    rng = np.random.default_rng(0)
    modes = ['RGB', 'L', 'P', 'RGBA', 'CMYK', 'RGB']  # odd modes too
    for i in range(6):
        img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).convert(modes[i])
        if method in VIDEO:
            (data / f'v{i}').mkdir(parents=True)
            for k in range(3):
                img.save(data / f'v{i}' / f'img_{k:05d}.{"jpg" if modes[i] in ("RGB", "L", "CMYK") else "png"}')
        else:
            data.mkdir(exist_ok=True)
            img.save(data / f'g{i}.{"jpg" if modes[i] in ("RGB", "L", "CMYK") else "png"}')
    for name in ('b0', 'b1'):
        if method in VIDEO:
            (data / name).mkdir()
            (data / name / 'img_00000.jpg').write_bytes(b'broken')
        else:
            (data / f'{name}.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(40))
    out = tmp_path / 'out'
    mod = importlib.import_module(method)
    argv = [str(a) for a in quick(method, out, '--data', data, '--epochs', 3)]
    mod.main(common.parse_args(mod.Args, argv, demo=mod.DEMO))
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4, 5, 6] and recs[-1]['skipped'] == 2, recs
    assert load(out / 'checkpoint.pth')['step'] == 6
    assert all(r['tflops'] > 0 and 'mfu' not in r for r in recs)  # the FLOP count reaches the log (no GPU: no MFU)


@pytest.mark.parametrize('method', METHODS)
def test_what_a_user_sees_is_one_line(method, tmp_path):
    res = run_script(f'{method}.py', '--data', 'synthetic', '--epochs', 0, '--output_dir', tmp_path / 'out')
    assert res.returncode == 1 and res.stderr == '--epochs 0: must be greater than 0\n', res.stderr
    assert not (tmp_path / 'out').exists()


# --------------------------------------------------------------------------- scheduler signals


@pytest.mark.parametrize('method', METHODS)
def test_sigterm_to_the_process_group_saves_and_exits_0(method, tmp_path):
    """timeout, Ctrl-C and scancel signal every process of the job, loader workers included: the run saves within
    --log_every steps and exits 0 (each file's own tests show that a resumed run equals a straight one)."""
    out = tmp_path / 'out'
    rc, stdout, stderr = run_and_preempt(f'{method}.py', quick(method, out, '--data', 'synthetic:256', '--epochs', 50,
                                                               '--num_workers', 2), out, tmp_path, group=True)
    assert rc == 0 and 'Traceback' not in stderr and 'killed by signal' not in stderr, stderr[-3000:]
    step = int(re.search(r'preempted at step (\d+)', stdout).group(1))
    assert load(out / 'checkpoint.pth')['step'] == step == read_log(out)[-1]['step'] >= 2


def test_group_sigterm_then_resume_equals_a_straight_run(tmp_path):
    """The whole story once, with two loader workers: group SIGTERM, restart, and the weights and optimizer state
    at the end are those of an uninterrupted run."""
    out, straight = tmp_path / 'out', tmp_path / 'straight'
    args = quick('mae', out, '--data', 'synthetic:256', '--epochs', 50, '--num_workers', 2)
    rc, stdout, stderr = run_and_preempt('mae.py', args, out, tmp_path, group=True)
    assert rc == 0, stderr[-3000:]
    step = int(re.search(r'preempted at step (\d+)', stdout).group(1))
    ok(run_script('mae.py', *args, '--max_steps', step + 2))
    ok(run_script('mae.py', *quick('mae', straight, '--data', 'synthetic:256', '--epochs', 50, '--num_workers', 2,
                                   '--max_steps', step + 2)))
    a, b = load(out / 'checkpoint.pth'), load(straight / 'checkpoint.pth')
    assert a['step'] == b['step'] == step + 2
    assert_same(a['model'], b['model'], 'model')
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert [r['step'] for r in read_log(out)] == list(range(1, step + 3))


def test_ctrl_c_saves_and_a_second_stops_at_once(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground group: the first saves at the next log step and exits 0."""
    out = tmp_path / 'out'
    args = quick('mae', out, '--data', 'synthetic:256', '--epochs', 50, '--num_workers', 2)
    rc, stdout, stderr = run_and_preempt('mae.py', args, out, tmp_path, group=True, sig=signal.SIGINT)
    assert rc == 0 and 'KeyboardInterrupt' not in stderr, stderr[-3000:]
    assert 'interrupted: saving at the next log step' in stderr
    step = int(re.search(r'preempted at step (\d+)', stdout).group(1))
    assert load(out / 'checkpoint.pth')['step'] == step >= 2
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    flag = common.Preemption()
    try:
        flag.handle(signal.SIGINT, None)
        assert flag.flag
        with pytest.raises(KeyboardInterrupt):
            flag.handle(signal.SIGINT, None)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_sigterm_to_a_torchrun_group_saves_and_resumes(tmp_path):
    """Two processes under torchrun, one loader worker each, SIGTERM to the whole group (torchrun forwards it too):
    both ranks agree at the next log step, save, and the job resumes at that step."""
    out = tmp_path / 'out'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    args = quick('mae', out, '--data', 'synthetic:512', '--batch_size', 2, '--epochs', 50, '--num_workers', 1)
    rc, stdout, stderr = run_and_preempt('mae.py', args, out, tmp_path, group=True, launcher=launcher)
    # torchrun reports the signal with a traceback of its own; the ranks must not raise (nor lose their workers)
    assert 'killed by signal' not in stderr and 'mae.py", line' not in stderr and 'common.py", line' not in stderr, \
        stderr[-3000:]
    step = int(re.search(r'preempted at step (\d+)', stdout).group(1))
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == step >= 2 and len(ckpt['rng']) == 2
    res = subprocess.run([*launcher, 'mae.py', *map(str, args), '--max_steps', str(step + 1)], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'at step {step}' in res.stdout and load(out / 'checkpoint.pth')['step'] == step + 1


def test_unreadable_files_counted_once_over_ranks(tmp_path):
    """The two broken files (indices 0 and 1) fall to different ranks in both epochs (seed 0): rank 0 alone meets
    one; the count is the union over ranks and epochs, 2, not a sum of attempts."""
    data = tmp_path / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(data / f'g{i}.png')
    for i in range(2):
        (data / f'b{i}.png').write_bytes(b'broken')
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'mae.py',
           *map(str, quick('mae', out, '--data', data, '--batch_size', 2, '--epochs', 2))]
    ok(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=180))
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and recs[-1]['skipped'] == 2, recs


# --------------------------------------------------------------------------- --help, environment, concurrent runs


@pytest.mark.parametrize('method', METHODS)
def test_help_exits_0_and_lists_the_presets(method, capsys):
    mod = importlib.import_module(method)
    with pytest.raises(SystemExit) as e:
        common.parse_args(mod.Args, ['--help'], demo=mod.DEMO)
    text = capsys.readouterr().out
    assert e.value.code == 0 and 'presets for --model' in text, text[-2000:]
    presets = text[text.index('presets for --model'):]
    for name in mod.MODELS:
        assert re.search(rf'^  {name}: \S', presets, re.M), (name, presets)


@pytest.mark.parametrize('method', METHODS)
def test_a_stale_or_partial_torchrun_environment_stops_at_start(method, tmp_path, monkeypatch, restore_signals):
    """WORLD_SIZE/RANK left in a shell, or a rank started by hand: one line, no folder, no wait."""
    for k in ('MASTER_ADDR', 'MASTER_PORT', 'LOCAL_RANK', 'TORCHELASTIC_RUN_ID'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    line = stop_line(method, quick(method, tmp_path / 'o1'))
    assert line.startswith('WORLD_SIZE=2 RANK=0 are set but MASTER_ADDR/MASTER_PORT are not: start with torchrun'), line
    monkeypatch.delenv('WORLD_SIZE')
    monkeypatch.setenv('RANK', '1')  # trained the whole run and wrote nothing, as rank 1 of 1
    line = stop_line(method, quick(method, tmp_path / 'o2'))
    assert line.startswith('RANK=1: no such process in a job of 1; start with torchrun'), line
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_waiting_for_the_other_processes_is_bounded(tmp_path):
    """RANK 0 of 2 with nobody else coming: it says what it waits for, and stops after --dist_timeout."""
    e = {**env(), 'WORLD_SIZE': '2', 'RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    t = time.monotonic()
    res = subprocess.run([sys.executable, 'mae.py', *map(str, quick('mae', tmp_path / 'out', '--dist_timeout', 0.05))],
                         cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and time.monotonic() - t < 60, res.stderr
    assert 'waiting up to 0.05 min (--dist_timeout) for the 2 processes to meet at 127.0.0.1:' in res.stdout
    assert re.fullmatch(r'process 0 of 2: the others did not meet at 127\.0\.0\.1:\d+ within 0\.05 min '
                        r'\(--dist_timeout\): .*\n', res.stderr), res.stderr
    assert not (tmp_path / 'out' / '.lock').exists()  # the lock was let go


BLOCKED = """
import datetime, sys, torch.distributed as dist
sys.path.insert(0, {repo!r})
import common
common.Preemption()
print('ready', flush=True)
dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=90))  # blocks in C++: the others never come
"""


def test_a_second_signal_ends_a_process_blocked_in_a_collective(tmp_path):
    """The main thread, blocked in C++ (here: meeting peers that never come), cannot run Python's signal handler; the
    watchdog thread ends the process on a second SIGTERM, instead of waiting for the 90 s timeout."""
    e = {**env(), 'WORLD_SIZE': '2', 'RANK': '0', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    p = subprocess.Popen([sys.executable, '-c', BLOCKED.format(repo=str(REPO))], env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'ready\n'
        time.sleep(1)
        p.send_signal(signal.SIGTERM)  # the first: noted (the handler would save at the next log step)
        time.sleep(2)
        p.send_signal(signal.SIGTERM)  # within 5 s of the first: a copy torchrun forwards, not a second request
        time.sleep(4)
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        t = time.monotonic()
        assert p.wait(timeout=30) == 1 and time.monotonic() - t < 10
        assert 'second signal: stopping now, without saving' in p.stderr.read()
    finally:
        p.kill()
        p.wait()


def test_ranks_do_not_outlive_a_killed_torchrun(tmp_path):
    """torchrun killed outright (SIGKILL) cannot forward anything: its ranks notice their parent is gone and stop."""
    out = tmp_path / 'out'
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    args = quick('mae', out, '--data', 'synthetic:512', '--batch_size', 2, '--epochs', 50)
    with open(tmp_path / 'err', 'w') as err:
        p = subprocess.Popen([*launcher, 'mae.py', *map(str, args)], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                             stderr=err)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not ((out / 'log.jsonl').exists() and (out / 'log.jsonl').read_text()):
            time.sleep(0.1)
        ranks = [int(x) for x in subprocess.run(['pgrep', '-P', str(p.pid)], capture_output=True, text=True).stdout.split()]
        assert len(ranks) == 2, ranks
        p.kill()
        p.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(running(r) for r in ranks):
            time.sleep(0.2)
        assert not any(running(r) for r in ranks), 'ranks outlived torchrun'
        assert 'torchrun has gone: stopping' in (tmp_path / 'err').read_text()
    finally:
        for r in ranks if 'ranks' in dir() else []:
            subprocess.run(['kill', '-9', str(r)], capture_output=True)


def running(pid):
    """The process exists and is not a zombie (its parent, killed, did not reap it)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'
    except OSError:
        return False


@pytest.mark.parametrize('method', METHODS)
def test_a_second_run_on_the_same_output_dir_stops(method, tmp_path, restore_signals):
    """A run holds output_dir/.lock: another run there stops with one line naming the holder, and touches nothing."""
    out = tmp_path / 'out'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', HOLD.format(lock=str(out / '.lock'))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        line = stop_line(method, quick(method, out))
        assert line == (f'--output_dir {out} is in use by process {holder.pid} on {socket.gethostname()} (its lock '
                        f'{out.resolve() / ".lock"}): wait for that run to end, or give another --output_dir'), line
        assert sorted(p.name for p in out.iterdir()) == ['.lock']
    finally:
        holder.kill()
        holder.wait()


HOLD = """
import fcntl, os, socket, time
f = open({lock!r}, 'a+')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.write(f'{{os.getpid()}} {{socket.gethostname()}}')
f.flush()
print('locked', flush=True)
time.sleep(120)
"""


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', HOLD.format(lock=str(out / '.lock'))], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == 'locked\n'
    holder.kill()  # SIGKILL: the lock file still names it, the system has dropped the lock
    holder.wait()
    res = ok(run_script('mae.py', *quick('mae', out, '--max_steps', 1)))
    assert f'note: taking over {out.resolve() / ".lock"} from process {holder.pid} {socket.gethostname()}' in res.stdout
    assert not (out / '.lock').exists() and load(out / 'checkpoint.pth')['step'] == 1


# --------------------------------------------------------------------------- failed saves, non-finite weights


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    """A full disk (here: a file-size limit of half the checkpoint): one line, the previous checkpoint intact, no
    temp file left."""
    out = tmp_path / 'out'
    ok(run_script('mae.py', *quick('mae', out, '--max_steps', 1)))
    before, size = digest(out / 'checkpoint.pth'), (out / 'checkpoint.pth').stat().st_size
    cmd = f'ulimit -f {size // 2048}; exec "{sys.executable}" mae.py ' + ' '.join(
        f'"{a}"' for a in quick('mae', out, '--max_steps', 2))
    res = subprocess.run(['bash', '-c', cmd], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith(f'saving {out / "checkpoint.pth"} failed (') and res.stderr.endswith(
        '); the previous checkpoint.pth is intact\n') and res.stderr.count('\n') == 1, res.stderr
    assert digest(out / 'checkpoint.pth') == before and not (out / 'checkpoint.pth.tmp').exists()


def test_save_checkpoint_failing_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        Path(f).write_bytes(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit, match=r'^saving .*new\.pth failed \(No space left on device\); no earlier copy'):
        common.save_checkpoint(tmp_path / 'new.pth', {})
    assert list(tmp_path.iterdir()) == []


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    """Every rank checks before the (collective) save: the checkpoint on disk keeps the last good state."""
    from types import SimpleNamespace as NS
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    args = NS(output_dir=str(tmp_path), keep_every=1, epochs=1)
    d = NS(world=1, rank=0, main=True, device=torch.device('cpu'))
    (tmp_path / 'checkpoint.pth').write_bytes(b'the last good state')
    with torch.no_grad():
        model.weight[0, 1] = float('nan')
    with pytest.raises(SystemExit, match=r'^stopping: 1 weight tensors are not finite \(e\.g\. weight\), so .*'
                                         r'checkpoint\.pth is not written and keeps the last good state'):
        common.save_training_state(args, d, model, opt, torch.amp.GradScaler(enabled=False), 1, 1, 1)
    assert (tmp_path / 'checkpoint.pth').read_bytes() == b'the last good state'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']


# --------------------------------------------------------------------------- data folders: links, loops, FIFOs


def linked_data(root, method):
    """8 images (or videos), a link to the folder itself, two links that loop, a second link to one file and a FIFO
    named like an image: each real file counts once, the scan ends, the FIFO is never opened."""
    rng = np.random.default_rng(0)
    for i in range(8):
        img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
        if method in VIDEO:
            (root / f'v{i}').mkdir(parents=True)
            for k in range(2):
                img.save(root / f'v{i}' / f'img_{k:05d}.png')
        else:
            root.mkdir(exist_ok=True)
            img.save(root / f'g{i}.png')
    (root / 'again').symlink_to(root)  # ln -s . data/again
    (root / 'a' / 'b').mkdir(parents=True)
    (root / 'a' / 'b' / 'up').symlink_to(root / 'a')  # two loops
    (root / 'a' / 'top').symlink_to(root)
    if method not in VIDEO:
        (root / 'a' / 'same.png').symlink_to(root / 'g0.png')
    os.mkfifo(root / 'pipe.png')
    return root


@pytest.mark.parametrize('method', METHODS)
def test_links_loops_and_fifos_in_the_data_folder(method, tmp_path, capfd, restore_signals):
    data = linked_data(tmp_path / 'data', method)
    out = tmp_path / 'out'
    mod = importlib.import_module(method)
    mod.main(common.parse_args(mod.Args, [str(a) for a in quick(method, out, '--data', data, '--epochs', 1)],
                               demo=mod.DEMO))
    assert [r['step'] for r in read_log(out)] == [1, 2]  # 8 files, batch 4: one epoch is 2 steps
    err = capfd.readouterr().err
    dups = 3 if method in VIDEO else 4  # again, up, top (+ same.png)
    assert f'note: under {data}, left out {dups} duplicate path(s) of files or folders already found (links) and 1 ' \
           f'entr(ies) that are not regular files' in err, err


def test_the_scan_of_a_looping_folder_ends(tmp_path):
    """Without the visited-folder check this walk grows without bound; in a subprocess so a regression fails here."""
    data = linked_data(tmp_path / 'data', 'mae')
    code = f'import sys; sys.path.insert(0, {str(REPO)!r}); import common; print(len(common.ImageFiles({str(data)!r}, 32)))'
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert res.stdout == '8\n', res.stderr
