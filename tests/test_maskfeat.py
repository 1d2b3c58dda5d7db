"""Model-level tests for maskfeat.py against the facts of the MaskFeat reference (facebookresearch/SlowFast:
models/masked.py, operators.py HOGLayerC, head_helper.py, datasets/transform.py MaskingGenerator, optimizer.py,
utils/lr_policy.py, configs/masked_ssl/in1k_VIT_B_MaskFeat_PT.yaml). CPU, tiny models, 32-224 px inputs; ViT-B/L are
built on the meta device to count parameters."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import maskfeat as mf


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(img=64, dim=32, depth=2, heads=2, in_chans=3, seed=0):
    torch.manual_seed(seed)
    return mf.MaskFeat(common.pair(img), 16, dim, depth, heads, in_chans)


def images(B=2, H=64, W=64, C=3, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def masks(B, grid, seed=1, ratio=0.4):
    n = round(grid[0] * grid[1] * ratio)
    rng = random.Random(seed)
    return torch.stack([torch.from_numpy(mf.block_mask(rng, grid, n, n // 5)).flatten() for _ in range(B)])


# --------------------------------------------------------------------------- 1. the HOG target


def naive_hog(img, nbins=9, cell=8):
    """HOG written out pixel by pixel in float64 from the reference's description: reflect padding, Sobel gradients
    per channel (gx = left - right, gy = top - bottom), bin floor(atan2(gx, gy) / pi * 9) mod 9 gets the whole
    magnitude, 8x8 cell sums, L2 over the bins of each (channel, cell). img (C, H, W) numpy."""
    C, H, W = img.shape
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode='reflect')
    out = np.zeros((C, nbins, H // cell, W // cell))
    for c in range(C):
        for i in range(H):
            for j in range(W):
                a = p[c, i:i + 3, j:j + 3]  # the 3x3 neighbourhood of (i, j)
                gx = (a[0, 0] - a[0, 2]) + 2 * (a[1, 0] - a[1, 2]) + (a[2, 0] - a[2, 2])
                gy = (a[0, 0] - a[2, 0]) + 2 * (a[0, 1] - a[2, 1]) + (a[0, 2] - a[2, 2])
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                out[c, b, i // cell, j // cell] += math.hypot(gx, gy)
    norm = np.sqrt((out ** 2).sum(1, keepdims=True))
    return out / np.maximum(norm, 1e-12)


def test_hog_equals_a_pixel_by_pixel_computation():
    x = images(2, 16, 24)
    got = mf.HOG()(x)
    assert got.shape == (2, 3, 9, 2, 3) and got.dtype == torch.float32
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), naive_hog(x[b].double().numpy()), rtol=0, atol=2e-6)


def edge_image(kind, H=32, W=32):
    """0 on one side of a straight edge, 1 on the other, the same in every channel."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    step = {'vertical': x >= 12, 'horizontal': y >= 20}[kind]  # the edge lies inside cell column 1 / row 2
    return step.float().expand(3, H, W)[None].clone()  # (1, 3, H, W)


@pytest.mark.parametrize('kind,bin_,at', [('vertical', 4, (slice(None), 1)), ('horizontal', 0, (2, slice(None)))])
def test_a_straight_edge_puts_all_its_magnitude_in_one_bin(kind, bin_, at):
    """Intensity rising to the right: gx < 0, gy = 0, atan2 = -pi/2 -> bin 4; rising downward: gx = 0, gy < 0,
    atan2 = pi -> bin 9 mod 9 = 0 (the reference's convention, measured with its HOGLayerC). Cells beside the edge
    are flat: zero."""
    x = edge_image(kind)
    h = mf.HOG()(x)[0]  # (3, 9, 4, 4)
    edge = torch.zeros(4, 4, dtype=torch.bool)
    edge[at] = True
    onehot = torch.zeros(9)
    onehot[bin_] = 1
    assert torch.equal(h[:, :, edge], onehot.view(1, 9, 1).expand(3, 9, 4))  # exactly one bin, unit value
    assert not h[:, :, ~edge].any()
    # unsigned orientations: the opposite edge (1 - x, gradient reversed) gives the same histograms
    assert torch.equal(mf.HOG()(1 - x), mf.HOG()(x))
    # before the normalisation the bin holds the whole Sobel magnitude: 4 per pixel on both sides of the step
    scale = 3.0
    assert torch.equal(mf.HOG()(scale * x), mf.HOG()(x))


