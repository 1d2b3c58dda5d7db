"""Evaluation on --eval_data (common.Evaluation, knn_top1, linear_probe) and its wiring in every method file: DINO's
k-NN against a brute-force vote, the linear probe on separable features, the splits, the torchrun gather, training
untouched by evaluation, and --eval_only on an exported encoder.pth giving the run's own final numbers."""
import functools
import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from clitools import METHODS, REPO, assert_same, env, load, ok, read_log



# --------------------------------------------------------------------------- the measures


def brute_force_knn(train, train_labels, val, val_labels, k, T):
    """DINO eval_knn.py's vote, one val item at a time in plain Python."""
    correct = 0
    for v, y in zip(val.tolist(), val_labels.tolist()):
        sims = []
        for t, c in zip(train.tolist(), train_labels.tolist()):
            dot = sum(a * b for a, b in zip(v, t))
            sims.append((dot / math.sqrt(sum(a * a for a in v) * sum(b * b for b in t)), c))
        votes = {}
        for s, c in sorted(sims, reverse=True)[:k]:
            votes[c] = votes.get(c, 0.0) + math.exp(s / T)
        correct += max(votes, key=votes.get) == y
    return 100.0 * correct / len(val_labels)


def test_knn_top1_is_dinos_weighted_vote():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=g)
    yt, yv = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    xt = centres[yt] + 1.5 * torch.randn(60, 6, generator=g)  # overlapping classes: some votes go wrong
    xv = centres[yv] + 1.5 * torch.randn(25, 6, generator=g)
    for k, T in ((20, 0.07), (5, 0.5), (1, 0.07), (100, 1.0)):  # k above the train size: every item votes
        ours, ref = common.knn_top1(xt, yt, xv, yv, k, T), brute_force_knn(xt, yt, xv, yv, k, T)
        assert abs(ours - ref) < 1e-4, (k, T, ours, ref)
    assert 20 < common.knn_top1(xt, yt, xv, yv) < 100
    # by hand: the val item at 0 degrees has train neighbours at 10 (class 1), 20 (class 1) and 25 degrees (class 0)
    # weighted by exp(cos / T); with k = 3 class 1 wins, with k = 1 too, and it is class 1
    deg = torch.tensor([10.0, 20.0, 25.0, 180.0]).deg2rad()
    xt, yt = torch.stack([deg.cos(), deg.sin()], 1), torch.tensor([1, 1, 0, 0])
    assert common.knn_top1(xt, yt, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), k=3, T=0.07) == 100.0
    # scaling a feature vector changes nothing (cosine); the far class-0 item outvotes only with a flat temperature
    assert common.knn_top1(xt * torch.tensor([[3.0], [0.1], [7.0], [1.0]]), yt, torch.tensor([[2.0, 0.0]]),
                           torch.tensor([1]), k=3, T=0.07) == 100.0
    assert common.knn_top1(xt, torch.tensor([1, 0, 0, 0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), k=4,
                           T=100.0) == 100.0  # 3 class-0 votes of almost equal weight beat 1 class-1 vote


def test_linear_probe_on_separable_and_on_random_labels():
    g = torch.Generator().manual_seed(1)
    centres = 8 * torch.randn(4, 8, generator=g)  # 4 blobs far apart: linearly separable with a wide margin
    yt, yv = torch.arange(100) % 4, torch.arange(40) % 4
    xt, xv = centres[yt] + torch.randn(100, 8, generator=g), centres[yv] + torch.randn(40, 8, generator=g)
    assert common.linear_probe(xt, yt, xv, yv) == 100.0
    assert common.linear_probe(xt * 1e3 + 5, yt, xv * 1e3 + 5, yv) == 100.0  # standardised: scale and shift are moot
    assert common.linear_probe(xt[:, :1], yt, xv[:, :1], yv) < 100.0  # one feature: the blobs overlap
    yt, yv = torch.randint(0, 4, (100,), generator=g), torch.randint(0, 4, (40,), generator=g)
    assert common.linear_probe(xt, yt, xv, yv, steps=100) < 55.0  # nothing to learn: near chance (25%)


# --------------------------------------------------------------------------- the data


def make_args(**kw):
    return common.SimpleNamespace(**{**dict(eval_data=None, eval_only=False, init=None, input_size=(16,), in_chans=3,
                                            seed=0, eval_max=10000), **kw})


def image_folder(root, counts):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new('RGB', (24, 20), (40 * i % 256, 0, 0)).save(root / cls / f'{i:02d}.png')


def test_splits(tmp_path):
    """One folder: each class's 5th, 10th, ... file in name order is val; train/ and val/: used as they are;
    synthetic:N: every 5th item, another seed than training's; --eval_max: evenly spread."""
    image_folder(tmp_path / 'one', {'a': 11, 'b': 4, 'c': 5})
    ev = common.Evaluation(make_args(eval_data=str(tmp_path / 'one')), None)
    (train, ti), (val, vi) = ev.sets
    assert train is val and [train.files[i].relative_to(tmp_path / 'one').as_posix() for i in vi] == \
        ['a/04.png', 'a/09.png', 'c/04.png']
    assert len(ti) == 20 - 3 and not set(ti) & set(vi)
    x, y, bad = train[vi[1]]
    assert x.shape == (3, 16, 16) and y == 0 and bad == -1  # centre crop at the input size, class a
    image_folder(tmp_path / 'two' / 'train', {'a': 3, 'b': 3})
    image_folder(tmp_path / 'two' / 'val', {'a': 2, 'b': 1})
    (train, ti), (val, vi) = common.Evaluation(make_args(eval_data=str(tmp_path / 'two')), None).sets
    assert len(ti) == 6 and len(vi) == 3 and val.labels == [0, 0, 1]
    (train, ti), (val, vi) = common.Evaluation(make_args(eval_data='synthetic:50', eval_max=7, seed=3), None).sets
    assert train.seed == 4 and ti == [i for i in range(50) if i % 5 != 4][::6] and vi == [4, 14, 24, 34, 44]
    # the items are labelled, deterministic and not the training images
    assert torch.equal(train[0][0], common.SyntheticImages(50, 16, seed=4)[0][0])
    assert not torch.equal(train[0][0], common.SyntheticImages(50, 16, seed=3)[0][0])


def test_centre_crop_is_the_largest_centred_box(tmp_path):
    """A wide image: its middle square, resized; no flip, whatever the seed."""
    img = torch.zeros(20, 40, 3, dtype=torch.uint8)
    img[:, 10:30] = 200  # the middle 20 x 20 square is bright, the sides dark
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    for c in 'ab':
        for i in range(5):
            Image.fromarray(img.numpy()).save(tmp_path / c / f'{i}.png')
    (train, ti), _ = common.Evaluation(make_args(eval_data=str(tmp_path), input_size=(10,)), None).sets
    x = train[ti[0]][0]
    assert x.shape == (3, 10, 10) and (x[0, :, 2:-2] == 200).all() and (x[0] > 150).all()  # bicubic at the edges


class ColouredShapes(torch.utils.data.Dataset):
    """A small disc, square or triangle on a two-colour gradient; the label is which of red, green and blue dominates
    the shape's colour. The background fills most of the image, so a random encoder's features barely see the label;
    an encoder trained on it sees it."""

    def __init__(self, n, size, seed):
        self.n, self.size, self.seed = n, size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        y, x = np.mgrid[0:self.size, 0:self.size] / self.size  # (H, W) each
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * x + np.sin(a) * y)[..., None]
        img = (1 - t) * rng.uniform(0, 1, 3) + t * rng.uniform(0, 1, 3)  # (H, W, 3)
        kind, (cy, cx), r, label = rng.integers(3), rng.uniform(0.3, 0.7, 2), rng.uniform(0.1, 0.2), rng.integers(3)
        inside = [(y - cy) ** 2 + (x - cx) ** 2 < r ** 2, (abs(y - cy) < r) & (abs(x - cx) < r * 0.7),
                  (y - cy < r) & (y - cy > -r + 2 * abs(x - cx))][kind]
        colour = rng.uniform(0, 0.3, 3)
        colour[label] = rng.uniform(0.7, 1.0)
        img[inside] = colour
        return torch.from_numpy((img * 255).astype(np.uint8)).permute(2, 0, 1).contiguous(), int(label), -1


