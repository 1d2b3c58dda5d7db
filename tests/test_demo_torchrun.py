"""Every file's `--demo` under `torchrun --nproc_per_node=2`: the demo's global batch is split over the processes
(the per-process batch is derived when --batch_size is not given), so the demo runs as it is. Shrunk with flags
other than the batch: one step of the demo's own global batch of synthetic images, no loader workers. The nine
demos run in one torchrun job (tests/torchrun_demos.py), so torch is imported once per process."""
import importlib
import json
import re
import subprocess
import sys

import pytest
import torch

import common
from clitools import METHODS, REPO, env, load


@pytest.fixture(scope='module')
def demos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('demos')
    runs = []
    for method in METHODS:
        mod = importlib.import_module(method)
        argv = ['--demo', '--data', f'synthetic:{mod.DEMO["global_batch"]}', '--max_steps', '1', '--num_workers', '0',
                '--log_every', '1', '--eval_data', '', '--output_dir', str(tmp / method)]  # evaluation: test_eval.py
        if method == 'beit':  # a small tokenizer file instead of the demo's tokenizer training
            torch.save(mod.Encoder(8, 1, mod.DEMO['vocab_size']).state_dict(), tmp / 'tokenizer.pth')
            argv += ['--tokenizer', str(tmp / 'tokenizer.pth')]
        runs.append((method, argv))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           'tests/torchrun_demos.py', json.dumps(runs)]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = re.split(r'^done (\w+)$', res.stdout, flags=re.M)  # [out of the 1st, name, out of the 2nd, name, ...]
    return tmp, dict(zip(parts[1::2], parts[0::2]))


@pytest.mark.parametrize('method', METHODS)
def test_demo_under_torchrun_splits_its_global_batch(method, demos):
    tmp, stdout = demos
    total = importlib.import_module(method).DEMO['global_batch']
    assert f'batch: {total // 2} per GPU x 2 GPUs x 1 accum = {total}' in stdout[method]
    ckpt = load(tmp / method / 'checkpoint.pth')
    assert ckpt['step'] == 1 and len(ckpt['rng']) == 2 and (tmp / method / 'encoder.pth').exists()


@pytest.mark.parametrize('method', METHODS)
def test_the_per_process_batch_rule(method, monkeypatch):
    mod = importlib.import_module(method)
    total, batch = mod.DEMO['global_batch'], mod.DEMO['batch_size']
    for world, expect in ((1, batch), (2, total // 2), (4, total // 4), (3, total // 3)):  # 3: accumulation refuses
        monkeypatch.setenv('WORLD_SIZE', str(world))
        assert common.parse_args(mod.Args, ['--demo'], demo=mod.DEMO).batch_size == min(batch, expect)
    assert common.parse_args(mod.Args, ['--demo', '--global_batch', str(8 * total)], demo=mod.DEMO).batch_size == batch
    assert common.parse_args(mod.Args, ['--demo', '--batch_size', '2'], demo=mod.DEMO).batch_size == 2  # given: kept
