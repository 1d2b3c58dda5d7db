"""Model-level tests for mixmim.py against the facts of the MixMIM reference (shared/methods/mixmim.md, section 3).

CPU only, the 'tiny' preset on 32-128 px inputs; one Swin-B/W14 build counts its parameters."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import mixmim

TINY = mixmim.MODELS['tiny']  # (embed 32, depths (1,1,2,1), heads (2,4,8,16), windows (4,4,4,2), dec 64, 2, 4)


def tiny(img_size=64, in_chans=3, norm_pix_loss=True, seed=0):
    torch.manual_seed(seed)
    return mixmim.MixMIM(img_size, *TINY, in_chans=in_chans, norm_pix_loss=norm_pix_loss)


def images(B=4, H=64, W=64, C=3, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def unit_mask(bits):
    return torch.tensor(bits, dtype=torch.bool)[None]  # (1, n)


def ref_patchify(imgs, p):
    B, C, H, W = imgs.shape
    x = torch.einsum('nchpwq->nhwpqc', imgs.reshape(B, C, H // p, p, W // p, p))
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def ref_sincos_2d(dim, g):
    """numpy transcription of the reference's util/pos_embed.get_2d_sincos_pos_embed (w goes first), no cls."""
    def one_d(d, pos):
        omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)
    return torch.from_numpy(np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], 1)).float()


# --------------------------------------------------------------------------- 1. the batch mask


