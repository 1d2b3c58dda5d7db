"""End-to-end tests of beit.py's command line: outputs (checkpoint, logs with masked-token accuracy, pictures, encoder
export), resume, torchrun (gloo), preemption, --init, bad input and the demo. Every run is tiny (tiny preset, 32 px,
a small tokenizer file written here, CPU)."""
import argparse
import hashlib
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import beit
import common
from clitools import REPO, assert_same, load, ok, read_log, run_script
from clitools import env as _env

DEPTH, VOCAB = 4, 32  # tiny preset: patch 8, D 128, depth 4; the test tokenizer has 32 codes


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    """A small tokenizer as a plain state dict of the DALL-E encoder module (8x downsampling, 32 codes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('tok') / 'encoder.pth'
    torch.save(beit.Encoder(8, 1, VOCAB).state_dict(), path)
    return path


def tiny(tok):
    return ['--model', 'tiny', '--input_size', '32', '--num_workers', '0', '--warmup_epochs', '1', '--log_every', '1',
            '--num_mask_patches', '6', '--min_mask_patches_per_block', '2', '--tokenizer', tok]


def run_beit(*args, timeout=120):
    return run_script('beit.py', *args, timeout=timeout)


def reference_keys(depth=DEPTH):
    keys = {'cls_token', 'mask_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
            'lm_head.weight', 'lm_head.bias', 'rel_pos_bias.relative_position_bias_table',
            'rel_pos_bias.relative_position_index'}
    for i in range(depth):
        keys |= {f'blocks.{i}.{k}' for k in ('norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias', 'gamma_1',
                                              'gamma_2', 'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias',
                                              'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
                                              'mlp.fc2.weight', 'mlp.fc2.bias')}
    return keys


def read_acc(out):
    return [{'step': r['step'], 'mlm_acc': r['mlm_acc']} for r in read_log(out)]


def check_png(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2
        return im.size


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp('synth') / 'out'
    res = ok(run_beit(*SYNTH(tok), '--output_dir', out))
    return out, res


def SYNTH(tok):  # 32 images, 4 per micro-batch x 2 accumulated = 8: 4 steps per epoch, 8 in all
    return [*tiny(tok), '--data', 'synthetic:32', '--batch_size', 4, '--global_batch', 8, '--epochs', 2, '--keep_every',
            1, '--lr', 1e-2]


# --------------------------------------------------------------------------- 1. outputs of a run


def test_cli_synthetic_end_to_end(synthetic_run):
    out, res = synthetic_run
    recs = read_log(out)
    assert [r['step'] for r in recs] == list(range(1, 9)) and all(math.isfinite(r['loss']) for r in recs)
    assert recs[0]['lr'] == 0.0 and max(r['lr'] for r in recs) == pytest.approx(1e-2)  # warmup from 0, absolute
    assert recs[0]['loss'] == pytest.approx(math.log(VOCAB), rel=0.1)  # chance level at the start
    accs = read_acc(out)  # the masked-token accuracy, logged with the loss
    assert [a['step'] for a in accs] == list(range(1, 9)) and all(0 <= a['mlm_acc'] <= 1 for a in accs)
    assert f"step 8/8 loss {recs[-1]['loss']:.4f} mlm_acc {accs[-1]['mlm_acc']:.4f} lr" in res.stdout
    check_png(out / 'mlm_acc.png')
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 8 and ckpt['epoch'] == 2.0 and type(ckpt['args']) is dict
    assert set(ckpt['model']) == reference_keys()
    assert ckpt['model']['lm_head.weight'].shape == (VOCAB, 128)  # vocab from the tokenizer file
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]
    assert load(out / 'checkpoint-1.pth')['step'] == 4 and (out / 'checkpoint-2.pth').exists()
    enc = load(out / 'encoder.pth')['model']  # the layout the reference fine-tuning code loads
    assert set(enc) == reference_keys() - {'lm_head.weight', 'lm_head.bias'}
    for k, v in enc.items():
        assert torch.equal(v, ckpt['model'][k]), k
    for name in ('vis_1.png', 'vis_2.png', 'loss.png'):
        check_png(out / name)
    assert not list(out.glob('*.tmp'))


def test_banner(synthetic_run):
    _, res = synthetic_run
    assert 'batch: 4 per GPU x 1 GPUs x 2 accum = 8; lr = 0.01 (absolute: the reference does not scale it by the ' \
           'batch)' in res.stdout
    assert '4x4 patches, up to 6 masked' in res.stdout and f'vocab {VOCAB}, 32x32 px' in res.stdout
    assert '32 images, 4 steps/epoch' in res.stdout


# --------------------------------------------------------------------------- 2. resume


def test_resume_equals_straight_run(synthetic_run, tok, tmp_path):
    A, B = synthetic_run[0], tmp_path / 'B'  # A: straight 8 steps; B: 3 steps (mid-epoch), then resumed to 8
    ok(run_beit(*SYNTH(tok), '--output_dir', B, '--max_steps', 3))
    r2 = ok(run_beit(*SYNTH(tok), '--output_dir', B))
    assert re.search(r'resumed from \S*checkpoint\.pth at step 3\b', r2.stdout), r2.stdout[-2000:]
    a, b = load(A / 'checkpoint.pth'), load(B / 'checkpoint.pth')
    assert a['step'] == b['step'] == 8
    for k in ('model', 'optimizer', 'scaler', 'rng'):
        assert_same(a[k], b[k], k)
    assert_same(load(A / 'encoder.pth'), load(B / 'encoder.pth'), 'encoder')
    assert [r['loss'] for r in read_log(A)] == [r['loss'] for r in read_log(B)]  # same crops, masks, tokens
    assert read_acc(A) == read_acc(B)
    torch.manual_seed(0)
    fresh = beit.BEiT((32, 32), 8, 128, 4, 4, VOCAB).state_dict()
    assert not torch.equal(fresh['blocks.0.attn.qkv.weight'], b['model']['blocks.0.attn.qkv.weight'])


# --------------------------------------------------------------------------- 3. torchrun, 2 processes, gloo


TRAIN_SCRIPT = '''
import os
import sys
import torch
sys.path.insert(0, {repo!r})
import beit
import common

model = beit.main(common.parse_args(beit.Args, demo=beit.DEMO))  # exactly what `python beit.py ...` runs
torch.save(model.state_dict(), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.pt'))
'''


def test_torchrun_two_processes_train(tok, tmp_path):
    out, script = tmp_path / 'out', tmp_path / 'train.py'
    script.write_text(TRAIN_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           *map(str, tiny(tok)), '--data', 'synthetic:16', '--batch_size', '2', '--global_batch', '4', '--epochs', '2',
           '--lr', '1e-2', '--max_steps', '3', '--output_dir', str(out)]
    res = ok(subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=180))
    assert res.stdout.count('batch: 2 per GPU x 2 GPUs x 1 accum = 4') == 1  # rank 0 alone prints
    assert '16 images, 4 steps/epoch' in res.stdout
    assert [r['step'] for r in read_log(out)] == [1, 2, 3] and [a['step'] for a in read_acc(out)] == [1, 2, 3]
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 3 and len(ckpt['rng']) == 2
    m0, m1 = load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt')
    assert_same(m0, m1, 'rank0 vs rank1')  # DDP averaged the gradients
    assert_same(m0, ckpt['model'], 'rank0 vs checkpoint')
    assert (out / 'encoder.pth').exists()


# --------------------------------------------------------------------------- 4. preemption


# --------------------------------------------------------------------------- 5. --init from a reference release


def test_init_from_reference_style_file(tok, tmp_path):
    """Like beit_base_patch16_224_pt22k.pth: the state dict under 'module' (or 'model'), args an argparse.Namespace."""
    torch.manual_seed(123)
    sd = {k: (v + torch.randn_like(v) if v.is_floating_point() else v)
          for k, v in beit.BEiT((32, 32), 8, 128, 4, 4, VOCAB).state_dict().items()}
    path = tmp_path / 'beit_pretrained.pth'
    torch.save({'module': sd, 'args': argparse.Namespace(model='beit_base_patch16_224_8k_vocab'), 'epoch': 799}, path)
    out = tmp_path / 'out'
    res = ok(run_beit(*tiny(tok), '--data', 'synthetic:8', '--batch_size', 4, '--global_batch', 4, '--epochs', 1,
                      '--max_steps', 1, '--lr', 1e-30, '--min_lr', 0, '--init', path, '--output_dir', out))
    assert f'--init {path}: loaded {len(sd)} tensors' in res.stdout and '(kept as initialised): 0 ' in res.stdout
    model = load(out / 'checkpoint.pth')['model']
    for k in sd:  # lr 1e-30 (0 is refused): one step moves no weight by more than 1e-30
        torch.testing.assert_close(model[k], sd[k], rtol=0, atol=1e-30, msg=k)


# --------------------------------------------------------------------------- 6. bad input


def test_image_folder_with_unreadable_files(tok, tmp_path):
    data = tmp_path / 'data' / 'cls'
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, mode in enumerate(['RGB', 'L', 'RGBA', 'P', 'CMYK', 'RGB', 'LA', 'RGB']):
        img = Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 50, 3), dtype=np.uint8))
        img = img.quantize(16) if mode == 'P' else img.convert(mode)
        img.save(data / f'img{i}.{"jpg" if mode in ("RGB", "L", "CMYK") else "png"}')
    (data / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg' + bytes(100))
    out = tmp_path / 'out'
    res = ok(run_beit(*tiny(tok), '--data', tmp_path / 'data', '--batch_size', 9, '--global_batch', 9, '--epochs', 1,
                      '--output_dir', out))
    assert 'skipping unreadable image' in res.stderr and 'bad.jpg' in res.stderr
    assert '9 images, 1 steps/epoch' in res.stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1] and recs[0]['skipped'] == 1 and math.isfinite(recs[0]['loss'])
    assert (out / 'encoder.pth').exists()


def _main_exit(argv):
    with pytest.raises(SystemExit) as e:
        beit.main(common.parse_args(beit.Args, argv=[str(a) for a in argv]))
    return e.value.code


def test_bad_arguments(tok, tmp_path, restore_signals):
    out = ['--output_dir', tmp_path / 'out']
    code = _main_exit(['--model', 'tiny', '--data', 'synthetic:8', '--num_mask_patches', 24, *out])  # tiny: 64 px
    assert '--tokenizer' in code and 'encoder.pkl' in code
    code = _main_exit([*tiny(tok), '--data', 'synthetic:8', '--input_size', '36', *out])
    assert 'divisible' in code and '36' in code
    assert '--model huge is not one of tiny, base, large' in _main_exit(['--model', 'huge', '--data', 'synthetic:8',
                                                                       *out])
    for n in (0, 16, 5):  # 16 patches at 32 px; fewer than the minimum block of 6 cannot be drawn
        code = _main_exit([*tiny(tok), '--data', 'synthetic:8', '--num_mask_patches', n, '--min_mask_patches_per_block',
                           6 if n == 5 else 2, *out])
        assert code.startswith(f'--num_mask_patches {n}: ') and ('to 15 of the 16 patches' in code or n == 0), code
    code = _main_exit([*tiny(tok), '--data', 'synthetic:8', '--lr', 0, *out])
    assert code == '--lr 0.0: must be greater than 0'
    code = _main_exit([*tiny(tok)[:-1], tmp_path / 'missing.pkl', '--data', 'synthetic:8', *out])
    assert code == f'--tokenizer {tmp_path / "missing.pkl"}: no such file'
    code = _main_exit([*tiny(tok), '--data', tmp_path / 'nope', *out])
    assert 'does not exist' in code
    torch.save({'model': {'x': torch.zeros(1)}}, tmp_path / 'notatok.pth')
    code = _main_exit([*tiny(tok)[:-1], tmp_path / 'notatok.pth', '--data', 'synthetic:8', *out])
    assert 'no DALL-E encoder or dVAE tensors' in code


def test_refused_tokenizer_pickle_from_the_command_line(tok, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('EXECUTED',))
    torch.save(Evil(), tmp_path / 'evil.pkl')
    res = run_beit(*tiny(tok)[:-1], tmp_path / 'evil.pkl', '--data', 'synthetic:8', '--output_dir', tmp_path / 'o')
    assert res.returncode != 0 and 'refused' in res.stderr and 'EXECUTED' not in res.stdout
    assert 'Traceback' not in res.stderr


# --------------------------------------------------------------------------- 7. the demo (shrunk)


def test_demo_trains_its_tokenizer_then_beit(tmp_path, restore_signals, capsys):
    out = tmp_path / 'demo'
    res = ok(run_beit('--demo', '--eval_data', '', '--data', 'synthetic:32', '--input_size', 32, '--batch_size', 16,
                      '--global_batch', 16, '--epochs', 1, '--tok_epochs', 2, '--num_workers', 0,
                      '--num_mask_patches', 6, '--min_mask_patches_per_block', 2, '--output_dir', out))
    assert 'NOT the DALL-E tokenizer' in res.stdout and f'tokenizer {out / "tokenizer" / "tokenizer.pth"}' in res.stdout
    assert [r['step'] for r in read_log(out / 'tokenizer')] == [4]  # 2 epochs x 2 steps, logged at the end
    tok = beit.load_tokenizer(str(out / 'tokenizer' / 'tokenizer.pth'))
    assert type(tok) is beit.DVAE and tok.vocab == 64  # the demo's vocabulary
    assert load(out / 'checkpoint.pth')['model']['lm_head.weight'].shape == (64, 128)
    w, _ = check_png(out / 'vis_1.png')
    assert w == 5 * (4 * 32 + 2) + 2  # 5 columns: original, masked, true / predicted tokens decoded, right/wrong
    check_png(out / 'tokenizer' / 'loss.png')
    assert load(out / 'checkpoint.pth')['tokenizer'] == fingerprint(tok)
    argv = ['--demo', '--eval_data', '', '--data', 'synthetic:32', '--input_size', 32, '--batch_size', 16,
            '--global_batch', 16, '--epochs', 2, '--num_workers', 0, '--num_mask_patches', 6,
            '--min_mask_patches_per_block', 2, '--output_dir', out]
    beit.main(common.parse_args(beit.Args, [str(a) for a in argv], beit.DEMO))  # its own tokenizer, read back: resumes
    assert 'resumed from' in capsys.readouterr().out and load(out / 'checkpoint.pth')['step'] == 4


def fingerprint(tokenizer):
    """What beit.py records in its checkpoints: sha256 of the tokenizer's weights (float32 bytes, in order)."""
    weights = b''.join(v.float().numpy().tobytes() for v in tokenizer.state_dict().values())
    return hashlib.sha256(weights).hexdigest()[:16]


