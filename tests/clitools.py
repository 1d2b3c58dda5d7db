"""Helpers shared by the command-line tests (test_*_cli.py): run a method file as `python file.py` would (run_script,
in a fork of a process that imported torch once), read its outputs, compare saved states exactly."""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
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


# A method file run as `python file.py args` spends about 1.5 s of a 2-3 s test run importing torch. The CLI tests
# run it instead in a fork of one process that imported torch, numpy and PIL once (and nothing of this repository):
# the child sets argv, cwd, environment, stdout/stderr and the thread count, runs the file as __main__ (runpy), runs
# the atexit handlers and exits with the code `python` would give. Runs that need a real process (signals,
# torchrun, exit-time behaviour) use subprocess directly.
ZYGOTE = r'''
import atexit, json, os, runpy, sys, traceback
import numpy, PIL.Image, torch  # paid once, inherited by every fork

def child(req):
    code = 1
    try:
        for fd, path in ((1, req['stdout']), (2, req['stderr']), (0, os.devnull)):
            f = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout.reconfigure(line_buffering=True)
        os.chdir(req['cwd'])
        os.environ.clear()
        os.environ.update(req['env'])
        torch.set_num_threads(int(req['env'].get('OMP_NUM_THREADS', os.cpu_count())))
        sys.argv = [req['script'], *req['args']]
        sys.path[0] = os.path.dirname(os.path.abspath(req['script']))
        try:
            runpy.run_path(req['script'], run_name='__main__')
            code = 0
        except SystemExit as e:  # as the interpreter treats it: None is 0, a number the code, else printed and 1
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
'''
_zygote, _buffer = None, b''


def _answer(timeout):
    """The zygote's next line (read from the raw pipe, so select sees what is pending); TimeoutError after timeout s."""
    global _buffer
    end = None if timeout is None else time.monotonic() + timeout
    while b'\n' not in _buffer:
        if not select.select([_zygote.stdout], [], [], None if end is None else max(end - time.monotonic(), 0))[0]:
            raise TimeoutError
        chunk = os.read(_zygote.stdout.fileno(), 4096)
        assert chunk, 'the test zygote ended'
        _buffer += chunk
    line, _buffer = _buffer.split(b'\n', 1)
    return line.decode()


def run_script(script, *args, timeout=120):
    """`python script args` in REPO with env() (see ZYGOTE above): a CompletedProcess with text stdout and stderr."""
    global _zygote, _buffer
    if _zygote is None or _zygote.poll() is not None:
        _buffer = b''
        _zygote = subprocess.Popen([sys.executable, '-c', ZYGOTE], cwd=REPO, env=env(), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=0)
        atexit.register(_zygote.stdin.close)
    with tempfile.TemporaryDirectory() as d:
        out, err = Path(d) / 'stdout', Path(d) / 'stderr'
        _zygote.stdin.write(json.dumps({'script': str(script), 'args': list(map(str, args)), 'cwd': str(REPO),
                                        'env': env(), 'stdout': str(out), 'stderr': str(err)}) + '\n')
        _zygote.stdin.flush()
        pid = int(_answer(None))
        try:
            rc = int(_answer(timeout))
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            _answer(None)
            raise subprocess.TimeoutExpired([script, *args], timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess([sys.executable, script, *map(str, args)], rc,
                                           out.read_text(errors='replace'), err.read_text(errors='replace'))