@pytest.mark.parametrize('n,ratio,n_mix', [(49, 0.5, 24), (4, 0.5, 2), (16, 0.6, 9), (9, 0.5, 4), (49, 0.75, 36)])
def test_mask_exact_counts_and_noise_order(n, ratio, n_mix):
    assert n_mix == int(n * ratio)  # the reference's floor: 49 x 0.5 -> 24 from the partner, 25 own
    noise = torch.rand(1, n, generator=torch.Generator().manual_seed(n))
    g = int(math.isqrt(n))
    mask = mixmim.batch_mask(g, n // g, ratio, 'cpu', noise)
    assert mask.shape == (1, n) and mask.dtype == torch.bool and mask.sum() == n_mix
    order = sorted(range(n), key=lambda i: noise[0, i].item())  # ascending noise: the first n_mix are mixed in
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == set(order[:n_mix])


def test_mask_is_shared_by_the_batch_and_fresh_each_step():
    model = tiny(128)  # 4x4 = 16 units: C(16, 8) = 12870 possible masks
    imgs = images(5, 128, 128)
    torch.manual_seed(3)
    masks = []
    with torch.no_grad():
        for _ in range(4):
            _, out = model(imgs, 0.5)
            m = out['mask']
            assert m.shape == (5, 16) and (m == m[:1]).all() and m[0].sum() == 8  # one mask for every image
            masks.append(m[0])
    assert len({tuple(m.tolist()) for m in masks}) == 4  # a new mask every forward (step / micro-batch)


def test_mask_upsampling_is_nearest_and_units_are_merge_groups():
    mask = mixmim.batch_mask(7, 7, 0.5, 'cpu', torch.rand(1, 49, generator=torch.Generator().manual_seed(0)))
    for s, size in ((8, 56), (4, 28), (2, 14), (1, 7)):  # the reference's F.interpolate(nearest) per stage
        up = mixmim.upsample_mask(mask, 7, 7, s)
        ref = F.interpolate(mask.float().view(1, 1, 7, 7), size=(size, size), mode='nearest').flatten(1).bool()
        assert torch.equal(up, ref)
        grid = up.view(size, size)
        if s > 1:  # every 2x2 merge group lies inside one unit: merging never mixes the two images
            groups = grid.view(size // 2, 2, size // 2, 2).permute(0, 2, 1, 3).reshape(-1, 4)
            assert (groups == groups[:, :1]).all()


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 8 * 8, dtype=torch.float).view(2, 64, 1)
    w = mixmim.window_partition(x, 8, 8, 4)  # (2*4, 16, 1)
    assert w.shape == (8, 16, 1)
    assert w[1, :4, 0].tolist() == [4, 5, 6, 7]  # the second window of image 0 is the top-right 4x4 block
    assert w[4, 0, 0] == 64  # image 1 starts at window 4
    assert torch.equal(mixmim.window_reverse(w, 8, 8, 4), x)


# --------------------------------------------------------------------------- 2. mixing and isolation


def test_mixing_after_patch_embed_norm_before_positions():
    model = tiny().eval()
    imgs = images(3)
    mask = unit_mask([True, False, False, True])
    seen = []
    model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.forward_encoder(imgs, mask)
        t = model.patch_embed.norm(model.patch_embed.proj(imgs).flatten(2).transpose(1, 2))  # (3, 256, 32)
        m1 = F.interpolate(mask.float().view(1, 1, 2, 2), size=(16, 16), mode='nearest').view(1, 256, 1)
        expect = t * (1 - m1) + t.flip(0) * m1 + model.absolute_pos_embed  # the reference's formula
    assert torch.equal(seen[0], expect)
    assert not model.absolute_pos_embed.requires_grad
    assert torch.allclose(model.absolute_pos_embed[0], ref_sincos_2d(32, 16), atol=1e-6)


def stage_outputs(model, imgs, mask):
    """Every block's output (B, L_s, D_s) of every stage, with the stage's index."""
    outs = []
    for li, layer in enumerate(model.layers):
        for blk in layer.blocks:
            blk.register_forward_hook(lambda m, a, o, li=li: outs.append((li, o.clone())))
    with torch.no_grad():
        z = model.forward_encoder(imgs, mask)
    return outs + [(3, z)]


def image_tokens(model, outs, mask, i, B):
    """Image i's tokens at every stage: in sample i where it was kept, in sample B-1-i where it was mixed in."""
    res = []
    for li, o in outs:
        g = mixmim.upsample_mask(mask, *model.grids[3], 8 >> li)[0]  # (L_s,)
        res.append(torch.cat([o[i, ~g], o[B - 1 - i, g]]))
    return res


# (input, windows): the tiny preset at 64 px; the base's geometry (windows 14, 14, 14, 7 at 224 px: stage-1/2 windows
# straddle 8x8 / 4x4 mask units); every stage one global window at 64 px
GEOMETRIES = [(64, TINY[3]), (224, (14, 14, 14, 7)), (64, (16, 8, 4, 2))]


def geometry_model(size, windows):
    torch.manual_seed(0)
    return mixmim.MixMIM(size, TINY[0], TINY[1], TINY[2], windows, *TINY[4:]).eval()


def geometry_mask(size):
    n = (size // 32) ** 2
    return mixmim.batch_mask(size // 32, size // 32, 0.5, 'cpu', torch.rand(1, n, generator=torch.Generator()
                                                                            .manual_seed(5)))


@pytest.mark.parametrize('size,windows', GEOMETRIES, ids=['tiny64', 'base_windows224', 'global64'])
@pytest.mark.parametrize('B,i', [(4, 0), (4, 2), (3, 0), (3, 1)])
def test_perturbing_the_partner_leaves_an_image_unchanged_at_every_stage(B, i, size, windows):
    model, mask = geometry_model(size, windows), geometry_mask(size)
    imgs = images(B, size, size)
    partner = B - 1 - i
    other = imgs.clone()
    if partner != i:
        other[partner] += 3 * torch.randn(other[partner].shape)
    else:  # odd batch: the middle image mixes with itself; perturb every other image instead
        for j in range(B):
            if j != i:
                other[j] += 3 * torch.randn(other[j].shape)
    a, b = stage_outputs(model, imgs, mask), stage_outputs(model, other, mask)
    assert len(a) == sum(TINY[1]) + 1
    for ta, tb in zip(image_tokens(model, a, mask, i, B), image_tokens(model, b, mask, i, B)):
        assert torch.equal(ta, tb)  # exactly, fp32
    if partner != i:  # and the perturbed image's own tokens did change: the test can fail
        assert all(not torch.equal(ta, tb) for ta, tb in zip(image_tokens(model, a, mask, partner, B),
                                                             image_tokens(model, b, mask, partner, B)))


@pytest.mark.parametrize('size,windows', GEOMETRIES[1:], ids=['base_windows224', 'global64'])
def test_odd_batch_middle_image_mixes_with_itself_in_two_isolated_groups(size, windows):
    """B = 3: sample 1 is image 1 in both groups. Changing image 1 inside its mixed-in units changes only the
    partner-group tokens of sample 1: its own-group tokens never attend to them."""
    model, mask = geometry_model(size, windows), geometry_mask(size)
    imgs = images(3, size, size)
    g = size // 32
    up = F.interpolate(mask.float().view(1, 1, g, g), scale_factor=32, mode='nearest')[0]  # (1, H, W) pixels
    other = imgs.clone()
    other[1] += 3 * up * torch.randn_like(other[1])  # only inside the mixed-in units
    a, b = stage_outputs(model, imgs, mask), stage_outputs(model, other, mask)
    for (li, oa), (_, ob) in zip(a, b):
        m = mixmim.upsample_mask(mask, g, g, 8 >> li)[0]
        assert torch.equal(oa[1, ~m], ob[1, ~m]) and not torch.equal(oa[1, m], ob[1, m])
        assert torch.equal(oa[[0, 2]], ob[[0, 2]])


@pytest.mark.parametrize('size,windows,leaky_stages', [(224, (14, 14, 14, 7), {0, 1, 2, 3}),
                                                       (64, (16, 8, 4, 2), {0, 1, 2, 3})])
def test_without_the_isolation_images_would_leak(size, windows, leaky_stages, monkeypatch):
    """Control: with the attention mask switched off the partner leaks in at every stage whose windows straddle
    mask units, so the test above has teeth there."""
    orig = mixmim.WindowAttention.forward
    monkeypatch.setattr(mixmim.WindowAttention, 'forward', lambda self, x, same: orig(self, x, torch.ones_like(same)))
    model, mask = geometry_model(size, windows), geometry_mask(size)
    imgs = images(4, size, size)
    other = imgs.clone()
    other[3] += 3
    a, b = stage_outputs(model, imgs, mask), stage_outputs(model, other, mask)
    leaked = {li for (li, _), ta, tb in zip(a, image_tokens(model, a, mask, 0, 4), image_tokens(model, b, mask, 0, 4))
              if not torch.equal(ta, tb)}
    assert leaked == leaky_stages


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_isolation_is_exact_in_half_precision(dtype):
    """The isolating bias is finite in the dtype (no inf/NaN) and gives zero weight across images."""
    torch.manual_seed(0)
    attn = mixmim.WindowAttention(32, 4, 2).to(dtype)
    g = torch.tensor([0, 1] * 8, dtype=torch.bool)  # (16,) alternating images inside one 4x4 window
    same = (g[:, None] == g[None, :])[None]  # (1, 16, 16)
    x = torch.randn(2, 16, 32).to(dtype)
    y = x.clone()
    y[:, g] = (y[:, g].float() * 100).to(dtype)  # large values in the other image's tokens
    with torch.no_grad():
        a, b = attn(x, same), attn(y, same)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(a[:, ~g], b[:, ~g])


# --------------------------------------------------------------------------- 3. the unmixing decoder and the loss


def test_decoder_inputs_are_the_two_unmixed_sequences():
    model = tiny().eval()
    mask = unit_mask([True, False, False, True])
    seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    z = torch.randn(3, 4, 256)
    with torch.no_grad():
        model.forward_decoder(z, mask)
        y = model.decoder_embed(z)
    x, pos, tok, m = seen[0], model.decoder_pos_embed[0], model.mask_token[0, 0], mask[0]
    assert x.shape == (6, 4, TINY[4])
    for r in range(3):
        for p in range(4):
            own = tok if m[p] else y[r, p]  # first branch: image r's tokens, mask tokens where it was hidden
            partner = y[r, p] if m[p] else tok  # second branch: the partner's tokens, mask tokens elsewhere
            assert torch.equal(x[r, p], own + pos[p]) and torch.equal(x[3 + r, p], partner + pos[p])
    assert torch.allclose(pos, ref_sincos_2d(TINY[4], 2), atol=1e-6) and not model.decoder_pos_embed.requires_grad


@pytest.mark.parametrize('B', [4, 3])
def test_unmixed_prediction_covers_each_image_position_once_from_its_hidden_branch(B):
    n, P = 4, 3 * 32 * 32
    mask = unit_mask([True, False, True, False])
    rows = torch.arange(2 * B, dtype=torch.float)[:, None, None] * 10 + torch.arange(n)[None, :, None]
    pred = (rows * 1000 + 0.5).expand(2 * B, n, P)  # each (branch row, position) distinguishable
    _, rec = mixmim.forward_loss(images(B), pred, mask, True)
    used = {}
    for i in range(B):
        for p in range(n):
            r = int(rec[i, p, 0].item() // 10000)
            assert int(rec[i, p, 0].item() // 1000) % 10 == p  # the same position
            # the source row saw a mask token there: own branch where image i was hidden, partner branch otherwise
            assert r == (i if mask[0, p] else B + B - 1 - i)
            used[(r, p)] = used.get((r, p), 0) + 1
    hidden_slots = {(r, p) for r in range(2 * B) for p in range(n) if bool(mask[0, p]) == (r < B)}
    assert set(used) == hidden_slots and set(used.values()) == {1}  # every mask-token slot used exactly once


def test_loss_ignores_predictions_where_a_branch_saw_the_token():
    B, n, P = 4, 4, 3 * 32 * 32
    mask = unit_mask([False, True, True, False])
    imgs, pred = images(B), torch.randn(2 * B, n, P)
    loss, _ = mixmim.forward_loss(imgs, pred, mask, True)
    seen = torch.zeros(2 * B, n, 1, dtype=torch.bool)
    seen[:B] = ~mask[..., None]  # first branch saw image i's own tokens
    seen[B:] = mask[..., None]  # second branch saw the partner tokens
    moved = pred + 100 * torch.randn_like(pred) * seen
    assert torch.equal(mixmim.forward_loss(imgs, moved, mask, True)[0], loss)
    hidden = pred.clone()
    hidden[1, 1] += 1.0  # branch 1 had a mask token at unit 1: counted
    assert mixmim.forward_loss(imgs, hidden, mask, True)[0] != loss


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_equals_a_written_out_computation(norm_pix):
    B, n, P = 3, 4, 3 * 32 * 32
    mask = unit_mask([True, False, False, True])
    imgs, pred = images(B).double(), torch.randn(2 * B, n, P, dtype=torch.float64)
    target = ref_patchify(imgs, 32)
    total = 0.0
    for i in range(B):
        for p in range(n):
            t = target[i, p]
            if norm_pix:
                t = (t - t.mean()) / math.sqrt(((t - t.mean()) ** 2).sum().item() / (P - 1) + 1e-6)
            src = pred[i, p] if mask[0, p] else pred[B + (B - 1 - i), p]
            total += ((src - t) ** 2).sum().item()
    loss, _ = mixmim.forward_loss(imgs, pred, mask, norm_pix)
    assert loss.item() == pytest.approx(total / (B * n * P), rel=1e-6)


def test_loss_of_a_zero_prediction_is_hand_worked():
    """Norm-pix targets have sum of squares (P-1) var/(var+1e-6) per unit: a zero prediction scores (P-1)/P."""
    imgs = images(2) * 10  # var 100: the eps is negligible
    loss, _ = mixmim.forward_loss(imgs, torch.zeros(4, 4, 3072), unit_mask([True, False, True, False]), True)
    assert loss.item() == pytest.approx(3071 / 3072, rel=1e-5)


def test_forward_shapes_odd_batch_and_backward():
    model = tiny()
    loss, out = model(images(3), 0.5)
    loss.backward()
    assert out['pred'].shape == (3, 4, 3072) and out['mask'].shape == (3, 4) and loss.ndim == 0
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}  # every parameter is used


def test_grayscale_predicts_one_channel():
    model = tiny(32, in_chans=1)
    loss, out = model(images(2, 32, 32, C=1))
    assert out['pred'].shape == (2, 1, 1024) and torch.isfinite(loss)


# --------------------------------------------------------------------------- 4. init, keys, sizes


def reference_keys(depths, dec_depth):
    """models_mixmim.MixMIM's state-dict keys."""
    keys = {'mask_token', 'absolute_pos_embed', 'decoder_pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
            'patch_embed.norm.weight', 'patch_embed.norm.bias', 'norm.weight', 'norm.bias'}
    for s, depth in enumerate(depths):
        for j in range(depth):
            pre = f'layers.{s}.blocks.{j}.'
            keys |= {pre + 'attn.relative_position_bias_table', pre + 'attn.relative_position_index'}
            keys |= {pre + m + t for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
                     for t in ('.weight', '.bias')}
        if s < 3:
            keys |= {f'layers.{s}.downsample.norm.weight', f'layers.{s}.downsample.norm.bias',
                     f'layers.{s}.downsample.reduction.weight'}
    for j in range(dec_depth):
        keys |= {f'decoder_blocks.{j}.{m}{t}' for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
                 for t in ('.weight', '.bias')}
    return keys | {f'{m}.{t}' for m in ('decoder_embed', 'decoder_norm', 'decoder_pred') for t in ('weight', 'bias')}


def test_state_dict_keys_and_encoder_export():
    model = tiny()
    sd = model.state_dict()
    assert set(sd) == reference_keys(TINY[1], TINY[5])
    enc = mixmim.encoder_state_dict(model)  # models_mixmim_ft.MixMIM's keys without its classification head
    assert set(enc) == {k for k in sd if not k.startswith(('decoder', 'mask_token'))}
    assert 'absolute_pos_embed' in enc and 'layers.3.blocks.0.attn.relative_position_index' in enc
    idx = sd['layers.0.blocks.0.attn.relative_position_index']  # Swin's index for a 4x4 window
    assert idx.shape == (16, 16) and idx[0, 0] == 24 and idx[0, 15] == 0 and idx[15, 0] == 48 and idx.max() == 48


def test_base_parameter_count():
    model = mixmim.MixMIM(224, *mixmim.MODELS['base'])
    total = sum(p.numel() for p in model.parameters())
    assert total == 114_665_784  # sheet: 114.666M with the frozen position tables
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(('decoder', 'mask_token')))
    head = 1024 * 1000 + 1000
    assert round((enc - 3136 * 128 + head) / 1e6, 2) == 87.94  # sheet: encoder + head 87.94M (88M in the README)
    assert [blk.attn.ws for layer in model.layers for blk in layer.blocks[:1]] == [14, 14, 14, 7]
    assert model.layers[2].blocks[0].attn.relative_position_bias_table.shape == (27 * 27, 16)


def test_init_statistics():
    model = mixmim.MixMIM(224, 128, (1, 1, 1, 1), (4, 8, 16, 32), (14, 14, 14, 7), 512, 1, 16)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):  # xavier_uniform on the whole weight (qkv as one (3D, D) matrix), zero bias
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound and m.weight.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                                           rel=0.1), name
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-5 and (m.weight == 1).all() and not m.bias.any(), name
    t = model.layers[0].blocks[0].attn.relative_position_bias_table
    # timm's trunc_normal_(std=.02) cuts at the absolute -2, 2: a plain N(0, 0.02) in effect
    assert t.std().item() == pytest.approx(0.02, rel=0.1) and abs(t.mean().item()) < 0.005 and t.abs().max() < 0.12
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.2) and model.mask_token.abs().max() < 0.12
    w = model.patch_embed.proj.weight  # PyTorch's conv default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert w.abs().max() <= 1 / math.sqrt(48) and w.std().item() == pytest.approx(1 / math.sqrt(3 * 48), rel=0.1)
    assert model.layers[0].downsample.reduction.bias is None