def test_random_encoder_near_chance_trained_one_clearly_above(restore_signals):
    """Through a method file's features() and Evaluation: a random tiny MAE encoder is near chance (33%) on the
    label, the same encoder trained 100 steps on it (supervised: a known-good encoder, cheaply) clearly above. A
    minute of masked-image pretraining does not get there on synthetic images (README, Evaluation)."""
    mae = importlib.import_module('mae')
    args = make_args(eval_data='synthetic:1000', input_size=(32,), eval_only=True, init='-', batch_size=100,
                     num_workers=0, amp='none', mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, eval_k=20,
                     eval_t=0.07)
    evaluate = common.Evaluation(args, mae.features, synthetic=lambda n, seed: ColouredShapes(n, 32, seed))
    torch.manual_seed(0)
    model = mae.MAE(32, 8, 128, 4, 4, 96, 2, 4)
    before = evaluate(model, 0)
    head, data = torch.nn.Linear(128, 3), ColouredShapes(3200, 32, seed=0)  # other images than the evaluation's
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    for step in range(100):
        x, y, _ = zip(*(data[step * 32 + i] for i in range(32)))
        x = common.normalize(torch.stack(x), common.IMAGENET_MEAN, common.IMAGENET_STD)
        torch.nn.functional.cross_entropy(head(mae.features(model, x)), torch.tensor(y)).backward()
        opt.step()
        opt.zero_grad()
    after = evaluate(model, 100)
    assert before['knn_top1'] < 50 < 65 < after['knn_top1'], (before, after)


# --------------------------------------------------------------------------- the method files