def test_resume_with_another_tokenizer_is_refused(tok, tmp_path, restore_signals):
    """The same weights in another file resume; another tokenizer of the same vocabulary (other targets) is refused
    with one line and the checkpoint is left as it is; a checkpoint from before the fingerprint resumes."""
    torch.manual_seed(1)
    other, same = tmp_path / 'other.pth', tmp_path / 'same.pth'
    torch.save(beit.Encoder(8, 1, VOCAB).state_dict(), other)
    torch.save({'model': load(tok)}, same)
    out = tmp_path / 'out'
    base = [*tiny(tok)[:-2], '--data', 'synthetic:8', '--batch_size', 4, '--global_batch', 4, '--epochs', 4,
            '--output_dir', out, '--tokenizer']
    run = lambda *argv: beit.main(common.parse_args(beit.Args, argv=[str(a) for a in [*base, *argv]]))  # noqa: E731
    run(tok, '--max_steps', 1)
    ckpt = out / 'checkpoint.pth'
    before, recorded = ckpt.read_bytes(), load(ckpt)['tokenizer']
    assert recorded == fingerprint(beit.load_tokenizer(str(tok))) != fingerprint(beit.load_tokenizer(str(other)))
    code = _main_exit([*base, other, '--max_steps', 2])
    assert code == f'resuming {ckpt}: made with another tokenizer (not --tokenizer {other}); give it, or another ' \
                   f'--output_dir', code
    code = _main_exit([*base, other, '--resume', ckpt, '--output_dir', tmp_path / 'out2'])
    assert code.startswith(f'--resume {ckpt}: made with another tokenizer'), code
    assert ckpt.read_bytes() == before and [r['step'] for r in read_log(out)] == [1]
    run(same, '--max_steps', 2)
    assert load(ckpt)['step'] == 2
    old = load(ckpt)  # written before checkpoints recorded the tokenizer: nothing to compare, it resumes
    del old['tokenizer']
    torch.save(old, ckpt)
    run(tok, '--max_steps', 3)
    assert load(ckpt)['step'] == 3 and load(ckpt)['tokenizer'] == recorded


