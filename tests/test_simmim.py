"""Model-level tests for simmim.py against the facts of the SimMIM reference (shared/methods/simmim.md and
microsoft/SimMIM models/{simmim,swin_transformer,vision_transformer}.py, data/data_simmim.py, optimizer.py,
lr_scheduler.py).

Everything runs on the CPU with the 'tiny' (Swin) and 'vit_tiny' presets or smaller hand-built modules on 32-128 px
inputs; swin_base / vit_base are built once (with the slow truncated-normal init switched off) to count parameters."""
import bisect
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import simmim

TRUNC_1SIGMA_STD = 0.5395685  # std of a standard normal truncated at +-1 sigma: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread: spinning OpenMP threads make tiny models very slow when other processes share the
    cores (the suite runs beside other test processes on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name='tiny', img=32, in_chans=3, seed=0, drop_path=0.0):
    torch.manual_seed(seed)
    return simmim.build_model(name, common.pair(img), in_chans, drop_path)


def images(B=2, H=32, W=32, C=3, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def mask_for(model, B=2, H=32, W=32, mask_patch=8, ratio=0.6, seed=1):
    p = model.encoder.patch_embed.patch_size
    return simmim.block_mask(B, (H, W), mask_patch, p, ratio, 'cpu', torch.Generator().manual_seed(seed))


def ref_loss(x, x_rec, mask, patch_size, in_chans):
    """models/simmim.py SimMIM.forward, written out as the reference has it."""
    mask = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction='none')
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def ref_img_mask(H, W, ws, shift):
    """SwinTransformerBlock.__init__: region labels of the shifted image from the three slices."""
    img_mask = torch.zeros(H, W)
    cnt = 0
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for h in slices:
        for w in slices:
            img_mask[h, w] = cnt
            cnt += 1
    return img_mask


def swin_rel_index(ws):
    """Swin's relative position index by explicit loops (independent of simmim.relative_position_index)."""
    N = ws * ws
    idx = torch.empty(N, N, dtype=torch.long)
    for i in range(N):
        hi, wi = divmod(i, ws)
        for j in range(N):
            hj, wj = divmod(j, ws)
            idx[i, j] = (hi - hj + ws - 1) * (2 * ws - 1) + (wi - wj + ws - 1)
    return idx


def naive_swin_block(blk, x):
    """An independent (shifted-)window block: roll by -shift, explicit loop over windows with
    softmax(q k^T * scale + rel_bias + mask) @ v, the -100 mask from the reference's img_mask, roll back; then the
    residual and the MLP. Uses the block's own weights."""
    B, L, C = x.shape
    H, W = blk.res
    ws, s, heads = blk.ws, blk.shift, blk.attn.num_heads
    hd, N = C // heads, ws * ws
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-5).view(B, H, W, C)
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
        labels = ref_img_mask(H, W, ws, s)
    table = blk.attn.relative_position_bias_table
    out = torch.zeros(B, H, W, C)
    for r0 in range(0, H, ws):
        for c0 in range(0, W, ws):
            coords = [(r0 + i, c0 + j) for i in range(ws) for j in range(ws)]
            t = torch.stack([y[:, r, c] for r, c in coords], 1)  # (B, N, C)
            qkv = F.linear(t, blk.attn.qkv.weight, blk.attn.qkv.bias).view(B, N, 3, heads, hd)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, hd)
            bias = torch.zeros(heads, N, N)
            mask = torch.zeros(N, N)
            for a, (ra, ca) in enumerate(coords):
                for b, (rb, cb) in enumerate(coords):
                    bias[:, a, b] = table[(ra - rb + ws - 1) * (2 * ws - 1) + (ca - cb + ws - 1)]
                    if s and labels[ra, ca] != labels[rb, cb]:
                        mask[a, b] = -100.0
            attn = (q * hd ** -0.5) @ k.transpose(-2, -1) + bias + mask
            o = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
            o = F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
            for a, (r, c) in enumerate(coords):
                out[:, r, c] = o[:, a]
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    x = x + out.reshape(B, L, C)
    h = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    return x + F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def swin_block(dim, res, heads, ws, shift, seed=0):
    """A SwinBlock with non-trivial weights everywhere (random rel-pos table, LayerNorm affine, biases)."""
    torch.manual_seed(seed)
    blk = simmim.SwinBlock(dim, res, heads, ws, shift).eval()
    with torch.no_grad():
        for prm in blk.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    return blk


# --------------------------------------------------------------------------- 1. block_mask (ref MaskGenerator)


