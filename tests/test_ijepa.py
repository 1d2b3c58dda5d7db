"""Model-level tests for ijepa.py against the facts of the I-JEPA reference (shared/methods/ijepa.md): the multi-block
masks, the encoders and the predictor, the loss, the EMA, the schedules, the optimizer groups, the init and the
preset sizes. Everything runs on the CPU with tiny models on 32-64 px inputs; the presets are built on the meta
device (no memory) to count their parameters."""
import math

import pytest
import torch
import torch.nn as nn

import common
import ijepa

TINY = ijepa.MODELS['tiny'][:7]  # (patch, D, depth, heads, mlp ratio, predictor D, predictor depth)
D = TINY[1]


def tiny(img_size=32, seed=0):
    torch.manual_seed(seed)
    return ijepa.IJEPA(img_size, *TINY)


def images(B=4, H=32, W=32, seed=0):
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def draw(B, grid=(16, 16), counter=0, seed=0, **kw):
    return ijepa.sample_masks(ijepa.Args(**kw), grid, B, counter, torch.Generator().manual_seed(seed))


def onehot(idx, N):
    """(..., K) indices -> (..., N) bool."""
    return torch.zeros(*idx.shape[:-1], N, dtype=torch.bool).scatter(-1, idx, True)


def rect(h, w, top, left, H, W):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m.flatten()


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (spinning OpenMP threads are slow when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def many_draws():
    """200 batches of 128 on the 16x16 grid of ViT-H/14 at 224 (the reference's per-GPU batch), default settings."""
    return [draw(128, counter=c, seed=c) for c in range(200)]


# --------------------------------------------------------------------------- 1. block sizes


def test_block_size_hand_worked():
    # r = 0: area int(256 x 0.15) = 38, aspect 0.75 -> h round(sqrt(28.5)) = 5, w round(sqrt(50.7)) = 7
    assert ijepa.block_size(0.0, (0.15, 0.2), (0.75, 1.5), 16, 16) == (5, 7)
    # r -> 1: area int(256 x 0.2) = 51, aspect 1.5 -> h round(sqrt(76.5)) = 9, w round(sqrt(34)) = 6: taller
    assert ijepa.block_size(0.9999999, (0.15, 0.2), (0.75, 1.5), 16, 16) == (9, 6)
    # the context: area 217-256 -> 15 or 16 rows and columns, clipped to 15 (the reference's `while h >= H`)
    assert ijepa.block_size(0.0, (0.85, 1.0), (1.0, 1.0), 16, 16) == (15, 15)
    assert ijepa.block_size(0.9999, (0.85, 1.0), (1.0, 1.0), 16, 16) == (15, 15)
    assert ijepa.block_size(0.9999, (0.85, 1.0), (1.0, 1.0), 16, 16, full_grid=True) == (16, 16)
    # Python's round (half to even) as the reference: h = round(sqrt(6.25)) = round(2.5) = 2; w 10 clipped to 7
    assert ijepa.block_size(0.0, (25 / 64, 25 / 64), (0.25, 0.25), 8, 8) == (2, 7)


@pytest.mark.parametrize('grid,targets,contexts', [
    ((16, 16), [(5, 7), (6, 6), (6, 7), (7, 6), (8, 6), (9, 6)], [(15, 15)]),  # 224/14: 35-54 patches
    ((14, 14), [(5, 6), (6, 5), (6, 6), (7, 5), (8, 5)], [(13, 13)]),  # 224/16: 30-40
])
def test_block_sizes_the_reference_draws(grid, targets, contexts):
    """The sheet's figures, measured on the reference over 2000 seeds: the possible (h, w) per grid."""
    tgt, ctx = ijepa.check_masks(ijepa.Args(), grid)
    assert tgt == targets and ctx == contexts
    tgt, ctx = ijepa.check_masks(ijepa.Args(), (28, 28))  # 448/16: targets 108-154 patches, context 26 or 27
    assert min(h * w for h, w in tgt) == 108 and max(h * w for h, w in tgt) == 154 and ctx == [(26, 26), (27, 27)]


def test_one_draw_sets_scale_and_aspect_per_batch():
    """Sizes come from a generator seeded with the counter: shared by the batch, by every rank (other position
    generators) and the same for the same counter; the first uniform sets the target, the second the context."""
    for c in range(30):
        g = torch.Generator().manual_seed(c)
        th, tw = ijepa.block_size(torch.rand(1, generator=g).item(), (0.15, 0.2), (0.75, 1.5), 16, 16)
        a, b = draw(6, counter=c, seed=1), draw(3, counter=c, seed=2)
        assert a[1].shape == (4, 6, th * tw) and b[1].shape == (4, 3, th * tw)
    shapes = {draw(2, counter=c)[1].shape[2] for c in range(40)}
    assert len(shapes) > 3  # sizes change from batch to batch


# --------------------------------------------------------------------------- 2. masks


def test_masks_are_blocks_disjoint_and_cut_to_the_batch_minimum(many_draws):
    """On 16x16 the context block is always the top-left 15x15 (reference), so each image's full context is known:
    that block minus the union of its 4 targets. The batch keeps the first K_enc = the smallest count of each."""
    topleft = rect(15, 15, 0, 0, 16, 16)
    for m_enc, m_pred in many_draws[:40]:
        M, B, K = m_pred.shape
        assert m_enc.dtype == m_pred.dtype == torch.int64 and m_enc.shape[0] == B
        assert (m_pred.diff(dim=-1) > 0).all() and (m_enc.diff(dim=-1) > 0).all()  # sorted, no repeats
        tgt = onehot(m_pred, 256)  # (M, B, N)
        for m in range(M):  # each target is a full h x w rectangle (never constrained)
            for b in range(0, B, 17):
                rows, cols = m_pred[m, b] // 16, m_pred[m, b] % 16
                h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
                assert h * w == K and torch.equal(tgt[m, b], rect(h, w, rows.min(), cols.min(), 16, 16))
        full = topleft & ~tgt.any(0)  # (B, N)
        if (full.sum(1) <= 10).any():
            continue  # a redrawn context (rare): its last targets may be given back; tested below
        assert m_enc.shape[1] == full.sum(1).min()
        ctx = onehot(m_enc, 256)
        assert not (ctx & tgt.any(0)).any()  # context and targets disjoint
        first = torch.stack([f.nonzero()[:m_enc.shape[1], 0] for f in full])  # the top-most patches of each
        assert torch.equal(m_enc, first)


def test_mask_statistics_match_the_reference(many_draws):
    """Against the reference collator at 224/14, batch 128, measured side by side over these 200 counters: each
    image's context before the cut 110.0 patches on average (std 18.2, 39 to 171), K_enc 68.3 on average, K_pred
    44.2. Rows and columns 15 are never sampled (reference)."""
    topleft = rect(15, 15, 0, 0, 16, 16)
    full, k_enc, k_pred, tgt_freq, ctx_freq = [], [], [], torch.zeros(256), torch.zeros(256)
    for m_enc, m_pred in many_draws:
        tgt = onehot(m_pred, 256).any(0)  # (B, N)
        full.append((topleft & ~tgt).sum(1).float())
        k_enc.append(m_enc.shape[1])
        k_pred.append(m_pred.shape[2])
        tgt_freq += tgt.sum(0)
        ctx_freq += onehot(m_enc, 256).sum(0)
    full = torch.cat(full)
    assert abs(full.mean() - 110.0) < 1.5 and abs(full.std() - 18.2) < 1 and 30 < full.min() <= 60 and 160 <= full.max()
    assert abs(sum(k_enc) / len(k_enc) - 68.3) < 1.5 and abs(sum(k_pred) / len(k_pred) - 44.2) < 0.01
    tgt_freq, ctx_freq = tgt_freq.view(16, 16), ctx_freq.view(16, 16)
    assert tgt_freq[15].sum() == tgt_freq[:, 15].sum() == ctx_freq[15].sum() == ctx_freq[:, 15].sum() == 0
    assert tgt_freq[:15, :15].min() > 0  # every other patch is a target sometimes
    assert ctx_freq[0].mean() > 3 * ctx_freq[10].mean()  # the cut keeps the top rows


def test_the_batch_size_changes_the_context():
    """The reference's cut to the batch's smallest context: a batch of 8 keeps more than a batch of 128."""
    small = sum(draw(8, counter=c, seed=c)[0].shape[1] for c in range(60)) / 60
    big = sum(draw(128, counter=c, seed=c)[0].shape[1] for c in range(60)) / 60
    assert small > big + 10  # measured on the reference: about 86.6 against 68.3


def test_full_grid_and_random_cut():
    """The two fixes: blocks reach the last row and column (PR #40), and the cut drops random context patches."""
    hits_t = hits_c = 0
    for c in range(40):
        m_enc, m_pred = draw(32, counter=c, seed=c, full_grid=True)
        hits_t += (m_pred // 16 == 15).sum() + (m_pred % 16 == 15).sum()
        hits_c += (m_enc // 16 == 15).sum()
    assert hits_t > 0 and hits_c > 0
    topleft = rect(15, 15, 0, 0, 16, 16)
    not_prefix = 0
    for c in range(10):
        m_enc, m_pred = draw(16, counter=c, seed=c, random_cut=True)
        full = topleft & ~onehot(m_pred, 256).any(0)  # (B, N)
        if (full.sum(1) <= 10).any():
            continue
        assert m_enc.shape[1] == full.sum(1).min() and (m_enc.diff(dim=-1) > 0).all()
        assert full.gather(1, m_enc).all()  # a subset of each image's context
        not_prefix += sum(not torch.equal(e, f.nonzero()[:len(e), 0]) for e, f in zip(m_enc, full))
    assert not_prefix > 50


def test_fresh_masks_and_determinism():
    a, b = draw(8, counter=3, seed=5), draw(8, counter=3, seed=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the same (counter, seed): the same masks (resume)
    c = draw(8, counter=3, seed=6)  # another rank: same sizes, other positions
    assert c[1].shape == a[1].shape and not torch.equal(c[1], a[1])
    assert not torch.equal(draw(8, counter=4, seed=5)[1], a[1])  # the next batch: new masks
    assert len({tuple(a[1][0, b].tolist()) for b in range(8)}) > 1  # per-image positions


def test_context_redraw_relaxes_the_targets_and_ends():
    """Big targets on a small grid: many contexts keep min_keep patches or fewer, are redrawn, and after 20
    failures the last target is no longer removed, as the reference relaxes it. It always ends."""
    kw = dict(pred_mask_scale=(0.3, 0.35), min_keep=12)
    overlap = 0
    for c in range(20):
        m_enc, m_pred = draw(16, (8, 8), counter=c, seed=c, **kw)
        assert m_enc.shape[1] > 12
        overlap += (onehot(m_enc, 64) & onehot(m_pred, 64).any(0)).any(1).sum()
    assert overlap > 0  # relaxed contexts took back patches of a target
    ctx_rows = torch.cat([draw(16, (8, 8), counter=c, seed=c, **kw)[0] // 8 for c in range(5)])
    assert ctx_rows.max() < 7  # still inside the (H-1) x (W-1) block


def test_min_keep_that_cannot_be_met_stops_with_a_line():
    """On an 8x8 grid the targets are 9-12 patches: min_keep 10 would make the reference redraw forever."""
    with pytest.raises(SystemExit) as e:
        ijepa.check_masks(ijepa.Args(min_keep=10), (8, 8))
    line = str(e.value.code)
    assert '--min_keep 10: blocks of 9 patches can be drawn on the 8x8 patch grid' in line and '\n' not in line
    assert 'give --min_keep 8 or less' in line
    ijepa.check_masks(ijepa.Args(min_keep=8), (8, 8))
    with pytest.raises(SystemExit, match='--min_keep 9'):  # the draw itself refuses too (a 3x3 batch), never loops
        for c in range(50):
            draw(2, (8, 8), counter=c, min_keep=9)


# --------------------------------------------------------------------------- 3. model


def test_forward_shapes_and_what_each_encoder_sees():
    model = tiny(32)
    m_enc, m_pred = draw(4, (8, 8), min_keep=4)
    seen = {}
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__('ctx', a[0].shape))
    model.target_encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__('tgt', a[0].shape))
    model.predictor.predictor_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__('pred', a[0].shape))
    loss, out = model(images(4), m_enc, m_pred)
    K_enc, (M, _, K) = m_enc.shape[1], m_pred.shape
    assert seen == {'tgt': (4, 64, D), 'ctx': (4, K_enc, D), 'pred': (M * 4, K_enc + K, TINY[5])}
    assert out['z'].shape == out['h'].shape == (M * 4, K, D) and loss.dim() == 0
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())  # no gradient to the target encoder
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in model.predictor.parameters() if p.requires_grad)


def manual_loss(model, imgs, m_enc, m_pred):
    """train.py:295-313 written out per block and per image: target = LN(target_encoder(imgs)) without affine
    (eps 1e-5); prediction from the context alone plus one block's mask tokens; smooth L1 (beta 1), mean."""
    M, B, K = m_pred.shape
    with torch.no_grad():
        t = model.target_encoder(imgs)
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
    enc, pr = model.encoder, model.predictor
    x = enc.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + enc.pos_embed  # (B, N, D)
    zs, hs = [], []
    for m in range(M):
        for b in range(B):
            c = x[b, m_enc[b]][None]
            for blk in enc.blocks:
                c = blk(c)
            c = pr.predictor_embed(enc.norm(c)) + pr.predictor_pos_embed[:, m_enc[b]]
            q = pr.mask_token + pr.predictor_pos_embed[:, m_pred[m, b]]
            s = torch.cat([c, q], 1)
            for blk in pr.predictor_blocks:
                s = blk(s)
            zs.append(pr.predictor_proj(pr.predictor_norm(s)[:, c.shape[1]:])[0])
            hs.append(t[b, m_pred[m, b]])
    d = torch.stack(zs) - torch.stack(hs)
    return torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5).mean(), torch.stack(zs), torch.stack(hs)


