"""The GPU paths of every method file, checked on the CPU with each file's tiny preset: a training step has no
data-dependent shape (the forward runs on fake tensors, and torch.compile captures forward and loss as one graph,
so a new host sync or graph break fails here), bf16 autocast gives a finite loss close to fp32, and fp16 with a
GradScaler gives finite gradients at the scaler's initial scale. A new method file is covered by adding a builder
to BUILDERS (test_every_method_file_has_a_builder asks for one)."""
import importlib
import json
import math
import random
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

import common
from clitools import REPO


def images(B, H, C=3, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, *(() if T is None else (T,)), H, H, generator=g)  # (B, C, [T,] H, H)


# Each builder: the method's tiny preset at a small input -> (model, forward arguments of one training step).


def mae(m):
    return m.MAE(32, *m.MODELS['tiny']), (images(2, 32), 0.75)


def simmim(m, name='tiny'):
    mask = m.block_mask(2, (32, 32), 16, m.MODELS[name]['patch'], 0.6, 'cpu', torch.Generator().manual_seed(0))
    return m.build_model(name, (32, 32)), (images(2, 32), mask)


def beit(m):
    mask = torch.stack([torch.from_numpy(m.block_mask(random.Random(i), (4, 4), 6, 2).reshape(-1)) for i in range(2)])
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    return m.BEiT((32, 32), *m.MODELS['tiny'][:4], vocab=32), (images(2, 32), mask, ids, 6)  # k = 6 = the budget


def um_mae(m, name='tiny'):
    mask = m.uniform_mask(2, 4, 4, 'cpu', torch.Generator().manual_seed(0))  # 8-px units on 32 px
    return m.UMMAE(m.MODELS[name], (32, 32), 3, 0.25), (images(2, 32), mask)


def hivit(m):
    return m.HiViTMAE((32, 32), *m.MODELS['micro']), (images(2, 32), 0.75)


def mixmim(m):
    return m.MixMIM((32, 32), *m.MODELS['tiny']), (images(2, 32), 0.5)


def videomae(m):
    return m.VideoMAE((32, 32), *m.MODELS['tiny'], num_frames=4), (images(2, 32, T=4), 0.9)


def m3ae(m):
    text = torch.randint(2, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    pad = torch.arange(6)[None] >= torch.tensor([[6], [3]])  # (2, 6): the second caption has 3 tokens
    return m.M3AE((32, 32), *m.MODELS['tiny'], vocab_size=20, max_len=6), (images(2, 32), text, pad)


def milan(m):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = m.CLIPVisual(8, 64, 1, 17, 32).eval().requires_grad_(False)
    x = images(2, 32)
    target, importance = teacher(x)  # (2, 17, 32), (2, 16)
    return m.MILAN((32, 32), *m.MODELS['tiny'], out_dim=32), (x, target, importance, 0.75)


def maskfeat(m):
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])  # 2x2 patches of 16 px, 32 px
    return m.MaskFeat((32, 32), *m.MODELS['tiny']), (images(2, 32), mask)


def ijepa(m):
    masks = m.sample_masks(m.Args(), (12, 12), 2, 0, torch.Generator().manual_seed(0))  # 48 px, 4-px patches
    return m.IJEPA((48, 48), *m.MODELS['tiny'][:7]), (images(2, 48), *masks)


BUILDERS = {'mae': mae, 'simmim': simmim, 'simmim[vit_tiny]': lambda m: simmim(m, 'vit_tiny'), 'beit': beit,
            'um_mae': um_mae, 'um_mae[pvt_tiny]': lambda m: um_mae(m, 'pvt_tiny'), 'hivit': hivit, 'mixmim': mixmim,
            'videomae': videomae, 'm3ae': m3ae, 'milan': milan, 'maskfeat': maskfeat, 'ijepa': ijepa}