@pytest.mark.parametrize('size,mask_patch,model_patch,ratio,count', [
    (192, 32, 4, 0.6, 22),   # Swin-B/192: ceil(36 x .6) = 22 of 36 blocks
    (224, 32, 16, 0.6, 30),  # ViT-B/224: ceil(49 x .6) = 30 of 49
    (64, 16, 4, 0.6, 10),    # tiny demo: ceil(16 x .6) = 10 of 16
    (32, 8, 8, 0.5, 8),      # scale 1: a block is one patch
    (64, 16, 8, 0.75, 12),
    ((64, 96), 32, 4, 0.6, 4),  # non-square: 2 x 3 blocks, ceil(3.6) = 4
])
def test_block_mask_counts_and_blocks(size, mask_patch, model_patch, ratio, count):
    H, W = common.pair(size)
    rh, rw, s = H // mask_patch, W // mask_patch, mask_patch // model_patch
    assert count == math.ceil(rh * rw * ratio)
    B = 6
    torch.manual_seed(0)
    mask = simmim.block_mask(B, (H, W), mask_patch, model_patch, ratio, 'cpu')
    assert mask.shape == (B, H // model_patch, W // model_patch) and mask.dtype == torch.bool
    # every s x s group of patches (one mask block) is all True or all False
    blocks = mask.view(B, rh, s, rw, s)
    assert (blocks == blocks[:, :, :1, :, :1]).all()
    # exactly `count` blocks per image (not on average), i.e. count x s^2 patches
    assert blocks[:, :, 0, :, 0].sum((1, 2)).tolist() == [count] * B
    assert mask.sum((1, 2)).tolist() == [count * s * s] * B
    # different images get different masks
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1


def test_block_mask_fresh_per_call_and_seeded_generator_reproduces():
    torch.manual_seed(0)
    a = simmim.block_mask(4, (64, 64), 16, 4, 0.6, 'cpu')
    b = simmim.block_mask(4, (64, 64), 16, 4, 0.6, 'cpu')
    assert not torch.equal(a, b)  # a new mask every step
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    c = simmim.block_mask(4, (64, 64), 16, 4, 0.6, 'cpu', g(3))
    d = simmim.block_mask(4, (64, 64), 16, 4, 0.6, 'cpu', g(3))
    e = simmim.block_mask(4, (64, 64), 16, 4, 0.6, 'cpu', g(4))
    assert torch.equal(c, d) and not torch.equal(c, e)


def test_block_mask_is_uniform_over_blocks():
    """np.random.permutation(...)[:count]: every block is masked with probability count / blocks."""
    torch.manual_seed(0)
    mask = simmim.block_mask(4000, (64, 64), 16, 16, 0.6, 'cpu')  # 16 blocks, 10 masked
    freq = mask.float().mean(0)
    assert (freq - 10 / 16).abs().max() < 0.04


# --------------------------------------------------------------------------- 2. loss


@pytest.mark.parametrize('C', [3, 1])
def test_loss_equals_reference_formula(C):
    B, H, W, p = 3, 32, 48, 4
    x = images(B, H, W, C)
    x_rec = images(B, H, W, C, seed=5)
    mask = simmim.block_mask(B, (H, W), 16, p, 0.6, 'cpu', torch.Generator().manual_seed(2))
    got = simmim.simmim_loss(x, x_rec, mask, p)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref_loss(x, x_rec, mask, p, C), rtol=1e-6, atol=1e-7)
    # and in words: mean absolute error over the masked pixels and channels
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)  # (B, H, W)
    want = (x - x_rec).abs().permute(0, 2, 3, 1)[m].mean()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_loss_only_sees_the_masked_area_and_is_l1():
    B, H, W, p = 2, 32, 32, 4
    x = images(B, H, W)
    mask = simmim.block_mask(B, (H, W), 16, p, 0.6, 'cpu', torch.Generator().manual_seed(2))
    m = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).expand_as(x)  # (B, 3, H, W)
    err = images(B, H, W, seed=7)
    base = simmim.simmim_loss(x, x + err, mask, p)
    outside = x + err + torch.where(m, 0.0, 100 * images(B, H, W, seed=8))  # change x_rec outside the mask only
    assert torch.equal(simmim.simmim_loss(x, outside, mask, p), base)
    inside = x + err + torch.where(m, 0.5, 0.0)
    assert simmim.simmim_loss(x, inside, mask, p) != base
    # L1: scaling the error inside the mask by k scales the loss by k (L2 would give k^2)
    for k in (0.5, 3.0):
        torch.testing.assert_close(simmim.simmim_loss(x, x + k * err, mask, p), k * base, rtol=1e-5, atol=0)
    # no masked pixel: 0, not NaN (the +1e-5)
    assert simmim.simmim_loss(x, x + err, torch.zeros_like(mask), p).item() == 0.0


def test_loss_divides_by_in_chans():
    """sum(m) counts masked pixels once; the /in_chans makes it a per-channel mean: the same error in every
    channel gives the same loss for C = 1 and C = 3."""
    B, H, W, p = 2, 16, 16, 4
    mask = simmim.block_mask(B, (H, W), 8, p, 0.5, 'cpu', torch.Generator().manual_seed(0))
    x1, e1 = images(B, H, W, 1), images(B, H, W, 1, seed=3)
    x3, e3 = x1.repeat(1, 3, 1, 1), e1.repeat(1, 3, 1, 1)
    l1, l3 = simmim.simmim_loss(x1, x1 + e1, mask, p), simmim.simmim_loss(x3, x3 + e3, mask, p)
    torch.testing.assert_close(l1, l3, rtol=1e-6, atol=0)
    n = mask.sum().item() * p * p
    torch.testing.assert_close(l3, (e3.abs() * mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]).sum()
                               / (n + 1e-5) / 3, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- 3. relative positions


@pytest.mark.parametrize('ws', [1, 2, 3, 6, 7])
def test_swin_relative_position_index(ws):
    idx = simmim.relative_position_index(ws)
    assert idx.shape == (ws * ws, ws * ws)
    assert torch.equal(idx, swin_rel_index(ws))
    assert idx.min() == 0 and idx.max() == (2 * ws - 1) ** 2 - 1
    assert (idx.diagonal() == (ws - 1) * (2 * ws - 1) + ws - 1).all()  # zero offset: the table's centre row
    assert torch.equal(idx + idx.T, torch.full_like(idx, 2 * ((ws - 1) * (2 * ws - 1) + ws - 1)))  # (-d) mirrors d
    assert len(idx.unique()) == (2 * ws - 1) ** 2  # every offset is used


def beit_index(gh, gw):
    """BEiT/SimMIM RelativePositionBias index by explicit loops, with the three cls entries."""
    n_rel = (2 * gh - 1) * (2 * gw - 1) + 3  # num_relative_distance
    N = gh * gw
    idx = torch.zeros(N + 1, N + 1, dtype=torch.long)
    for i in range(N):
        hi, wi = divmod(i, gw)
        for j in range(N):
            hj, wj = divmod(j, gw)
            idx[1 + i, 1 + j] = (hi - hj + gh - 1) * (2 * gw - 1) + (wi - wj + gw - 1)
    idx[0, 0:] = n_rel - 3  # cls -> token
    idx[0:, 0] = n_rel - 2  # token -> cls
    idx[0, 0] = n_rel - 1  # cls -> cls
    return idx