def test_loss_equals_a_per_block_computation():
    model = tiny(32)
    with torch.no_grad():  # a target that differs from the encoder, as after training
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = images(3)
    m_enc, m_pred = draw(3, (8, 8), counter=2, min_keep=4)
    loss, out = model(imgs, m_enc, m_pred)
    ref, z, h = manual_loss(model, imgs, m_enc, m_pred)
    torch.testing.assert_close(out['z'], z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out['h'], h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        model.predictor.predictor_proj.weight.mul_(50)  # most errors above 1: they count linearly (not L2)
    loss, out = model(imgs, m_enc, m_pred)
    d = out['z'] - out['h']
    assert (d.abs() > 1).float().mean() > 0.5
    torch.testing.assert_close(loss, torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5).mean())
    assert loss < 0.25 * (d ** 2).mean()


def test_loss_ignores_context_pixels_for_the_target_and_other_tokens():
    """The target counts only target-block tokens: noise added to the target encoder's other output tokens leaves
    the loss unchanged; pixels outside the context do not change the prediction."""
    model = tiny(32)
    imgs = images(2)
    m_enc, m_pred = draw(2, (8, 8), counter=1, min_keep=4)
    loss0, out0 = model(imgs, m_enc, m_pred)
    outside = ~onehot(m_pred, 64).any(0)  # (B, N) tokens in no target block
    hook = model.target_encoder.register_forward_hook(lambda m, a, o: o + 10 * outside[..., None] * torch.randn_like(o))
    loss1, _ = model(imgs, m_enc, m_pred)
    hook.remove()
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    hidden = ~onehot(m_enc, 64)  # (B, N) patches the context encoder does not see
    pix = hidden.view(2, 1, 8, 1, 8, 1).expand(2, 3, 8, 4, 8, 4).reshape(2, 3, 32, 32)
    _, out2 = model(torch.where(pix, imgs + 3 * torch.randn_like(imgs), imgs), m_enc, m_pred)
    torch.testing.assert_close(out2['z'], out0['z'], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2['h'], out0['h'])  # the target encoder sees the whole image


