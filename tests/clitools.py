"""Helpers shared by the command-line tests (test_*_cli.py): run a method file in a subprocess, read its outputs,
compare saved states exactly."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# every method file present: the cross-method tests (bad input, evaluation, demos under torchrun) run each of them
METHODS = [m for m in ('mae', 'simmim', 'beit', 'um_mae', 'hivit', 'mixmim', 'videomae', 'm3ae', 'milan', 'ijepa',
                       'maskfeat') if (REPO / f'{m}.py').exists()]


def env(threads=1):
    """The current environment without torchrun's variables (a test's subprocess is a single process)."""
    e = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR',
                                                          'MASTER_PORT')}
    e.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    return e


def run_script(script, *args, timeout=120):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(res):
    assert res.returncode == 0, f'exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}'
    return res


def read_log(out):
    return [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines() if line.strip()]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same(a, b, where='state'):
    """Recursive exact equality of (nested) state dicts: tensors with torch.equal, everything else with ==. Only for
    the same computation recomputed: both runs with the same threads (env()) and the same batch sizes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f'{where}: max diff {(a.double() - b.double()).abs().max().item()}'
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f'{where}: keys {set(a) ^ set(b)}'
        for k in a:
            assert_same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def run_and_preempt(script, args, out, tmp_path, after_lines=2, group=False, launcher=(), sig=signal.SIGTERM):
    """Start a training run, send `sig` once log.jsonl has `after_lines` lines, wait for the exit. `group`: the run
    gets a process group of its own and the signal goes to the whole group (loader workers and, under a
    `launcher` such as torchrun, every process), as timeout, Ctrl-C and SLURM's scancel send it.
    Returns (exit code, stdout, stderr)."""
    with open(tmp_path / 'stdout', 'w') as so, open(tmp_path / 'stderr', 'w') as se:
        p = subprocess.Popen([*(launcher or [sys.executable]), script, *map(str, args)], cwd=REPO, env=env(),
                             stdout=so, stderr=se, start_new_session=group)
        try:
            deadline = time.time() + 90
            while time.time() < deadline and p.poll() is None:
                log = Path(out) / 'log.jsonl'
                if log.exists() and len(log.read_text().splitlines()) >= after_lines:
                    break
                time.sleep(0.02)
            assert p.poll() is None, 'the run ended before it could be preempted'
            os.killpg(p.pid, sig) if group else p.send_signal(sig)
            rc = p.wait(timeout=60)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL) if group else p.kill()
                p.wait()
    return rc, (tmp_path / 'stdout').read_text(), (tmp_path / 'stderr').read_text()