QUICK = ['--demo', '--data', 'synthetic:16', '--batch_size', 4, '--global_batch', 4, '--num_workers', 0,
         '--log_every', 1]


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp('tok') / 'tokenizer.pth'
    torch.save(importlib.import_module('beit').Encoder(8, 1, 32).state_dict(), path)  # 8x down, 32 codes
    return ['--tokenizer', path]


def run_main(method, argv, extra):
    mod = importlib.import_module(method)
    return mod.main(common.parse_args(mod.Args, [str(a) for a in [*QUICK, *argv, *extra]], demo=mod.DEMO))


@pytest.mark.parametrize('method', METHODS)
def test_eval_only_on_encoder_pth_gives_the_runs_final_numbers(method, tmp_path, tokenizer, restore_signals,
                                                              monkeypatch):
    """Two steps with evaluation at the start and at the end; then --eval_only on the exported encoder.pth (its keys
    as the fine-tuning code wants them, not the model's) reads the same weights: the same k-NN and probe numbers."""
    monkeypatch.setattr(common, 'linear_probe', functools.partial(common.linear_probe, steps=30))  # time
    extra = tokenizer if method == 'beit' else []
    out = tmp_path / 'out'
    run_main(method, ['--max_steps', 2, '--eval_data', 'synthetic:40', '--output_dir', out], extra)
    evals = [r for r in read_log(out) if 'knn_top1' in r]
    assert [r['step'] for r in evals] == [0, 2] and 'linprobe_top1' in evals[1] and (out / 'knn.png').exists()
    assert all(r['step'] <= 2 for r in read_log(out)) and load(out / 'checkpoint.pth')['step'] == 2
    got = run_main(method, ['--eval_only', '--init', out / 'encoder.pth', '--eval_data', 'synthetic:40',
                            '--output_dir', tmp_path / 'unused'], extra)
    assert not (tmp_path / 'unused').exists()  # --eval_only writes nothing
    tol = 100 / 8 + 1e-6 if method == 'm3ae' else 1e-6  # M3AE: its type embedding comes back up to rounding
    for key in ('knn_top1', 'linprobe_top1'):
        assert abs(got[key] - evals[1][key]) <= tol, (key, got, evals[1])


def test_evaluation_leaves_training_alone(tmp_path, restore_signals, monkeypatch, capsys):
    """With --eval_data the run draws, computes and saves exactly what it does without (RNG, modes, loader), and an
    evaluated run resumed half-way ends where an uninterrupted one does."""
    monkeypatch.setattr(common, 'linear_probe', functools.partial(common.linear_probe, steps=30))  # time
    base = ['--data', 'synthetic:32', '--batch_size', 8, '--global_batch', 8, '--epochs', 2, '--num_workers', 1]
    run_main('mae', [*base, '--eval_data', '', '--output_dir', tmp_path / 'off'], [])
    run_main('mae', [*base, '--eval_data', 'synthetic:20', '--output_dir', tmp_path / 'on'], [])
    run_main('mae', [*base, '--eval_data', 'synthetic:20', '--output_dir', tmp_path / 'resumed', '--max_steps', 3], [])
    capsys.readouterr()
    run_main('mae', [*base, '--eval_data', 'synthetic:20', '--output_dir', tmp_path / 'resumed'], [])
    out = capsys.readouterr().out
    assert 'resumed from' in out and 'eval step 0:' not in out  # no second "initialisation" row
    ckpts = [load(tmp_path / d / 'checkpoint.pth') for d in ('off', 'on', 'resumed')]
    for c in ckpts[1:]:
        assert_same(ckpts[0]['model'], c['model'], 'model')
        assert_same(ckpts[0]['optimizer'], c['optimizer'], 'optimizer')
        assert_same(ckpts[0]['rng'], c['rng'], 'rng')
    losses = [[r['loss'] for r in read_log(tmp_path / d) if 'loss' in r] for d in ('off', 'on')]
    assert losses[0] == losses[1]
    assert [r['step'] for r in read_log(tmp_path / 'on') if 'knn_top1' in r] == [0, 4, 8]  # start, 2 saves


def test_torchrun_gives_the_single_process_numbers(tmp_path, restore_signals, capsys):
    """Two processes embed half the items each and gather them: the numbers of one process."""
    out = tmp_path / 'out'
    run_main('mae', ['--max_steps', 1, '--eval_data', '', '--output_dir', out], [])
    # 36 + 9 items: uneven halves; batches of 1, so that both embed each item by the same computation
    args = ['--eval_only', '--init', out / 'encoder.pth', '--eval_data', 'synthetic:45', '--batch_size', 1,
            '--global_batch', 1]
    capsys.readouterr()
    run_main('mae', args, [])
    one = capsys.readouterr().out
    args = [*QUICK, *args]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'mae.py',
           *map(str, args)]
    two = ok(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)).stdout
    line = [s for s in one.splitlines() if s.startswith('eval step')]
    assert len(line) == 1 and '36 train, 9 val' in line[0]
    assert [s for s in two.splitlines() if s.startswith('eval step')][0].split(' in ')[0] == line[0].split(' in ')[0]