def test_target_blocks_are_independent_in_the_predictor():
    """Each block is predicted in its own sequence: moving blocks 1-3 leaves block 0's predictions as they were."""
    model = tiny(32)
    imgs = images(2)
    m_enc, m_pred = draw(2, (8, 8), counter=4, min_keep=4)
    z0 = model.predictor(model.encoder(imgs, m_enc), m_enc, m_pred).view(4, 2, -1, D)
    moved = m_pred.clone()
    moved[1:] = draw(2, (8, 8), counter=4, seed=9, min_keep=4)[1][1:]
    z1 = model.predictor(model.encoder(imgs, m_enc), m_enc, moved).view(4, 2, -1, D)
    torch.testing.assert_close(z1[0], z0[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(z1[1:], z0[1:], atol=1e-3)


def test_a_few_steps_on_one_batch_lower_the_loss():
    """AdamW on the reference's groups, EMA after each step (the target moves too), fixed batch and masks."""
    model = tiny(32)
    imgs, (m_enc, m_pred) = images(4), draw(4, (8, 8), counter=1, min_keep=4)
    opt = torch.optim.AdamW(ijepa.param_groups(model), lr=1e-3, weight_decay=0.04)
    losses = []
    for _ in range(8):
        loss, _ = model(imgs, m_enc, m_pred)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ijepa.ema_update(model.encoder, model.target_encoder, 0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_collapse_signal():
    model = tiny(32)
    m_enc, m_pred = draw(4, (8, 8), min_keep=4)
    _, out = model(images(4), m_enc, m_pred)
    _, same = model(images(1).expand(4, -1, -1, -1), m_enc, m_pred)
    assert out['tgt_std'] > 0.05 and same['tgt_std'] < 1e-5


# --------------------------------------------------------------------------- 4. EMA, schedules, groups, init


def test_ema_formula():
    torch.manual_seed(0)
    enc, tgt = nn.Linear(5, 3), nn.Linear(5, 3)
    before = [p.detach().clone() for p in tgt.parameters()]
    ijepa.ema_update(enc, tgt, 0.996)
    for k0, q, k in zip(before, enc.parameters(), tgt.parameters()):
        torch.testing.assert_close(k, 0.996 * k0 + 0.004 * q, rtol=1e-6, atol=1e-7)
    ijepa.ema_update(enc, tgt, 0.0)
    assert all(torch.equal(q, k) for q, k in zip(enc.parameters(), tgt.parameters()))


def test_schedules_hand_worked():
    """The reference's figures (ipe 1000, 300 epochs, warmup 40): lr 2.0002e-4 at step 1, 1e-3 at step 40000, 1e-6
    at the end; weight decay 0.04 -> 0.22 -> 0.4; momentum 0.996 at the first update, linear, never 1."""
    a, ipe = ijepa.Args(), 1000
    lr, wd, m = ijepa.schedules(1, a, ipe)
    assert lr == pytest.approx(2.0002e-4, rel=1e-9) and wd == pytest.approx(0.04, abs=1e-9) and m == 0.996
    assert ijepa.schedules(39999, a, ipe)[0] < 1e-3 == ijepa.schedules(40000, a, ipe)[0]
    lr, wd, m = ijepa.schedules(150000, a, ipe)
    assert wd == pytest.approx(0.22) and m == pytest.approx(0.996 + 149999 * 0.004 / 300000, abs=1e-15)
    assert lr == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 110000 / 260000)))
    lr, wd, m = ijepa.schedules(300000, a, ipe)
    assert lr == pytest.approx(1e-6) and wd == pytest.approx(0.4) and m == pytest.approx(1 - 0.004 / 300000)