FILE = lambda case: case.split('[')[0]  # noqa: E731
CASES = [c for c in BUILDERS if (REPO / f'{FILE(c)}.py').exists()]
METHOD_FILES = sorted(p.stem for p in REPO.glob('*.py') if p.stem != 'common')


def build(case):
    torch.manual_seed(0)
    model, args = BUILDERS[case](importlib.import_module(FILE(case)))
    return model.train(), args


def step(model, args, dtype=None, scaler=None):
    """One training step's forward and backward (masks drawn from the same seed): (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype) if dtype else nullcontext():
        loss = model(*args)[0]
    (scaler.scale(loss) if scaler else loss).backward()
    return loss.detach().float(), {n.removeprefix('_orig_mod.'): p.grad for n, p in model.named_parameters()
                                   if p.grad is not None}


def test_every_method_file_has_a_builder():
    assert set(METHOD_FILES) <= {FILE(c) for c in BUILDERS}, 'add a builder of the new file to BUILDERS'


@pytest.mark.parametrize('method', METHOD_FILES)
def test_amp_default_is_bf16_on_cuda_and_fp32_on_the_cpu(method):
    amp = importlib.import_module(method).Args().amp
    autocast, scaler = common.amp_setup(amp, torch.device('cpu'))
    assert isinstance(autocast, nullcontext) and not scaler.is_enabled()  # the CPU default: fp32
    autocast, scaler = common.amp_setup('bf16', torch.device('cpu'))  # asked for: bf16 autocast on the CPU too
    assert autocast.fast_dtype == torch.bfloat16 and autocast.device == 'cpu' and not scaler.is_enabled()
    autocast, scaler = common.amp_setup('fp16', torch.device('cpu'))
    assert autocast.fast_dtype == torch.float16 and scaler.is_enabled()
    assert isinstance(common.amp_setup('none', torch.device('cpu'))[0], nullcontext)


@pytest.mark.parametrize('case', CASES)
def test_bf16_and_fp16_steps(case):
    model, args = build(case)
    ref, ref_grads = step(model, args)
    loss, grads = step(model, args, torch.bfloat16)
    assert math.isfinite(loss) and all(g.isfinite().all() for g in grads.values()) and grads.keys() == ref_grads.keys()
    assert abs(loss - ref) <= 0.02 * abs(ref) + 1e-3, (loss, ref)  # bf16 keeps ~3 significant digits
    scaler = torch.amp.GradScaler('cpu')
    loss, grads = step(model, args, torch.float16, scaler)
    bad = [n for n, g in grads.items() if not g.isfinite().all()]
    assert scaler.get_scale() == 65536.0 and not bad, bad  # finite at the initial scale: no step would be skipped
    assert abs(loss - ref) <= 0.01 * abs(ref) + 1e-3, (loss, ref)


class TokenUses(TorchDispatchMode):
    """Records the dtype of every op output computed from one parameter (the ops autocast inserts included)."""

    def __init__(self, param):
        super().__init__()
        self.ptr, self.uses = param.data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.data_ptr() == self.ptr for a in tree_leaves((args, kwargs))):
            self.uses.append((str(func), out.dtype))
        return out


@pytest.mark.parametrize('case', [c for c in ('beit', 'simmim[vit_tiny]', 'mixmim', 'maskfeat') if c in CASES])
def test_mask_token_gradient_is_summed_in_fp32(case):
    """The mask token is broadcast over every masked position, so its gradient is a sum over them. Under fp16 autocast
    the reference keeps that product in fp32; a token cast to fp16 first has its gradient summed into fp16, which
    overflows once gradient x GradScaler's scale (65536 at first) passes 65504. No op may make the token fp16."""
    model, args = build(case)
    token = next(p for n, p in model.named_parameters() if n.endswith('mask_token'))
    with torch.autocast('cpu', torch.float16), TokenUses(token) as mode:
        model(*args)
    assert mode.uses and all(dtype == torch.float32 for _, dtype in mode.uses), mode.uses