def test_constant_images_give_zeros_and_cells_have_unit_norm():
    const = torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1).repeat(2, 1, 32, 48)
    assert not mf.HOG()(const).any()
    h = mf.HOG()(images(2, 32, 48))
    torch.testing.assert_close(h.norm(dim=2), torch.ones(2, 3, 4, 6), rtol=0, atol=1e-6)  # L2 over the 9 bins
    assert (h >= 0).all()
    # per channel: a channel left flat stays zero while the others are normalised
    x = images(1, 32, 32)
    x[:, 1] = 0.5
    h = mf.HOG()(x)
    assert not h[:, 1].any() and torch.allclose(h[:, 0].norm(dim=1), torch.ones(1, 4, 4), atol=1e-6)


def test_same_hog_on_0_1_0_255_and_normalised_inputs():
    """The gradients cancel the mean and the per-cell normalisation cancels each channel's scale: the same HOG up to
    rounding on continuous-valued images. (On 8-bit images exact ties do not survive the normalisation: gx = 0
    exactly in 0-255 becomes +-rounding noise, which moves the pixel between the neighbouring bins 0 and 8, and a
    cell that is flat except for rounding noise is normalised to a unit vector. The reference does the same.)"""
    x01 = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    hog = mf.HOG()
    ref = hog(x01)
    for x in (x01 * 255, (x01 - torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)) /
              torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)):
        torch.testing.assert_close(hog(x), ref, rtol=0, atol=1e-5)
    u8 = (x01 * 255).round()
    assert (hog(u8) - hog(u8 / 255)).abs().max() > 0.01  # the 8-bit caveat above: ties go either way


def test_patch_targets_layout_is_channel_bin_cell_row_cell_col():
    hist = torch.randn(2, 3, 9, 4, 6)  # 32 x 48 px: 2 x 3 patches of 16 px, 2 x 2 cells each
    t = mf.patch_targets(hist, 16)
    assert t.shape == (2, 6, 108)
    for b in range(2):
        for n in range(6):
            r, c = divmod(n, 3)  # patches row-major
            for ch in range(3):
                for k in range(9):
                    for di in range(2):
                        for dj in range(2):
                            assert t[b, n, (ch * 9 + k) * 4 + di * 2 + dj] == hist[b, ch, k, 2 * r + di, 2 * c + dj]
    assert mf.patch_targets(torch.randn(1, 1, 9, 4, 4), 16).shape == (1, 4, 36)  # in_chans 1


def test_hog_is_fp32_under_autocast_and_uses_the_whole_image():
    model = build()
    x, mask = images(), masks(2, (4, 4))
    _, out = model(x, mask)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, low = model(x, mask)
    assert low['target'].dtype == torch.float32 and torch.equal(low['target'], out['target'])
    # computed on the whole image, then cut: a patch's border cells see its neighbours' pixels
    per_patch = mf.HOG()(x[:, :, :16, :16])  # the first patch with its own reflect padding
    assert not torch.allclose(mf.patch_targets(per_patch, 16)[:, 0], out['target'][:, 0], atol=1e-3)


# --------------------------------------------------------------------------- 2. block masking