def test_every_check_runs_before_the_tokenizer_stage(tmp_path, restore_signals):
    """--demo trains its own tokenizer first: a bad batch, data or tokenizer file stops before it trains or writes."""
    demo = ['--demo', '--eval_data', '', '--data', 'synthetic:32', '--input_size', 32, '--batch_size', 16,
            '--global_batch', 16, '--tok_epochs', 1, '--num_workers', 0, '--num_mask_patches', 6,
            '--min_mask_patches_per_block', 2]
    for i, (argv, words) in enumerate([
            (['--global_batch', 24], '--global_batch 24 is not a multiple of --batch_size 16 x 1 processes'),
            (['--data', 'synthetic:8'], '8 images over 1 process(es) do not fill one batch of 16'),
            (['--data', tmp_path / 'nope'], 'does not exist'),
            (['--tokenizer', tmp_path / 'missing.pth'], f'--tokenizer {tmp_path / "missing.pth"}: no such file')]):
        out = tmp_path / f'out{i}'
        with pytest.raises(SystemExit) as e:
            beit.main(common.parse_args(beit.Args, [str(a) for a in [*demo, *argv, '--output_dir', out]], beit.DEMO))
        assert words in e.value.code and '\n' not in e.value.code, e.value.code
        assert not out.exists() or [p.name for p in out.iterdir() if p.name != '.lock'] == []  # the lock: in-process