def build_meta(name, depth=None, monkeypatch=None):
    """A preset on the meta device (no memory); `depth` sets the encoder and predictor depth."""
    patch, dim, d, heads, mlp, pdim, pdepth, size = ijepa.MODELS[name]
    if monkeypatch:  # the tables' values do not matter for counting; sin/cos on meta is slow the first time
        monkeypatch.setattr(ijepa, 'sincos_2d', lambda dim, gh, gw: torch.zeros(gh * gw, dim))
    with torch.device('meta'):
        return ijepa.IJEPA(size, patch, dim, depth or d, heads, mlp, pdim, depth or pdepth)


@pytest.mark.parametrize('name,enc,pred', [  # sheet table 1.1: all (trainable), measured on the reference
    ('huge', (630_762_240, 630_434_560), (22_377_728, 22_279_424)),
    ('huge448', (631_668_480, 630_664_960), (22_580_480, 22_279_424)),
    ('giant', (1_011_368_576, 1_011_092_608), (29_550_976, 29_475_712)),
    ('base', (85_797_120, 85_646_592), (11_314_176, 11_238_912)),
    ('large', (303_299_584, 303_098_880), (11_511_040, 11_435_776)),
])
def test_preset_parameter_counts(name, enc, pred, monkeypatch):
    """Built at depth 1 and 2 and extrapolated to the preset's depths (the blocks are identical), as the figures
    were measured on the reference."""
    count = lambda m: torch.tensor([sum(p.numel() for p in m.parameters()),  # noqa: E731
                                    sum(p.numel() for p in m.parameters() if p.requires_grad)])
    one, two = build_meta(name, 1, monkeypatch), build_meta(name, 2, monkeypatch)
    _, _, depth, _, _, _, pdepth, _ = ijepa.MODELS[name]
    for part, depth, want in (('encoder', depth, enc), ('predictor', pdepth, pred), ('target_encoder', depth, None)):
        a, b = count(getattr(one, part)), count(getattr(two, part))
        got = tuple((a + (depth - 1) * (b - a)).tolist())
        assert got == (want or (enc[0], 0)), part