@pytest.mark.parametrize('grid,heads', [((14, 14), 12), ((3, 5), 2)])
def test_shared_relative_position_bias(grid, heads):
    rpb = common.RelativePositionBias(grid, heads)
    gh, gw = grid
    n_rel = (2 * gh - 1) * (2 * gw - 1) + 3
    assert rpb.relative_position_bias_table.shape == (n_rel, heads)  # ViT-B/224: (732, 12)
    if grid == (14, 14):
        assert n_rel == 732
    assert torch.equal(rpb.relative_position_bias_table, torch.zeros(n_rel, heads))  # zero-init
    idx = rpb.relative_position_index
    assert idx.shape == (gh * gw + 1,) * 2
    assert torch.equal(idx, beit_index(gh, gw))
    assert idx[0, 1] == n_rel - 3 and idx[1, 0] == n_rel - 2 and idx[0, 0] == n_rel - 1
    # forward: table[index] as (1, heads, N+1, N+1)
    with torch.no_grad():
        rpb.relative_position_bias_table.normal_()
    out = rpb()
    assert out.shape == (1, heads, gh * gw + 1, gh * gw + 1)
    table = rpb.relative_position_bias_table
    for i, j in [(0, 0), (0, 3), (4, 0), (1, 2), (gh * gw, 1)]:
        torch.testing.assert_close(out[0, :, i, j], table[idx[i, j]])


# --------------------------------------------------------------------------- 4. Swin windows


def test_window_partition_reverse_inverse_and_row_major():
    H, W, ws = 4, 6, 2
    x = torch.arange(H * W, dtype=torch.float).view(1, H, W, 1)
    win = simmim.window_partition(x, ws)  # (1, nW, ws*ws, 1)
    assert win.shape == (1, (H // ws) * (W // ws), ws * ws, 1)
    for k in range(win.shape[1]):
        wy, wx = divmod(k, W // ws)  # windows in row-major order
        for t in range(ws * ws):
            r, c = wy * ws + t // ws, wx * ws + t % ws  # tokens row-major inside a window
            assert win[0, k, t, 0] == r * W + c
    y = torch.randn(3, 8, 12, 5)
    for ws in (2, 4):
        assert torch.equal(simmim.window_reverse(simmim.window_partition(y, ws), ws, 8, 12), y)


@pytest.mark.parametrize('H,W,ws,shift', [(4, 4, 2, 1), (8, 12, 4, 2), (6, 6, 3, 1)])
def test_shifted_window_mask_regions(H, W, ws, shift):
    mask = simmim.shifted_window_mask(H, W, ws, shift)
    nW, N = (H // ws) * (W // ws), ws * ws
    assert mask.shape == (nW, N, N)
    labels = simmim.window_partition(ref_img_mask(H, W, ws, shift)[None, :, :, None], ws)[0, :, :, 0]  # (nW, N)
    want = torch.where(labels[:, :, None] != labels[:, None, :], -100.0, 0.0)
    assert torch.equal(mask, want)
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    assert (mask[0] == 0).all()  # the first window holds one region only
    assert (mask[-1] != 0).any()  # the last one mixes the wrapped-around pieces
    if (H, W, ws, shift) == (4, 4, 2, 1):  # last window: 4 tokens from 4 different regions
        assert torch.equal(mask[-1], -100.0 * (1 - torch.eye(4)))


def test_unshifted_block_is_local_to_its_window():
    blk = swin_block(8, (4, 4), 2, 2, 0)
    assert blk.attn_mask is None
    x = torch.randn(1, 16, 8)
    inside = [0, 1, 4, 5]  # window (0, 0): rows 0-1, cols 0-1
    outside = [i for i in range(16) if i not in inside]
    with torch.no_grad():
        y = blk(x)
        x2 = x.clone()
        x2[:, outside] += 3 * torch.randn(1, 12, 8)
        y2 = blk(x2)
        x3 = x.clone()
        x3[:, 5] += 3 * torch.randn(8)  # not a constant: LayerNorm would remove a uniform shift
        y3 = blk(x3)
    torch.testing.assert_close(y2[:, inside], y[:, inside], rtol=0, atol=1e-6)
    assert ((y3[0, [0, 1, 4]] - y[0, [0, 1, 4]]).abs().amax(-1) > 1e-3).all()  # window mates see token 5
    torch.testing.assert_close(y3[:, outside], y[:, outside], rtol=0, atol=1e-6)  # nobody else does


@pytest.mark.parametrize('dim,res,heads,ws,shift', [(16, (8, 12), 2, 4, 2), (8, (4, 4), 2, 2, 1), (12, (6, 6), 3, 3, 1),
                                                    (16, (8, 8), 2, 4, 0)])
def test_swin_block_equals_naive_reference(dim, res, heads, ws, shift):
    blk = swin_block(dim, res, heads, ws, shift)
    assert blk.ws == ws and blk.shift == shift
    x = torch.randn(2, res[0] * res[1], dim)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), naive_swin_block(blk, x), rtol=1e-5, atol=1e-5)


def test_preset_block_equals_naive_reference():
    blk = build('tiny', 32).encoder.layers[0].blocks[1].eval()  # 8x8 tokens, window 2, shift 1
    assert blk.shift == 1 and blk.ws == 2
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), naive_swin_block(blk, x), rtol=1e-5, atol=1e-5)


def test_shifted_block_does_not_mix_wrapped_regions():
    """4x4 tokens, window 2, shift 1: after the roll, the last window holds original tokens (3,3), (3,0), (0,3),
    (0,0), four different regions. Token (0,0) must not see (3,3) although they share the window."""
    blk = swin_block(8, (4, 4), 2, 2, 1)
    x = torch.randn(1, 16, 8)
    x2 = x.clone()
    x2[:, 15] += 3 * torch.randn(8)  # original (3, 3)
    with torch.no_grad():
        y, y2 = blk(x), blk(x2)
        torch.testing.assert_close(y2[:, 0], y[:, 0], rtol=0, atol=1e-6)
        # (1,1) and (2,2) share shifted window (0,0) and one region: they do see each other
        x3 = x.clone()
        x3[:, 10] += 3 * torch.randn(8)
        assert (blk(x3)[0, 5] - y[0, 5]).abs().max() > 1e-3
        # and without the mask token 0 would see token 15: the test above can fail
        blk.attn_mask = torch.zeros_like(blk.attn_mask)
        assert (blk(x2)[0, 0] - blk(x)[0, 0]).abs().max() > 1e-3