def test_mask_count_distribution_matches_the_reference():
    """ViT-B/16 at 224: 78 = round(0.4 x 196) targeted, blocks of >= 15; the reference's generator, measured over
    20,000 draws, ends at 78 in 70.3%, 77 in 21.0%, 76 in 5.3%, mean 77.55, never above 78."""
    rng = random.Random(0)
    c = np.array([mf.block_mask(rng, (14, 14), 78, 15).sum() for _ in range(3000)])
    assert c.max() == 78 and c.min() >= 55
    assert abs((c == 78).mean() - 0.703) < 0.03 and abs((c == 77).mean() - 0.210) < 0.03
    assert abs((c == 76).mean() - 0.053) < 0.015 and abs(c.mean() - 77.55) < 0.08


def components(m):
    """4-connected components of a 2-D bool array: their sizes."""
    seen, sizes = np.zeros_like(m), []
    for start in zip(*np.where(m)):
        if seen[start]:
            continue
        stack, n = [start], 0
        seen[start] = True
        while stack:
            i, j = stack.pop()
            n += 1
            for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b] and not seen[a, b]:
                    seen[a, b] = True
                    stack.append((a, b))
        sizes.append(n)
    return sizes


def test_masks_are_a_few_large_blocks():
    """Blocks of >= 15 patches (rounded), so a 14x14 mask is a few connected pieces, the largest of which is a
    block; a single block is a filled rectangle strictly smaller than the grid."""
    rng = random.Random(1)
    for _ in range(100):
        sizes = components(mf.block_mask(rng, (14, 14), 78, 15))
        assert len(sizes) <= 6 and max(sizes) >= 12, sizes
    singles = 0
    for _ in range(100):
        m = mf.block_mask(rng, (5, 7), 9, 9)
        rows, cols = np.where(m)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        if len(components(m)) == 1 and m.sum() == h * w:  # one block
            singles += 1
            assert h < 5 and w < 7
    assert singles > 20


def test_masks_are_seeded_per_item_and_fresh_every_epoch():
    ds = mf.WithMasks(common.SyntheticImages(8, 64), (4, 4), 6, seed=0)
    (img, m), label, bad = ds[(0, 3)]
    assert m.shape == (16,) and m.dtype == torch.bool and bad == -1 and img.shape == (3, 64, 64)
    assert torch.equal(ds[(0, 3)][0][1], m)  # the same item, the same mask (a resumed run sees it again)
    epochs = torch.stack([ds[(e, 3)][0][1] for e in range(20)])
    assert len({tuple(r.tolist()) for r in epochs}) > 10  # a new mask every epoch
    counts = torch.stack([ds[(0, i)][0][1] for i in range(8)]).sum(1)
    assert (counts <= 6).all() and (counts > 0).all()


# --------------------------------------------------------------------------- 3. model and loss


def explicit_encoder(model, x, mask):
    tok = model.patch_embed(x)
    tok = torch.where(mask[..., None], model.mask_token, tok)
    tok = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), tok], 1) + model.pos_embed
    for blk in model.blocks:
        tok = blk(tok)
    return tok


def test_mask_token_replaces_patch_embeddings_before_cls_and_positions():
    model = build().eval()
    x, other, mask = images(), images(seed=5), masks(2, (4, 4))
    with torch.no_grad():
        out = model.forward_encoder(x, mask)
        assert out.shape == (2, 17, 32)
        torch.testing.assert_close(out, explicit_encoder(model, x, mask), rtol=1e-5, atol=1e-6)
        full, none = torch.ones_like(mask), torch.zeros_like(mask)
        torch.testing.assert_close(model.forward_encoder(x, full), model.forward_encoder(other, full),
                                   rtol=0, atol=1e-6)
        before = model.forward_encoder(x, none)
        model.mask_token.add_(torch.randn_like(model.mask_token))
        assert torch.equal(model.forward_encoder(x, none), before)
        # the masked positions keep their positional embedding: two masked positions differ in the output
        assert (out[0, 1:][mask[0]][0] - out[0, 1:][mask[0]][1]).abs().max() > 1e-4