def test_optimizer_groups_as_the_reference(monkeypatch):
    """ViT-B + predictor depth 6: 50, 28, 99, 52 tensors (measured on the reference); mask_token and the frozen
    position tables decay, biases and LayerNorms do not."""
    model = build_meta('base', monkeypatch=monkeypatch)
    groups = ijepa.param_groups(model)
    assert [len(g['params']) for g in groups] == [50, 28, 99, 52]
    assert [g.get('weight_decay') for g in groups] == [None, None, 0.0, 0.0]
    ids = [{id(p) for p in g['params']} for g in groups]
    assert id(model.predictor.mask_token) in ids[1] and id(model.encoder.pos_embed) in ids[0]
    assert id(model.predictor.predictor_pos_embed) in ids[1] and id(model.encoder.blocks[0].attn.qkv.bias) in ids[2]
    assert id(model.predictor.predictor_norm.weight) in ids[3]
    assert not {id(p) for p in model.target_encoder.parameters()} & set().union(*ids)


def test_init_as_the_reference_trains_from():
    """helper.init_model re-initialises every Linear (std 0.02) and LayerNorm after construction, which undoes the
    depth rescale of attn.proj / mlp.fc2; the conv and the mask token keep std 0.02; the target is a copy."""
    torch.manual_seed(0)
    model = ijepa.IJEPA(64, 8, 192, 6, 4, 4.0, 96, 3)
    for name, p in model.encoder.named_parameters():
        if name.endswith('.weight') and p.ndim >= 2:
            assert abs(p.std().item() - 0.02) < 0.002, name  # blocks.5.attn.proj too (constructor: 0.02/sqrt(12))
        elif name.endswith('.bias'):
            assert not p.any(), name
        elif 'norm' in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert abs(model.predictor.mask_token.std().item() - 0.02) < 0.005
    assert abs(model.predictor.predictor_blocks[2].mlp.fc2.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.encoder.pos_embed[0], common.sincos_2d(192, 8, 8))
    assert torch.equal(model.predictor.predictor_pos_embed[0], common.sincos_2d(96, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(),
                                                 model.target_encoder.state_dict().values()))