def test_block_window_and_shift_per_stage():
    enc = build('tiny', 64).encoder  # token grids 16, 8, 4, 2; window 2
    got = [[(b.ws, b.shift, b.attn_mask is not None) for b in layer.blocks] for layer in enc.layers]
    assert got == [[(2, 0, False), (2, 1, True)]] * 3 + [[(2, 0, False), (2, 0, False)]]  # res 2 <= window: no shift
    enc = build('tiny', 32).encoder  # grids 8, 4, 2, 1: the 1x1 stage uses a 1x1 window
    assert [(b.ws, b.shift) for b in enc.layers[3].blocks] == [(1, 0), (1, 0)]
    assert enc.layers[3].blocks[0].attn.relative_position_bias_table.shape == (1, 8)
    assert enc.layers[0].blocks[1].attn_mask.shape == (16, 4, 4)  # (nW, N, N)
    with pytest.raises(SystemExit, match='does not split'):
        simmim.SwinBlock(8, (6, 6), 1, 4, 0)  # 6 tokens in windows of 4: refused with a message


def test_patch_merging_order_and_shapes():
    torch.manual_seed(0)
    pm = simmim.PatchMerging((4, 6), 5)
    with torch.no_grad():
        pm.norm.weight.normal_()
        pm.norm.bias.normal_()
    assert pm.reduction.bias is None and pm.reduction.weight.shape == (10, 20)
    x = torch.randn(2, 24, 5)
    y = pm(x)
    assert y.shape == (2, 6, 10)
    g = x.view(2, 4, 6, 5)
    want = torch.empty(2, 2, 3, 10)
    for i in range(2):
        for j in range(3):  # the reference's x0, x1, x2, x3: (2i,2j), (2i+1,2j), (2i,2j+1), (2i+1,2j+1)
            cat = torch.cat([g[:, 2 * i, 2 * j], g[:, 2 * i + 1, 2 * j], g[:, 2 * i, 2 * j + 1], g[:, 2 * i + 1, 2 * j + 1]], -1)
            want[:, i, j] = F.linear(F.layer_norm(cat, (20,), pm.norm.weight, pm.norm.bias, 1e-5), pm.reduction.weight)
    torch.testing.assert_close(y, want.view(2, 6, 10), rtol=1e-5, atol=1e-5)
    # with a selecting reduction (identity on the first 2C of 4C) and no norm, the output shows the order directly
    pm2 = simmim.PatchMerging((2, 2), 1)
    pm2.norm = nn.Identity()
    with torch.no_grad():
        pm2.reduction.weight.copy_(torch.eye(2, 4))
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])[None]  # (1, 4 tokens (r, c) = (0,0),(0,1),(1,0),(1,1), 1)
    assert pm2(x).tolist() == [[[0.0, 2.0]]]  # x0 = (0,0), then x1 = (1,0), not (0,1)


# --------------------------------------------------------------------------- 5. mask token


def swin_explicit(enc, imgs, mask):
    tok = enc.patch_embed.norm(enc.patch_embed(imgs))  # patch embed includes its LayerNorm
    x = torch.where(mask.flatten(1)[..., None], enc.mask_token, tok)
    for layer in enc.layers:
        x = layer(x)
    x = enc.norm(x)
    gh, gw = enc.patch_embed.grid_size
    return x.transpose(1, 2).reshape(x.shape[0], -1, gh // 8, gw // 8)


def vit_explicit(enc, imgs, mask):
    tok = enc.patch_embed(imgs)
    x = torch.where(mask.flatten(1)[..., None], enc.mask_token, tok)
    x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), x], 1)
    bias = enc.rel_pos_bias()
    for blk in enc.blocks:
        x = blk(x, bias)
    x = enc.norm(x)[:, 1:]
    return x.transpose(1, 2).reshape(x.shape[0], -1, *enc.grid)


@pytest.mark.parametrize('name,explicit', [('tiny', swin_explicit), ('vit_tiny', vit_explicit)])
def test_mask_token_replaces_embedded_patches_first(name, explicit):
    model = build(name, 32).eval()
    enc = model.encoder
    with torch.no_grad():
        enc.mask_token.normal_()  # far from the patch tokens
        if name == 'vit_tiny':
            enc.rel_pos_bias.relative_position_bias_table.normal_()
    imgs, other = images(2), images(2, seed=9)
    mask = mask_for(model)
    full = torch.ones_like(mask)
    none = torch.zeros_like(mask)
    with torch.no_grad():
        out = enc(imgs, mask)
        torch.testing.assert_close(out, explicit(enc, imgs, mask), rtol=1e-5, atol=1e-5)
        # everything masked: the encoder never sees the image
        torch.testing.assert_close(enc(imgs, full), enc(other, full), rtol=0, atol=1e-6)
        # nothing masked: the mask token plays no part
        before = enc(imgs, none)
        enc.mask_token.add_(torch.randn_like(enc.mask_token))  # not a constant: LayerNorms would hide a shift
        assert torch.equal(enc(imgs, none), before)
        assert (enc(imgs, mask) - out).abs().max() > 1e-3  # but it does where tokens are masked
        assert (enc(imgs, none) - enc(other, none)).abs().max() > 1e-3


# --------------------------------------------------------------------------- 6. shapes, gradients


@pytest.mark.parametrize('name,size,mask_patch,feat', [('tiny', (64, 64), 16, (256, 2, 2)),
                                                       ('tiny', (64, 128), 32, (256, 2, 4)),
                                                       ('vit_tiny', (32, 32), 16, (64, 4, 4)),
                                                       ('vit_tiny', (32, 48), 16, (64, 4, 6))])
def test_forward_backward_shapes(name, size, mask_patch, feat):
    model = build(name, size).train()
    H, W = size
    imgs = images(2, H, W)
    mask = mask_for(model, 2, H, W, mask_patch)
    z = model.encoder(imgs, mask)
    assert z.shape == (2, *feat)  # (B, num_features, H/stride, W/stride)
    loss, out = model(imgs, mask)
    assert out['x_rec'].shape == imgs.shape and torch.equal(out['mask'], mask)
    torch.testing.assert_close(loss, ref_loss(imgs, out['x_rec'], mask, model.encoder.patch_embed.patch_size, 3))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.encoder.mask_token.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize('name', ['tiny', 'vit_tiny'])