def test_masked_pixels_never_reach_the_predictions():
    model = build().eval()
    x, mask = images(), masks(2, (4, 4))
    i = int(mask[0].nonzero()[0])  # a masked patch of image 0
    r, c = divmod(i, 4)
    y = x.clone()
    y[0, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] += 5 * torch.randn(3, 16, 16)
    with torch.no_grad():
        _, a = model(x, mask)
        _, b = model(y, mask)
    torch.testing.assert_close(a['pred'], b['pred'], rtol=0, atol=1e-6)
    assert (a['target'][0, i] - b['target'][0, i]).abs().max() > 1e-2  # only the target changes


def test_loss_is_the_mse_over_all_masked_patches_of_the_batch():
    B, N, K = 3, 16, 108
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(B, N, K, generator=g), torch.rand(B, N, K, generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, :2], mask[1, :10], mask[2, 3:9] = True, True, True  # 2, 10 and 6 masked: unequal weights
    loss = mf.maskfeat_loss(pred, target, mask)
    torch.testing.assert_close(loss, F.mse_loss(pred[mask], target[mask]), rtol=1e-6, atol=0)  # ref: x[mask], mean
    per_image = torch.stack([F.mse_loss(pred[b][mask[b]], target[b][mask[b]]) for b in range(B)]).mean()
    assert abs(loss - per_image) > 1e-3  # not a mean of per-image means
    noisy = torch.where(mask[..., None], pred, pred + 100 * torch.randn(B, N, K, generator=g))
    torch.testing.assert_close(mf.maskfeat_loss(noisy, target, mask), loss, rtol=1e-6, atol=0)  # visible: ignored
    p = pred.clone().requires_grad_()
    mf.maskfeat_loss(p, target, mask).backward()
    assert not p.grad[~mask].any() and p.grad[mask].abs().sum() > 0
    assert mf.maskfeat_loss(pred, target, torch.zeros_like(mask)) == 0  # nothing masked: 0, not NaN


def test_forward_backward_shapes_and_head():
    model = build(img=(64, 96)).train()
    x, mask = images(2, 64, 96), masks(2, (4, 6))
    loss, out = model(x, mask)
    assert out['pred'].shape == out['target'].shape == (2, 24, 108) and torch.equal(out['mask'], mask)
    torch.testing.assert_close(loss, F.mse_loss(out['pred'][mask], out['target'][mask]), rtol=1e-6, atol=0)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.mask_token.grad.abs().sum() > 0
    head = model.pred_head
    assert isinstance(head.transforms[0][0], nn.LayerNorm) and head.transforms[0][0].eps == 1e-6
    assert head.projections[0].weight.shape == (108, 32)
    assert not hasattr(model, 'norm') and not hasattr(model, 'head')  # the reference deletes both
    one = build(in_chans=1)
    assert one.pred_head.projections[0].out_features == 36 and one(images(2, C=1), masks(2, (4, 4)))[0] > 0


def test_init_follows_the_reference():
    model = build(img=224, dim=256, depth=2, heads=4)
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            want = 0.0 if n.startswith('pred_head') else 0.02  # ref: encoder Linear biases start at 0.02
            assert torch.equal(m.bias, torch.full_like(m.bias, want)), n
        elif isinstance(m, nn.LayerNorm):
            want = 0.0 if n.startswith('pred_head') else 0.02
            assert torch.equal(m.bias, torch.full_like(m.bias, want)) and (m.weight == 1).all() and m.eps == 1e-6, n
    w = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks] + [model.pos_embed.flatten()])
    assert abs(w.std().item() / 0.02 - 1) < 0.02 and abs(w.mean().item()) < 1e-3
    frac = (w.abs() > 0.04).float().mean().item()  # torch's trunc_normal_ cuts at +-2 absolute: a plain normal
    assert abs(frac - 0.0455) < 0.004
    conv = model.patch_embed.proj
    assert abs(conv.weight.std().item() / 0.02 - 1) < 0.02
    bound = 1 / math.sqrt(3 * 16 * 16)  # the conv bias keeps PyTorch's default uniform init
    assert conv.bias.abs().max() <= bound and conv.bias.std() > 0.5 * bound / math.sqrt(3)
    for t in (model.cls_token, model.mask_token):
        assert abs(t.std().item() / 0.02 - 1) < 0.2