def test_state_dict_keys_are_the_references():
    model = tiny(32)
    enc = {'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    pred = {'mask_token', 'predictor_pos_embed', 'predictor_embed.weight', 'predictor_embed.bias',
            'predictor_norm.weight', 'predictor_norm.bias', 'predictor_proj.weight', 'predictor_proj.bias'}
    for i in range(TINY[2]):
        enc |= {f'blocks.{i}.{m}.{t}' for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
                for t in ('weight', 'bias')}
    for i in range(TINY[6]):
        pred |= {f'predictor_blocks.{i}.{m}.{t}' for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1',
                                                            'mlp.fc2') for t in ('weight', 'bias')}
    assert set(model.encoder.state_dict()) == set(model.target_encoder.state_dict()) == enc
    assert set(model.predictor.state_dict()) == pred


def test_features_are_the_target_encoders_average_token():
    model = tiny(32)
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    imgs = images(3)
    f = ijepa.features(model, imgs)
    assert f.shape == (3, D)
    torch.testing.assert_close(f, model.target_encoder(imgs).mean(1), rtol=0, atol=0)
    assert not torch.allclose(f, model.encoder(imgs).mean(1), atol=1e-3)  # not the context encoder


def test_init_reads_reference_releases_and_encoders(tmp_path, capsys):
    """A release holds {'encoder', 'predictor', 'target_encoder'} of DDP state dicts ('module.' keys) plus the
    optimizer; an encoder.pth goes into both encoders."""
    src, dst = tiny(32, seed=1), tiny(32, seed=2)
    ddp = lambda m: {'module.' + k: v for k, v in m.state_dict().items()}  # noqa: E731
    torch.save({'encoder': ddp(src.encoder), 'predictor': ddp(src.predictor), 'target_encoder': ddp(src.encoder),
                'opt': {}, 'epoch': 300, 'loss': 0.1, 'batch_size': 128, 'world_size': 16, 'lr': 1e-3},
               tmp_path / 'IN1K-vit.h.14-300e.pth.tar')
    common.load_weights(dst, tmp_path / 'IN1K-vit.h.14-300e.pth.tar', ijepa.release_keys)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    torch.save({'model': tiny(32, seed=3).target_encoder.state_dict()}, tmp_path / 'encoder.pth')
    common.load_weights(dst, tmp_path / 'encoder.pth', ijepa.release_keys)
    enc = torch.load(tmp_path / 'encoder.pth')['model']
    assert all(torch.equal(dst.encoder.state_dict()[k], v) and torch.equal(dst.target_encoder.state_dict()[k], v)
               for k, v in enc.items())
    assert torch.equal(dst.predictor.mask_token, src.predictor.mask_token)  # not in the file: kept
    assert f'loaded {2 * len(enc)} tensors' in capsys.readouterr().out


def test_non_square_grid():
    """32 x 48 px: a 8 x 12 grid; blocks stay inside it (rows < 7, columns < 11), the model runs on it."""
    m_enc, m_pred = draw(3, (8, 12), counter=5, min_keep=4)
    assert m_pred.max() < 96 and (m_pred // 12).max() < 7 and (m_pred % 12).max() < 11
    model = ijepa.IJEPA((32, 48), *TINY)
    loss, out = model(images(3, 32, 48), m_enc, m_pred)
    assert out['z'].shape == (4 * 3, m_pred.shape[2], D) and torch.isfinite(loss)
    assert torch.equal(model.encoder.pos_embed[0], common.sincos_2d(D, 8, 12))
