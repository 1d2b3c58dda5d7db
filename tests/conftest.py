# torch.equal / clitools.assert_same only for the same computation recomputed (resume with the same threads and sizes,
# a repeated call, a reloaded state, int/bool/uint8 data); different computations get a stated fp32 tolerance (DESIGN 8)
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if 'OMP_NUM_THREADS' not in os.environ:  # one intra-op thread: the models are tiny, and spinning OpenMP threads cost
    torch.set_num_threads(1)  # 2.5x the CPU time on 2 cores shared with the tests' subprocesses and loader workers


@pytest.fixture
def restore_signals():
    """main() installs SIGTERM/SIGUSR1/SIGINT handlers; put pytest's back after in-process runs. One intra-op thread
    meanwhile: spinning OpenMP threads make tiny models very slow when another process shares the cores."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in saved.items():
        signal.signal(s, h)