def reference_keys(depth):
    keys = {'cls_token', 'pos_embed', 'mask_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
            'hogs.0.weight_x', 'hogs.0.weight_y', 'pred_head.transforms.0.0.weight', 'pred_head.transforms.0.0.bias',
            'pred_head.projections.0.weight', 'pred_head.projections.0.bias'}
    for i in range(depth):
        keys |= {f'blocks.{i}.{k}' for k in ('norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias',
                                             'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias',
                                             'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
    return keys


def test_state_dict_keys_and_parameter_counts():
    sd = build().state_dict()
    assert set(sd) == reference_keys(2) and len(sd) == 11 + 12 * 2
    assert sd['pos_embed'].shape == (1, 17, 32) and sd['hogs.0.weight_x'].shape == (3, 1, 3, 3)
    torch.testing.assert_close(sd['hogs.0.weight_y'][0, 0], torch.tensor([[1., 2, 1], [0, 0, 0], [-1, -2, -1]]))
    # ViT-B and ViT-L at 224: the reference's counts (its MaskMViT, built and counted; hogs are buffers)
    for name, n, head, keys in (('base', 85_882_476, 84_588, 155), ('large', 303_413_356, 112_748, 299)):
        with torch.device('meta'):
            model = mf.MaskFeat((224, 224), *mf.MODELS[name])
        assert sum(p.numel() for p in model.parameters()) == n
        assert sum(p.numel() for p in model.pred_head.parameters()) == head and len(model.state_dict()) == keys
        D = model.pos_embed.shape[-1]
        # = timm's vit_*_patch16_224 without its classifier and final norm, + mask_token + the head
        timm_no_head = {768: 85_798_656, 1024: 303_301_632}[D]
        assert n == timm_no_head - 2 * D + D + (2 * D + 108 * D + 108)


def test_weight_decay_groups_decay_the_tokens():
    model = build()
    groups = common.param_groups(model, 0.05)[::-1]  # what main() builds: the reference's [decay, no decay]
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g['params']} for g in groups)
    assert [g['weight_decay'] for g in groups] == [0.05, 0.0]
    assert decay == {'cls_token', 'pos_embed', 'mask_token', 'patch_embed.proj.weight',
                     'pred_head.projections.0.weight'} | {f'blocks.{i}.{k}.weight' for i in range(2) for k in
                                                          ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1}  # biases and LayerNorms (13 + 7)


def test_lr_schedule_landmarks_of_the_reference():
    """lr_policy.get_lr_at_epoch with the yaml (1 machine: 256 images, 2e-4, 300 epochs, 30 warmup from 1e-6,
    cosine after warmup to 1e-6), values measured with the reference."""
    a = mf.Args(data='x')
    lr_at = lambda e: common.cosine_lr(e, a.blr, a.min_lr, a.warmup_epochs, 300, a.warmup_lr)  # noqa: E731
    for e, want in ((0, 1.0e-6), (1, 7.633e-6), (15, 1.005e-4), (30, 2.0e-4), (100, 1.688e-4), (165, 1.005e-4),
                    (299.99, 1.0e-6)):
        assert lr_at(e) == pytest.approx(want, rel=2e-3), e
    assert (a.blr * a.global_batch / 256, a.warmup_lr * a.global_batch / 256) == (1.6e-3, 8e-6)  # 8 machines
    assert (a.epochs, a.warmup_epochs, a.mask_ratio, a.clip_grad, a.betas, a.weight_decay) == \
        (1600, 30, 0.4, 0.02, (0.9, 0.999), 0.05)