def test_weight_decay_groups_decay_mask_token_and_tables():
    model = tiny()
    no_decay, decay = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    assert 'mask_token' in decayed  # add_weight_decay got no skip list in the reference
    assert all(f'layers.{s}.blocks.0.attn.relative_position_bias_table' in decayed for s in range(4))
    assert all(names[id(p)].endswith('.bias') or p.ndim == 1 for p in no_decay['params'])
    assert 'absolute_pos_embed' not in decayed | {names[id(p)] for p in no_decay['params']}  # frozen


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = tiny(32)
    imgs = images(4, 32, 32)
    mask = unit_mask([True])[:, :1]  # 32 px: one unit, mixed in from the partner
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = model(imgs, 0.5, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_non_square_input():
    torch.manual_seed(0)
    model = mixmim.MixMIM((64, 128), *TINY)  # units 2x4; stage grids 16x32 ... 2x4
    mask = unit_mask([True, False, False, True, False, True, True, False])
    loss, out = model(images(3, 64, 128), 0.5, mask)
    assert out['pred'].shape == (3, 8, 3072) and torch.isfinite(loss)
    assert torch.equal(model.decoder_pos_embed[0], common.sincos_2d(TINY[4], 2, 4))
    assert torch.equal(model.absolute_pos_embed[0], common.sincos_2d(TINY[0], 16, 32))


def test_picture_dims_the_units_the_mixed_input_hides(monkeypatch):
    """Image A is dimmed where its units were replaced by B's (mask True), image B where A's units were kept."""
    shown = {}
    monkeypatch.setattr(mixmim, 'save_grid', lambda path, cols, note='': shown.update(cols=dict(cols)))
    imgs = images(4) * 0.3
    mixmim.visualize(tiny(), imgs, mixmim.Args(mask_ratio=0.5), 'unused.png')
    cols = list(shown['cols'].values())
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    a, b = imgs * std + mean, imgs.flip(0) * std + mean  # the pictures of A and B
    mask = mixmim.batch_mask(2, 2, 0.5, 'cpu', torch.rand(1, 4, generator=torch.Generator().manual_seed(0)))
    for u in range(4):
        r, c = divmod(u, 2)
        tile = (..., slice(32 * r, 32 * r + 32), slice(32 * c, 32 * c + 32))
        hidden_a = bool(mask[0, u])
        torch.testing.assert_close(cols[0][tile], a[tile] * (0.35 if hidden_a else 1))
        torch.testing.assert_close(cols[1][tile], b[tile] * (1 if hidden_a else 0.35))
        torch.testing.assert_close(cols[2][tile], (b if hidden_a else a)[tile])  # the mixed input
    assert mask.sum() == 2