def test_in_chans_one(name):
    model = build(name, 32, in_chans=1)
    imgs = images(2, C=1)
    mask = mask_for(model)
    loss, out = model(imgs, mask)
    s = model.encoder.stride
    assert out['x_rec'].shape == (2, 1, 32, 32)
    assert model.decoder[0].weight.shape == (s * s, model.encoder.num_features, 1, 1)
    assert model.encoder.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(loss, ref_loss(imgs, out['x_rec'], mask, model.encoder.patch_embed.patch_size, 1))
    loss.backward()
    assert torch.isfinite(model.encoder.patch_embed.proj.weight.grad).all()


# --------------------------------------------------------------------------- 7. init


def test_vit_init():
    torch.manual_seed(0)
    model = simmim.build_model('vit_tiny', (32, 32))
    enc, depth = model.encoder, 4
    for n, m in enc.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):  # every Linear and the patch-embed conv: trunc at +-1 std
            assert m.weight.abs().max() <= 0.02 + 1e-7, n
            if m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), n
    std = TRUNC_1SIGMA_STD * 0.02  # ~0.0108
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in enc.blocks])
    fc1 = torch.cat([b.mlp.fc1.weight.flatten() for b in enc.blocks])
    for w in (qkv, fc1, enc.patch_embed.proj.weight.flatten()):
        assert abs(w.std().item() / std - 1) < 0.05
        assert w.abs().max() > 0.019  # really truncated at 0.02, not at a smaller bound
    # fix_init_weight: proj and fc2 of block l divided by sqrt(2 (l + 1))
    for l, b in enumerate(enc.blocks):
        for w in (b.attn.proj.weight, b.mlp.fc2.weight):
            scale = math.sqrt(2 * (l + 1))
            assert w.abs().max() <= 0.02 / scale + 1e-7
            assert abs(w.std().item() / (std / scale) - 1) < 0.06, (l, w.shape)
    ratio = enc.blocks[0].mlp.fc2.weight.std() / enc.blocks[3].mlp.fc2.weight.std()
    assert abs(ratio.item() - math.sqrt(2 * 4) / math.sqrt(2 * 1)) < 0.08  # = 2
    for b in enc.blocks:
        assert torch.equal(b.gamma_1, torch.full_like(b.gamma_1, 0.1))
        assert torch.equal(b.gamma_2, torch.full_like(b.gamma_2, 0.1))
        assert not b.attn.q_bias.any() and not b.attn.v_bias.any()
        assert b.attn.qkv.bias is None
    assert not enc.rel_pos_bias.relative_position_bias_table.any()
    for t in (enc.cls_token, enc.mask_token):
        assert t.abs().max() <= 0.02 + 1e-7 and t.std() > 0.005  # truncated at +-0.02, not left at zero
    for n, m in enc.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-6 and (m.weight == 1).all() and (m.bias == 0).all(), n
    assert len(enc.blocks) == depth
    dp = simmim.build_model('vit_tiny', (32, 32), drop_path=0.1).encoder
    assert [b.drop_path for b in dp.blocks] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])  # linear in depth