TORCHRUN_DEMO = '''
import sys
sys.path.insert(0, {repo!r})
import beit
import common

beit.main(common.parse_args(beit.Args, demo=beit.DEMO))  # exactly what `python beit.py ...` runs
'''


def test_torchrun_demo_trains_its_tokenizer_then_beit(tmp_path):
    """Both stages in one torchrun job (the tokenizer stage used to end its process group and start another, which
    hung after the tokenizer in most tries): it finishes, and BEiT's targets are the tokenizer it saved."""
    out, script = tmp_path / 'out', tmp_path / 'demo.py'
    script.write_text(TORCHRUN_DEMO.format(repo=str(REPO)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script), '--demo',
           '--eval_data', '', '--data', 'synthetic:32', '--input_size', '32', '--batch_size', '4', '--global_batch',
           '8', '--tok_epochs', '1', '--max_steps', '2', '--num_workers', '0', '--num_mask_patches', '6',
           '--min_mask_patches_per_block', '2', '--log_every', '1', '--output_dir', str(out)]
    res = ok(subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=240))
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert [r['step'] for r in read_log(out / 'tokenizer')] == [1, 2] and [r['step'] for r in read_log(out)] == [1, 2]
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and (out / 'encoder.pth').exists()
    tokenizer = beit.load_tokenizer(str(out / 'tokenizer' / 'tokenizer.pth'))
    assert ckpt['tokenizer'] == fingerprint(tokenizer)