def test_adamw_steps_lower_the_loss():
    model = build(dim=64).train()
    ds = common.SyntheticImages(8, 64)
    x = common.normalize(torch.stack([ds[i][0] for i in range(8)]), common.IMAGENET_MEAN, common.IMAGENET_STD)
    mask = masks(8, (4, 4))
    opt = torch.optim.AdamW(common.param_groups(model, 0.05)[::-1], lr=2e-3, betas=(0.9, 0.999), fused=True)
    params = list(model.parameters())
    first = None
    for _ in range(25):
        loss, _ = model(x, mask)
        opt.zero_grad()
        loss.backward()
        common.optimizer_step(opt, torch.amp.GradScaler(enabled=False), params, 0.02)  # the reference's clip
        first = first if first is not None else loss.item()
    assert model(x, mask)[0].item() < 0.6 * first


# --------------------------------------------------------------------------- 4. features, export, pictures


def test_features_are_the_normalised_mean_of_the_last_patch_tokens():
    model = build().eval()
    x = images(3)
    with torch.no_grad():
        f = mf.features(model, x)
        tokens = explicit_encoder(model, x, torch.zeros(3, 16, dtype=torch.bool))  # nothing masked
        want = F.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6)
        assert f.shape == (3, 32)
        torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(f, F.layer_norm(tokens[:, 0], (32,), eps=1e-6), atol=1e-2)  # not the cls token
        model.mask_token.add_(1.0)
        assert torch.equal(mf.features(model, x), f)  # no mask token involved


def test_encoder_export_is_timms_vit_layout():
    model = build()
    enc = mf.encoder_state_dict(model)
    assert set(enc) == reference_keys(2) - {'mask_token', 'hogs.0.weight_x', 'hogs.0.weight_y',
                                            'pred_head.transforms.0.0.weight', 'pred_head.transforms.0.0.bias',
                                            'pred_head.projections.0.weight', 'pred_head.projections.0.bias'}
    assert not any(k.startswith('norm') for k in enc)  # no final norm: the pretrained encoder has none
    fresh = build(seed=7)
    res = fresh.load_state_dict(enc, strict=False)
    assert set(res.missing_keys) == set(model.state_dict()) - set(enc) and not res.unexpected_keys
    x, none = images(), torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_encoder(x, none), model.forward_encoder(x, none))


def test_glyph_draws_each_bin_across_its_gradient():
    def glyph(bin_):
        hist = torch.zeros(1, 9, 1, 1)
        hist[0, bin_] = 1
        return mf.hog_glyphs(hist, 15)[0, 0]  # (15, 15), odd: a centre line is one pixel wide
    vertical = glyph(4)  # bin 4 holds horizontal gradients (atan2 = -pi/2): a vertical edge, drawn as a column
    assert (vertical[1:-1, 7] > 0.9).all() and vertical[7].sum() < 1.5
    # bins 0 and 8 hold near-vertical gradients (atan2 near 0 or pi): edges 10 degrees either side of horizontal
    a, b = glyph(0), glyph(8)
    torch.testing.assert_close(a, b.flip(1), rtol=0, atol=1e-5)
    assert a.sum(1).argmax() == 7 and a.sum(0).max() < 2 and not torch.allclose(a, a.flip(1))
    assert mf.hog_glyphs(torch.full((2, 9, 3, 4), 1 / 3), 8).shape == (2, 1, 24, 32)


def test_visualize_keeps_rng_and_mode(tmp_path):
    model = build().train()
    x, mask = images(3), masks(3, (4, 4))
    args = mf.Args(data='x')
    state = torch.get_rng_state()
    mf.visualize(model, x, mask, args, tmp_path / 'a.png')
    assert torch.equal(torch.get_rng_state(), state) and model.training
    mf.visualize(model.eval(), x, mask, args, tmp_path / 'b.png')
    assert (tmp_path / 'a.png').read_bytes() == (tmp_path / 'b.png').read_bytes()
    from PIL import Image
    with Image.open(tmp_path / 'a.png') as im:  # 5 columns of 64 px x 4 (glyph cells of 32 px), 3 rows
        assert im.size[0] == 5 * (256 + 2) + 2 and im.size[1] > 3 * 256
