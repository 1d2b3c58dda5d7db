"""End-to-end tests of m3ae.py's command line: outputs, batch arithmetic, the vocabulary, resume, torchrun (gloo),
caption folders, a tsv, unpaired text, --vocab and --init. Every run is tiny (tiny preset, 32 px, CPU); runs are
in-process where a subprocess adds nothing (SIGTERM and bad input are covered by test_bad_input.py)."""
import contextlib
import io
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import m3ae
from clitools import REPO, assert_same, env, load, read_log
from test_m3ae import VOCAB, reference_keys

TINY = ['--model', 'tiny', '--input_size', 32, '--text_len', 12, '--num_workers', 0, '--warmup_epochs', 1,
        '--log_every', 1]
KEYS = reference_keys(m3ae.MODELS['tiny'][2], m3ae.MODELS['tiny'][5])
KEYS_DEPTHS = m3ae.MODELS['tiny'][2], m3ae.MODELS['tiny'][5]
TIMM_KEYS = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight',
             'norm.bias'} | {k.removeprefix('encoder.') for k in KEYS if k.startswith('encoder.blocks.')}


def run(*argv):
    """main() in this process; returns what it printed. Signal handlers and threads are put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    threads, buf = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            m3ae.main(common.parse_args(m3ae.Args, [str(a) for a in argv]))
    finally:
        torch.set_num_threads(threads)
        for s, h in saved.items():
            signal.signal(s, h)
    return buf.getvalue()


STRAIGHT = [*TINY, '--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 16, '--epochs', 2,
            '--keep_every', 1]


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('synth') / 'out'
    return out, run(*STRAIGHT, '--output_dir', out)


def test_cli_synthetic_end_to_end(synthetic_run):
    out, stdout = synthetic_run
    assert 'batch: 8 per GPU x 1 GPUs x 2 accum = 16; lr = 0.00015 x 16 / 256 = 9.375e-06' in stdout
    assert '16 patches + 12 text positions, vocab 24; 32 pairs, 2 steps/epoch' in stdout
    recs = read_log(out)
    assert [r['step'] for r in recs] == [1, 2, 3, 4] and recs[0]['lr'] == 0.0 and recs[-1]['epoch'] == 2.0
    assert all(np.isfinite(r['loss']) and r['bad_steps'] == 0 for r in recs)
    assert all(0 <= r['mlm_acc'] <= 1 for r in recs) and recs[-1]['mlm_acc'] > 0  # masked-word accuracy, as BEiT's
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 4 and ckpt['method'] == 'm3ae.py' and set(ckpt['model']) == KEYS
    assert [g['weight_decay'] for g in ckpt['optimizer']['param_groups']] == [0.0, 0.05]
    assert len(ckpt['optimizer']['state']) == len(KEYS)  # no frozen tensors: position tables are buffers
    c1 = load(out / 'checkpoint-1.pth')
    assert c1['step'] == 2 and not torch.equal(c1['model']['decoder_text_output.weight'],
                                               ckpt['model']['decoder_text_output.weight'])
    ds, words = m3ae.SyntheticPairs(32, 32, 12, seed=42), (out / 'vocab.txt').read_text().splitlines()
    counts = [sum(ds.caption(i).split().count(w) for i in range(32)) for w in words[2:]]
    assert words[:5] == ['[PAD]', '[UNK]', 'a', 'at', 'on'] and counts == sorted(counts, reverse=True)  # by frequency
    assert set(words[2:]) == {w for i in range(32) for w in ds.caption(i).split()}
    assert ckpt['model']['text_embedding.weight'].shape == (24, m3ae.MODELS['tiny'][1])
    enc = load(out / 'encoder.pth')['model']
    assert set(enc) == TIMM_KEYS and enc['pos_embed'].shape == (1, 17, m3ae.MODELS['tiny'][1])
    assert torch.equal(enc['blocks.0.attn.qkv.weight'], ckpt['model']['encoder.blocks.0.attn.qkv.weight'])
    for name in ('vis_1.png', 'vis_2.png', 'loss.png', 'mlm_acc.png'):
        with Image.open(out / name) as im:
            assert im.format == 'PNG' and len(im.getcolors(1 << 20) or range(1000)) > 2


def test_resume_equals_a_straight_run(synthetic_run, tmp_path):
    """Stopped after 3 steps (inside the 2nd epoch, accumulation 2), then restarted with the same command: the
    weights, optimizer state and log equal the uninterrupted run bit for bit."""
    straight, _ = synthetic_run
    out = tmp_path / 'out'
    run(*STRAIGHT, '--output_dir', out, '--max_steps', 3)
    assert load(out / 'checkpoint.pth')['step'] == 3 and (out / 'vis_3.png').exists()
    stdout = run(*STRAIGHT, '--output_dir', out)
    assert 'resumed from' in stdout and 'at step 3' in stdout
    a, b = load(out / 'checkpoint.pth'), load(straight / 'checkpoint.pth')
    assert_same(a['model'], b['model'], 'model')
    assert_same(a['optimizer'], b['optimizer'], 'optimizer')
    assert [r['loss'] for r in read_log(out)][3:] == [r['loss'] for r in read_log(straight)][3:]


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'm3ae.py', *map(
        str, [*TINY, '--data', 'synthetic:32', '--batch_size', 4, '--global_batch', 16, '--epochs', 1,
              '--output_dir', out])]
    res = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'batch: 4 per GPU x 2 GPUs x 2 accum = 16' in res.stdout
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2 and set(ckpt['model']) == KEYS
    assert [r['step'] for r in read_log(out)] == [1, 2] and (out / 'encoder.pth').exists()


@pytest.fixture
def caption_data(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    (root / 'train' / 'x').mkdir(parents=True)
    caps = ['the cat!', 'Hello, cafe', '', 'a cat', 'unaffable cats', 'the the', None, 'hello']
    for i, cap in enumerate(caps):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(root / 'train' / 'x' / f'{i}.png')
        if cap is not None:
            (root / 'train' / 'x' / f'{i}.txt').write_text(cap)
    (tmp_path / 'pairs.tsv').write_text(''.join(f'data/train/x/{i}.png\t{c or ""}\n' for i, c in enumerate(caps)))
    (tmp_path / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n')
    (tmp_path / 'wiki.txt').write_text('the cat\nhello, the cafe!\n\nunaffable\n')
    return tmp_path


def test_caption_folder_vocab_unpaired_text_and_init(caption_data, tmp_path):
    t = caption_data
    common_args = [*TINY, '--batch_size', 4, '--global_batch', 4, '--unpaired_len', 6]
    out = tmp_path / 'folder'
    stdout = run(*common_args, '--data', t / 'data', '--vocab', t / 'vocab.txt', '--text_data', t / 'wiki.txt',
                 '--max_steps', 2, '--output_dir', out)
    assert f'vocab {len(VOCAB)}; 8 pairs, 4 texts, 2 steps/epoch' in stdout
    assert not (out / 'vocab.txt').exists()  # --vocab given: nothing built
    ckpt = load(out / 'checkpoint.pth')
    assert ckpt['step'] == 2 and ckpt['model']['decoder_text_output.weight'].shape[0] == len(VOCAB)
    assert all(np.isfinite(r['loss']) for r in read_log(out))
    # the tsv of the same pairs, started from those weights: --blr 1e-30 leaves them where --init put them
    out2 = tmp_path / 'tsv'
    stdout = run(*common_args, '--data', t / 'pairs.tsv', '--vocab', t / 'vocab.txt', '--max_steps', 1,
                 '--blr', 1e-30, '--init', out / 'checkpoint.pth', '--output_dir', out2)
    assert '8 pairs, 2 steps/epoch' in stdout
    after = load(out2 / 'checkpoint.pth')['model']
    for k, v in ckpt['model'].items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-30)
    # no --vocab: a word vocabulary of the captions, saved beside the checkpoint
    out3 = tmp_path / 'words'
    run(*common_args, '--data', t / 'pairs.tsv', '--max_steps', 1, '--output_dir', out3)
    words = (out3 / 'vocab.txt').read_text().splitlines()
    assert words[:2] == ['[PAD]', '[UNK]'] and words[2:4] == ['the', 'cat']
    assert set(words) == {'[PAD]', '[UNK]', 'the', 'cat', '!', 'hello', ',', 'cafe', 'a', 'unaffable', 'cats'}


def stop(*argv):
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert isinstance(e.value.code, str) and '\n' not in e.value.code, e.value.code
    return e.value.code


def test_text_files_that_are_not_utf8_or_vocabularies_without_pad_and_unk(caption_data, tmp_path):
    """One line naming the file (and the byte offset); --vocab and --text_data are read before anything is written."""
    t, out = caption_data, tmp_path / 'out'
    base = [*TINY, '--batch_size', 4, '--global_batch', 4, '--data', t / 'data', '--output_dir', out]
    (t / 'latin1.txt').write_bytes('the caf\xe9\n'.encode('latin-1'))
    (t / 'binary.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00')
    (t / 'empty.txt').write_bytes(b'')
    (t / 'nopad.txt').write_text('hello\ncat\n[UNK]\n')
    cases = [('--text_data', 'latin1.txt', 'not UTF-8 text (byte 7 is 0xe9)'),
             ('--vocab', 'binary.txt', 'not UTF-8 text (byte 0 is 0x89)'), ('--vocab', 'empty.txt', 'is empty'),
             ('--vocab', 'nopad.txt', 'lacks [PAD]: padding is id 0 = [PAD]')]
    for flag, name, words in cases:
        assert f'{flag} {t / name}' + (': ' if 'UTF' in words else ' ') + words in stop(*base, flag, t / name)
        assert not out.exists()
    (t / 'latin1.tsv').write_bytes(b'data/train/x/0.png\tthe cat\ndata/train/x/1.png\tcaf\xe9\n')
    line = stop(*base[:-4], '--data', t / 'latin1.tsv', '--vocab', t / 'vocab.txt', '--output_dir', out)
    assert line == f'--data {t / "latin1.tsv"}: not UTF-8 text (byte 49 is 0xe9); convert it first, e.g. iconv -f ' \
                   f'latin1 -t utf-8'


def test_a_tsv_with_a_byte_order_mark(caption_data, tmp_path):
    """The BOM is read away: the first path is found (it was skipped as unreadable with U+FEFF in its name)."""
    t = caption_data
    (t / 'bom.tsv').write_bytes(b'\xef\xbb\xbf' + (t / 'pairs.tsv').read_bytes())
    ds = m3ae.CaptionedImages(t / 'bom.tsv', 32, 8)
    assert ds.files[0] == t / 'data/train/x/0.png' and ds.files[0].is_file() and ds.texts[0] == 'the cat!'
    ds.tokenizer = m3ae.WordPiece(VOCAB)
    assert ds[(0, 0)][2] == -1  # read, not replaced by the next pair


def test_init_from_the_reference_flax_pickle(caption_data, tmp_path):
    """--init of the reference's pickle (see test_m3ae.py) starts from its weights: --blr 1e-30 keeps them."""
    from test_m3ae import cloudpickle_like, flax_params
    torch.manual_seed(3)
    src = m3ae.M3AE(32, *m3ae.MODELS['tiny'], len(VOCAB), max_len=256).state_dict()
    (tmp_path / 'model.pkl').write_bytes(cloudpickle_like(flax_params(src, KEYS_DEPTHS[0], KEYS_DEPTHS[1])))
    out = tmp_path / 'out'
    stdout = run(*TINY, '--batch_size', 4, '--global_batch', 4, '--data', caption_data / 'pairs.tsv', '--vocab',
                 caption_data / 'vocab.txt', '--max_steps', 1, '--blr', 1e-30, '--init', tmp_path / 'model.pkl',
                 '--output_dir', out)
    assert f'--init {tmp_path / "model.pkl"}: Flax parameters of the reference at step 1234: 92 of 92' in stdout
    after = load(out / 'checkpoint.pth')['model']
    for k, v in src.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-30)