@pytest.mark.parametrize('case', CASES)
def test_forward_has_no_data_dependent_shape(case):
    """common.count_flops runs the training step (forward and backward) under FakeTensorMode, where an op whose output
    shape depends on values (boolean indexing, nonzero, .item()) raises; it leaves the RNG and gradients alone."""
    model, args = build(case)
    rng = torch.get_rng_state()
    assert common.count_flops(model, *args) > 0
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize('case', CASES)
def test_compile_captures_one_graph(case):
    """fullgraph=True raises on any graph break (a host sync such as .item() or a data-dependent shape breaks the
    graph). The 'eager' backend runs the captured graph without code generation; the backward's shapes are checked
    on the meta device above."""
    model, args = build(case)
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    loss, grads = step(compiled, args)
    ref, ref_grads = step(model, args)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)  # the same computation, the same masks
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-6)


def test_count_flops_counts_forward_and_backward():
    """2 FLOPs per multiply-add. Backward: input and weight gradients of the second Linear, only the weight gradient
    of the first (its input needs none)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x)).square().mean(), {}
    net, x = Net(), torch.randn(1, 3, 4)
    fc1, fc2 = 2 * 3 * 4 * 8, 2 * 3 * 8 * 2
    assert common.count_flops(net, x) == (fc1 + fc2) + (2 * fc2 + fc1)
    assert common.count_flops(net.requires_grad_(False), x) == fc1 + fc2  # a frozen network: forward only
    assert net.fc1.weight.grad is None  # counted on fake tensors: the module keeps no gradient


def test_count_flops_equals_a_real_step():
    """On fake tensors the count equals the count of a real training step (attention as plain matmuls, as counted)."""
    model, args = build('mae')
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as real:
        model(*args)[0].backward()
    model.zero_grad(set_to_none=True)
    assert common.count_flops(model, *args) == real.get_total_flops() > 0


def test_logger_gives_tflops_and_mfu(tmp_path, restore_signals, capsys):
    d = SimpleNamespace(world=1, rank=0, device=torch.device('cpu'), main=True)
    log = common.Logger(tmp_path, d, step=0, flops=4e9)
    assert log.peak == 0  # the CPU has no known peak: TFLOP/s only
    log.add(torch.tensor(1.0), torch.tensor([-1]))
    log.stepped(torch.tensor(False))
    log.log_step(0.1, 1, 10, 0.1, global_batch=8, max_bad_steps=5)
    log.peak = 100  # as on a GPU whose peak is 100 TFLOP/s
    log.add(torch.tensor(1.0), torch.tensor([-1]))
    log.stepped(torch.tensor(False))
    log.log_step(0.2, 2, 10, 0.1, global_batch=8, max_bad_steps=5)
    first, rec = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert 'mfu' not in first and first['tflops'] == pytest.approx(4e9 * first['img_per_s'] / 1e12)
    assert rec['tflops'] == pytest.approx(4e9 * rec['img_per_s'] / 1e12)
    assert rec['mfu'] == pytest.approx(rec['tflops'] / 100)
    lines = capsys.readouterr().out.splitlines()
    assert 'TFLOP/s/GPU' in lines[0] and 'MFU' not in lines[0] and f"MFU {rec['mfu']:.1%}" in lines[1]


def test_peak_tflops_by_gpu_name():
    names = {'NVIDIA H100 80GB HBM3': 989, 'NVIDIA H100 PCIe': 756, 'NVIDIA H100 NVL': 835, 'NVIDIA H200': 989,
             'NVIDIA GH200 480GB': 989, 'NVIDIA A100-SXM4-80GB': 312, 'NVIDIA A100 80GB PCIe': 312, 'NVIDIA L40S': 362,
             'NVIDIA A10G': 0, 'NVIDIA GeForce RTX 4090': 0, '': 0}  # unknown: no MFU
    assert {n: common.peak_tflops(n) for n in names} == names