def test_swin_init():
    torch.manual_seed(0)
    wide = simmim.SwinForSimMIM(32, 4, 512, (1,), (8,), 8)  # one wide stage, window 8: enough numbers for stats
    lin = torch.cat([m.weight.flatten() for m in wide.modules() if isinstance(m, nn.Linear)])
    assert abs(lin.std().item() / 0.02 - 1) < 0.02
    frac = (lin.abs() > 0.02).float().mean().item()
    assert abs(frac - 0.3173) < 0.01  # not truncated at 1 std: ~32% beyond it, as for a plain normal
    assert lin.abs().max() > 0.08
    for m in wide.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert not m.bias.any()
    table = wide.layers[0].blocks[0].attn.relative_position_bias_table  # (225, 8)
    assert abs(table.std().item() / 0.02 - 1) < 0.1 and (table.abs() > 0.02).any()
    assert abs(wide.mask_token.std().item() / 0.02 - 1) < 0.12 and wide.mask_token.shape == (1, 1, 512)
    # the patch-embed conv keeps PyTorch's default init: kaiming-uniform with bound 1/sqrt(fan_in)
    model = build('tiny', 32)
    enc = model.encoder
    conv = enc.patch_embed.proj
    bound = 1 / math.sqrt(3 * 4 * 4)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound  # >> 0.02
    assert abs(conv.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert conv.bias.abs().max() <= bound and (conv.bias != 0).all()
    for n, m in enc.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-5 and (m.weight == 1).all() and (m.bias == 0).all(), n


@pytest.mark.parametrize('name', ['tiny', 'vit_tiny'])
def test_decoder_default_init(name):
    model = build(name, 32)
    conv = model.decoder[0]
    nf, s = model.encoder.num_features, model.encoder.stride
    assert conv.weight.shape == (s * s * 3, nf, 1, 1) and isinstance(model.decoder[1], nn.PixelShuffle)
    bound = 1 / math.sqrt(nf)  # nn.Conv2d's reset_parameters
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert abs(conv.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert conv.bias.abs().max() <= bound and (conv.bias != 0).all()


# --------------------------------------------------------------------------- 8. state dict


def swin_reference_keys(depths, grid, window, shifted):
    """SimMIM(SwinTransformerForSimMIM) keys; `shifted(s, j)` says whether block j of stage s has an attn_mask."""
    keys = {'encoder.mask_token', 'encoder.patch_embed.proj.weight', 'encoder.patch_embed.proj.bias',
            'encoder.patch_embed.norm.weight', 'encoder.patch_embed.norm.bias', 'encoder.norm.weight',
            'encoder.norm.bias', 'decoder.0.weight', 'decoder.0.bias'}
    for s, d in enumerate(depths):
        for j in range(d):
            p = f'encoder.layers.{s}.blocks.{j}.'
            keys |= {p + k for k in ('norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias',
                                     'attn.proj.weight', 'attn.proj.bias', 'attn.relative_position_bias_table',
                                     'attn.relative_position_index', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
                                     'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
            if shifted(s, j):
                keys.add(p + 'attn_mask')
        if s < len(depths) - 1:
            keys |= {f'encoder.layers.{s}.downsample.{k}' for k in ('norm.weight', 'norm.bias', 'reduction.weight')}
    return keys


def vit_reference_keys(depth):
    """SimMIM(VisionTransformerForSimMIM) keys with the pretrain config (shared RPB, no APE, no mean pooling)."""
    keys = {'encoder.cls_token', 'encoder.mask_token', 'encoder.patch_embed.proj.weight',
            'encoder.patch_embed.proj.bias', 'encoder.rel_pos_bias.relative_position_bias_table',
            'encoder.rel_pos_bias.relative_position_index', 'encoder.norm.weight', 'encoder.norm.bias',
            'decoder.0.weight', 'decoder.0.bias'}
    for i in range(depth):
        keys |= {f'encoder.blocks.{i}.{k}' for k in (
            'gamma_1', 'gamma_2', 'norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias', 'attn.qkv.weight',
            'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
            'mlp.fc2.weight', 'mlp.fc2.bias')}
    return keys


def test_swin_state_dict_keys_and_shapes():
    sd = build('tiny', 64).state_dict()  # grids 16, 8, 4, 2: odd blocks shifted in stages 0-2
    assert set(sd) == swin_reference_keys((2, 2, 2, 2), 16, 2, lambda s, j: j % 2 == 1 and s < 3)
    assert not any('reduction.bias' in k or 'pos_embed' in k for k in sd)
    shapes = {'encoder.mask_token': (1, 1, 32), 'encoder.patch_embed.proj.weight': (32, 3, 4, 4),
              'encoder.layers.0.blocks.0.attn.qkv.weight': (96, 32),
              'encoder.layers.0.blocks.0.attn.relative_position_bias_table': (9, 1),
              'encoder.layers.0.blocks.0.attn.relative_position_index': (4, 4),
              'encoder.layers.0.blocks.1.attn_mask': (64, 4, 4),  # (nW, N, N) at 16x16 tokens
              'encoder.layers.2.blocks.1.attn_mask': (4, 4, 4),
              'encoder.layers.0.downsample.norm.weight': (128,), 'encoder.layers.0.downsample.reduction.weight': (64, 128),
              'encoder.layers.3.blocks.0.attn.relative_position_bias_table': (9, 8), 'encoder.norm.weight': (256,),
              'decoder.0.weight': (32 * 32 * 3, 256, 1, 1), 'decoder.0.bias': (32 * 32 * 3,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def test_vit_state_dict_keys_and_shapes():
    sd = build('vit_tiny', 32).state_dict()  # patch 8 -> 4x4 grid
    assert set(sd) == vit_reference_keys(4)
    assert not any(k.endswith('qkv.bias') or 'pos_embed' in k for k in sd)
    shapes = {'encoder.cls_token': (1, 1, 64), 'encoder.mask_token': (1, 1, 64),
              'encoder.rel_pos_bias.relative_position_bias_table': (7 * 7 + 3, 4),
              'encoder.rel_pos_bias.relative_position_index': (17, 17), 'encoder.blocks.0.gamma_1': (64,),
              'encoder.blocks.0.attn.q_bias': (64,), 'encoder.blocks.0.attn.qkv.weight': (192, 64),
              'decoder.0.weight': (8 * 8 * 3, 64, 1, 1)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


@pytest.fixture(scope='module')
def base_models():
    """swin_base/192 and vit_base/224, built once (a few seconds)."""
    return simmim.build_model('swin_base', (192, 192)), simmim.build_model('vit_base', (224, 224))


def test_trunc_normal_1sigma_is_the_reference_distribution():
    # the ref cuts Normal(0, .02) at +-1 std; ours samples it by the inverse CDF: same bounds, std, mean, quantiles
    w = simmim.trunc_normal_1sigma(torch.empty(400_000), std=0.02)
    assert w.abs().max() <= 0.02 and abs(w.mean().item()) < 1e-4
    assert w.std().item() == pytest.approx(TRUNC_1SIGMA_STD * 0.02, rel=0.01)
    # the truncated normal's CDF at 0.5 std: (Phi(.5) - Phi(-1)) / (Phi(1) - Phi(-1))
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = (Phi(0.5) - Phi(-1)) / (Phi(1) - Phi(-1))
    assert (w <= 0.01).float().mean().item() == pytest.approx(expected, abs=0.005)


def test_base_models_state_dicts(base_models):
    swin, vit = base_models
    # Swin-B/192, window 6: token grids 48, 24, 12, 6; the last stage fits one window, so it is not shifted
    assert set(swin.state_dict()) == swin_reference_keys((2, 2, 18, 2), 48, 6, lambda s, j: j % 2 == 1 and s < 3)
    assert [(b.ws, b.shift) for b in swin.encoder.layers[0].blocks] == [(6, 0), (6, 3)]
    assert [(b.ws, b.shift) for b in swin.encoder.layers[3].blocks] == [(6, 0), (6, 0)]
    assert swin.decoder[0].weight.shape == (32 * 32 * 3, 1024, 1, 1)
    assert swin.encoder.layers[2].blocks[0].attn.relative_position_bias_table.shape == (121, 16)
    sd = vit.state_dict()
    assert set(sd) == vit_reference_keys(12)
    assert sd['encoder.rel_pos_bias.relative_position_bias_table'].shape == (732, 12)
    assert sd['encoder.rel_pos_bias.relative_position_index'].shape == (197, 197)
    assert sd['decoder.0.weight'].shape == (768, 768, 1, 1)


def test_parameter_counts(base_models):
    swin, vit = base_models
    n_swin = sum(p.numel() for p in swin.encoder.parameters())
    n_vit = sum(p.numel() for p in vit.encoder.parameters())
    assert n_swin == 86_725_304 and n_vit == 85_666_128

    # Swin-B from its architecture: per block 12C^2 + 13C + table x heads, merging 8C^2 + 8C, patch embed + norm
    def swin_b(ws, mask_token):
        n = 3 * 16 * 128 + 128 + 2 * 128 + 2 * 1024 + (128 if mask_token else 0)
        for i, (d, h) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))):
            C = 128 * 2 ** i
            n += d * (12 * C * C + 13 * C + (2 * ws - 1) ** 2 * h) + (8 * C * C + 8 * C if i < 3 else 0)
        return n
    assert swin_b(6, True) == n_swin
    # timm swin_base_patch4_window7_224: 87,768,224 with its 1000-class head (1024 x 1000 + 1000)
    assert swin_b(7, False) == 87_768_224 - 1_025_000
    # ... so ours = timm's without head - the smaller rel-pos tables (13^2 -> 11^2 rows, 376 heads in all) + mask_token
    assert n_swin == 87_768_224 - 1_025_000 - (13 ** 2 - 11 ** 2) * (2 * 4 + 2 * 8 + 18 * 16 + 2 * 32) + 128

    # ViT-B/16 (BEiT-style): per block LN 2x2D, qkv 3D^2 (no bias) + q/v bias 2D, proj D^2+D, MLP 8D^2+5D, gammas 2D
    D = 768
    block = 4 * D + 3 * D * D + 2 * D + D * D + D + 8 * D * D + 5 * D + 2 * D
    assert n_vit == 3 * 16 * 16 * D + D + 2 * D + 732 * 12 + 12 * block + 2 * D
    # timm vit_base_patch16_224 without head (85,798,656): - pos_embed, - fused qkv bias, + q/v bias, + gammas,
    # + mask_token, + shared rel-pos table
    assert n_vit == 85_798_656 - 197 * D - 12 * 3 * D + 12 * 2 * D + 12 * 2 * D + D + 732 * 12


# --------------------------------------------------------------------------- 9. weight decay


def groups_by_name(model):
    """What main() builds: common.param_groups with simmim.no_decay_names, reversed to [decay, no_decay]."""
    groups = common.param_groups(model, 0.05, skip=simmim.no_decay_names(model))[::-1]
    names = {id(p): n for n, p in model.named_parameters()}
    return groups, [{names[id(p)] for p in g['params']} for g in groups]


def test_weight_decay_groups_swin():
    model = build('tiny', 32)
    groups, (decay, no_decay) = groups_by_name(model)
    assert [g['weight_decay'] for g in groups] == [0.05, 0.0]  # ref order [decay, no_decay]
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    assert 'encoder.mask_token' in no_decay  # ref SwinTransformerForSimMIM.no_weight_decay
    assert all(n.endswith('.bias') or n == 'encoder.mask_token' or dict(model.named_parameters())[n].ndim == 1
               for n in no_decay)
    assert {n for n, p in model.named_parameters() if p.ndim == 1} <= no_decay
    assert {'encoder.patch_embed.proj.weight', 'encoder.layers.0.blocks.0.attn.qkv.weight',
            'encoder.layers.0.downsample.reduction.weight', 'decoder.0.weight'} <= decay


def test_swin_rel_pos_tables_are_decayed_like_the_reference():
    # The reference's SimMIM.no_weight_decay_keywords (models/simmim.py) returns {'encoder.' + k} =
    # {'encoder.relative_position_bias_table'}, and optimizer.check_keywords_in_name tests `keyword in name`;
    # that is not a substring of 'encoder.layers.0.blocks.0.attn.relative_position_bias_table', so in pretraining
    # the tables fall into has_decay (weight decay 0.05). (The keyword does work in fine-tuning, where the bare
    # Swin has no 'encoder.' prefix.)
    model = build('tiny', 32)
    _, (decay, no_decay) = groups_by_name(model)
    tables = {n for n, _ in model.named_parameters() if 'relative_position_bias_table' in n}
    assert len(tables) == 8
    ref_keywords = {'encoder.relative_position_bias_table'}  # what the reference's optimizer receives
    assert not any(k in n for k in ref_keywords for n in tables)
    assert tables <= decay, 'reference pretraining decays the Swin rel-pos tables'


def test_weight_decay_groups_vit():
    model = build('vit_tiny', 32)
    groups, (decay, no_decay) = groups_by_name(model)
    assert [g['weight_decay'] for g in groups] == [0.05, 0.0]
    assert decay | no_decay == {n for n, _ in model.named_parameters()} and not decay & no_decay
    assert 'encoder.cls_token' in no_decay  # ref VisionTransformer.no_weight_decay
    # the reference's ViT has no keyword list: the 3-D mask_token and the 2-D shared table ARE decayed
    assert {'encoder.mask_token', 'encoder.rel_pos_bias.relative_position_bias_table'} <= decay
    for i in range(4):
        assert {f'encoder.blocks.{i}.{k}' for k in ('gamma_1', 'gamma_2', 'attn.q_bias', 'attn.v_bias', 'norm1.weight',
                                                    'norm1.bias', 'attn.proj.bias', 'mlp.fc1.bias')} <= no_decay
        assert {f'encoder.blocks.{i}.{k}' for k in ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc2.weight')} <= decay
    assert {'encoder.norm.weight', 'encoder.patch_embed.proj.bias', 'decoder.0.bias'} <= no_decay
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1} | {'encoder.cls_token'}


# --------------------------------------------------------------------------- 10. recipe and schedule


def test_resolve_presets():
    a = simmim.resolve(simmim.Args(data='x', model='swin_base'))
    assert (a.input_size, a.epochs, a.lr_schedule, a.drop_path) == ((192,), 100, 'cosine', 0.0)
    assert (a.blr, a.warmup_lr, a.min_lr, a.warmup_epochs) == (2e-4, 1e-6, 1e-5, 10)
    assert (a.mask_patch_size, a.mask_ratio, a.weight_decay, a.betas, a.clip_grad) == (32, 0.6, 0.05, (0.9, 0.999), 5.0)
    v = simmim.resolve(simmim.Args(data='x', model='vit_base'))
    assert (v.input_size, v.epochs, v.lr_schedule, v.milestones, v.drop_path) == ((224,), 800, 'multistep', (700,), 0.1)
    assert (v.blr, v.warmup_lr) == (1e-4, 5e-7)
    # values given by the user are kept
    u = simmim.resolve(simmim.Args(data='x', model='vit_base', input_size=(96,), epochs=300, blr=3e-4, warmup_lr=0.0,
                                   min_lr=0.0, drop_path=0.0))
    assert (u.input_size, u.epochs, u.lr_schedule, u.blr, u.warmup_lr, u.min_lr, u.drop_path) == \
        ((96,), 300, 'cosine', 3e-4, 0.0, 0.0, 0.0)  # 300 epochs: cosine (multistep is the 800-epoch recipe)
    w = simmim.resolve(simmim.Args(data='x', model='swin_base', lr_schedule='multistep', milestones=(50, 80)))
    assert (w.milestones, w.blr, w.warmup_lr) == ((50, 80), 1e-4, 5e-7)
    assert simmim.resolve(w) == w  # idempotent
    with pytest.raises(SystemExit, match='--model bogus is not one of'):
        simmim.resolve(simmim.Args(data='x', model='bogus'))
    with pytest.raises(SystemExit, match='--lr_schedule'):
        simmim.resolve(simmim.Args(data='x', model='tiny', lr_schedule='linear'))


def ref_lr(step, n_iter, lr, warmup_lr, min_lr, warmup_epochs, epochs, sched, milestones):
    """lr_scheduler.py: timm CosineLRScheduler(t_initial=epochs*n_iter, warmup_prefix False) or the reference's
    MultiStepLRScheduler (bisect_right over milestone steps), both per iteration."""
    warmup_t = warmup_epochs * n_iter
    if step < warmup_t:
        return warmup_lr + step * (lr - warmup_lr) / warmup_t
    if sched == 'multistep':
        return lr * 0.1 ** bisect.bisect_right([m * n_iter for m in milestones], step)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / (epochs * n_iter)))


@pytest.mark.parametrize('model', ['swin_base', 'vit_base'])
def test_lr_at_matches_reference_schedulers(model):
    args = simmim.resolve(simmim.Args(data='x', model=model))
    lr, wlr, mlr = 4 * args.blr, 4 * args.warmup_lr, 4 * args.min_lr  # e.g. 2048 / 512
    n_iter = 10
    for step in list(range(0, 150)) + list(range(6990, 7010)) + [args.epochs * n_iter - 1]:
        got = simmim.lr_at(step / n_iter, lr, wlr, mlr, args)
        want = ref_lr(step, n_iter, lr, wlr, mlr, args.warmup_epochs, args.epochs, args.lr_schedule, args.milestones)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), step


def test_lr_at_landmarks():
    args = simmim.resolve(simmim.Args(data='x', model='swin_base'))
    lr, wlr, mlr = 1.0, 0.005, 0.05
    assert simmim.lr_at(0, lr, wlr, mlr, args) == wlr  # warmup starts at warmup_lr
    assert simmim.lr_at(5, lr, wlr, mlr, args) == pytest.approx((wlr + lr) / 2)
    assert simmim.lr_at(10 - 1e-9, lr, wlr, mlr, args) == pytest.approx(lr)
    # the cosine is indexed from epoch 0 (timm warmup_prefix=False): right after warmup it is already below lr
    at10 = simmim.lr_at(10, lr, wlr, mlr, args)
    assert at10 == pytest.approx(mlr + 0.5 * (lr - mlr) * (1 + math.cos(math.pi * 10 / 100)))
    assert at10 < lr - 0.02
    assert simmim.lr_at(100, lr, wlr, mlr, args) == pytest.approx(mlr)
    xs = [simmim.lr_at(e / 4, lr, wlr, mlr, args) for e in range(40, 400)]
    assert all(a > b for a, b in zip(xs, xs[1:]))
    v = simmim.resolve(simmim.Args(data='x', model='vit_base'))
    assert simmim.lr_at(699.99, lr, wlr, mlr, v) == lr
    assert simmim.lr_at(700, lr, wlr, mlr, v) == pytest.approx(0.1 * lr)  # bisect_right: decayed at 700 itself
    assert simmim.lr_at(799.9, lr, wlr, mlr, v) == pytest.approx(0.1 * lr)
    two = dataclasses.replace(v, milestones=(300, 600))
    assert simmim.lr_at(650, lr, wlr, mlr, two) == pytest.approx(0.01 * lr)


# --------------------------------------------------------------------------- 11. optimisation


@pytest.mark.parametrize('name,factor', [('tiny', 0.4), ('vit_tiny', 0.8)])  # ViT: layer scale 0.1, slower start
def test_adamw_steps_lower_the_loss(name, factor):
    model = build(name, 32).train()
    ds = common.SyntheticImages(8, 32)
    imgs = common.normalize(torch.stack([ds[i][0] for i in range(8)]), common.IMAGENET_MEAN, common.IMAGENET_STD)
    mask = mask_for(model, 8, mask_patch=8)
    groups = common.param_groups(model, 0.05, skip=simmim.no_decay_names(model))[::-1]
    opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.999))
    losses = []
    for _ in range(20):
        loss, _ = model(imgs, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(imgs, mask)[0].item()
    assert all(math.isfinite(v) for v in losses)
    assert final < factor * losses[0], (losses[0], final)


# --------------------------------------------------------------------------- 12. encoder export


@pytest.mark.parametrize('name', ['tiny', 'vit_tiny'])
def test_encoder_state_dict_loads_into_a_fresh_encoder(name):
    model = build(name, 32)
    enc = simmim.encoder_state_dict(model)
    full = model.state_dict()
    assert set(enc) == {k[len('encoder.'):] for k in full if k.startswith('encoder.')}
    assert not any(k.startswith(('encoder.', 'decoder')) for k in enc)
    for k, v in enc.items():
        assert torch.equal(v, full['encoder.' + k])
    fresh = build(name, 32, seed=7).encoder
    assert not torch.equal(fresh.mask_token, model.encoder.mask_token)
    fresh.load_state_dict(enc, strict=True)
    imgs, mask = images(2), mask_for(model)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(imgs, mask), model.encoder.eval()(imgs, mask))


# --------------------------------------------------------------------------- 13. pictures


def test_visualize_keeps_rng_and_mode(tmp_path):
    model = build('tiny', 32).train()
    args = simmim.Args(data='x', mask_patch_size=8)
    imgs = images(3)
    state = torch.get_rng_state()
    simmim.visualize(model, imgs, args, tmp_path / 'a.png')
    assert torch.equal(torch.get_rng_state(), state)  # the training masks' RNG is untouched
    assert model.training
    simmim.visualize(model.eval(), imgs, args, tmp_path / 'b.png')
    assert not model.training
    assert (tmp_path / 'a.png').read_bytes() == (tmp_path / 'b.png').read_bytes()  # fixed mask and batch
