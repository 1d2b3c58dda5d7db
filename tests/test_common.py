"""Tests of common.py, the shared substrate: patches, positions, ViT layers, data, optimisation, checkpoints,
command line and pictures. CPU only, tiny tensors, images written to tmp_path."""
import argparse
import dataclasses
import json
import math
import sys
import time
import random
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin

import common
from common import (Attention, Block, EpochSampler, ImageFiles, PatchEmbed, RelativePositionBias, SyntheticImages,
                    cosine_lr, drop_path, load_checkpoint, load_weights, normalize, optimizer_step, pair,
                    param_groups, parse_args, patchify, random_resized_crop_params, save_checkpoint, save_grid,
                    save_loss_curve, sincos_1d, sincos_2d, unpatchify)


# =========================================================================== patches


@pytest.mark.parametrize('C', [3, 1])
def test_patchify_unpatchify_roundtrip_non_square_image(C):
    imgs = torch.randn(2, C, 16, 24)
    x = patchify(imgs, 8)
    assert x.shape == (2, 2 * 3, 8 * 8 * C)
    assert torch.equal(unpatchify(x, 8, 2, 3, C=C), imgs)


@pytest.mark.parametrize('C', [3, 1])
def test_patchify_patch_order_row_major_channel_last(C):
    p, imgs = 8, torch.randn(2, C, 16, 24)
    gh, gw = 2, 3
    x = patchify(imgs, p)
    for b in range(2):
        for i in range(gh):
            for j in range(gw):
                expect = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                assert torch.equal(x[b, i * gw + j], expect), (b, i, j)


def test_patchify_matches_mae_einsum():
    """MAE: reshape (B,3,h,p,w,p) -> einsum 'nchpwq->nhwpqc' -> (B, h*w, p*p*3)."""
    imgs, p = torch.randn(2, 3, 16, 24), 4
    ref = torch.einsum('nchpwq->nhwpqc', imgs.reshape(2, 3, 4, p, 6, p)).reshape(2, 24, p * p * 3)
    assert torch.equal(patchify(imgs, p), ref)


def test_patchify_unpatchify_roundtrip_video_tubelets():
    video = torch.randn(2, 3, 4, 16, 24)  # (B, C, T, H, W)
    x = patchify(video, 8, t=2)
    assert x.shape == (2, 2 * 2 * 3, 2 * 8 * 8 * 3)
    assert torch.equal(unpatchify(x, 8, 2, 3, C=3, t=2, T=4), video)


def test_patchify_video_token_order_t_h_w():
    B, C, T, H, W, p, t = 2, 3, 4, 16, 24, 8, 2
    video = torch.randn(B, C, T, H, W)
    gh, gw = H // p, W // p
    x = patchify(video, p, t=t)
    for b in range(B):
        for ti in range(T // t):
            for i in range(gh):
                for j in range(gw):
                    cube = video[b, :, ti * t:(ti + 1) * t, i * p:(i + 1) * p, j * p:(j + 1) * p]
                    assert torch.equal(x[b, (ti * gh + i) * gw + j], cube.permute(1, 2, 3, 0).reshape(-1))


@pytest.mark.parametrize('tubelet', [0, 2])
def test_patch_embed_equals_linear_on_patchify(tubelet):
    """The conv patch embedding is a Linear applied to the patchified tokens in the same (t, h, w) order."""
    torch.manual_seed(0)
    p, D = 4, 5
    pe = PatchEmbed((8, 12), p, 3, D, tubelet=tubelet)
    assert pe.grid_size == (2, 3) and pe.num_patches == 6
    if tubelet:
        x = torch.randn(2, 3, 4, 8, 12)
        w = pe.proj.weight.permute(0, 2, 3, 4, 1).reshape(D, -1)  # (D, t*p*p*C), channel last
        tokens = patchify(x, p, t=tubelet)
    else:
        x = torch.randn(2, 3, 8, 12)
        w = pe.proj.weight.permute(0, 2, 3, 1).reshape(D, -1)  # (D, p*p*C)
        tokens = patchify(x, p)
    torch.testing.assert_close(pe(x), tokens @ w.T + pe.proj.bias, atol=1e-5, rtol=1e-5)


def test_patch_embed_rejects_indivisible_size():
    with pytest.raises(ValueError):
        PatchEmbed((16, 20), 8, 3, 4)


def test_pair():
    assert pair(224) == (224, 224)
    assert pair((224,)) == (224, 224)
    assert pair((24, 32)) == (24, 32)
    assert pair([24, 32]) == (24, 32)


# =========================================================================== sin-cos positions


def _np_1d_sincos(embed_dim, pos):
    """MAE's get_1d_sincos_pos_embed_from_grid."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _np_2d_sincos(embed_dim, grid_size, cls_token=False):
    """MAE's get_2d_sincos_pos_embed (square grid), written from the reference."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first ('xy')
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb_h = _np_1d_sincos(embed_dim // 2, grid[0])  # grid[0][i, j] = j: the column
    emb_w = _np_1d_sincos(embed_dim // 2, grid[1])  # grid[1][i, j] = i: the row
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def test_sincos_1d_values_by_hand():
    # dim 4: omega = [1, 1/100]; columns = [sin(p), sin(p/100), cos(p), cos(p/100)]
    got = sincos_1d(4, torch.tensor([0.0, 1.0, 2.0]))
    expect = torch.tensor([[0.0, 0.0, 1.0, 1.0],
                           [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
                           [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]])
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, atol=1e-7, rtol=0)
    # dim 8: omega_k = 1 / 10000^(k/4)
    got = sincos_1d(8, torch.tensor([3.0]))[0]
    om = [1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75]
    expect = torch.tensor([math.sin(3 * o) for o in om] + [math.cos(3 * o) for o in om])
    torch.testing.assert_close(got, expect, atol=1e-7, rtol=0)


@pytest.mark.parametrize('dim,grid', [(32, 4), (64, 14), (16, 3)])
def test_sincos_2d_matches_mae_reference_square(dim, grid):
    ref = torch.from_numpy(_np_2d_sincos(dim, grid, cls_token=True)).float()
    got = sincos_2d(dim, grid, grid, cls_token=True)
    assert got.shape == (grid * grid + 1, dim)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.equal(got[0], torch.zeros(dim))  # cls row all zeros
    torch.testing.assert_close(sincos_2d(dim, grid, grid), ref[1:], atol=1e-6, rtol=0)


def test_sincos_2d_non_square_first_half_column_second_half_row():
    gh, gw, dim = 3, 5, 16
    table = sincos_2d(dim, gh, gw)
    assert table.shape == (gh * gw, dim)
    for i in range(gh):
        for j in range(gw):
            tok = table[i * gw + j]
            torch.testing.assert_close(tok[:dim // 2], sincos_1d(dim // 2, torch.tensor([float(j)]))[0])
            torch.testing.assert_close(tok[dim // 2:], sincos_1d(dim // 2, torch.tensor([float(i)]))[0])
    # the test above does discriminate: the transposed table (a gw x gh grid read row-major) is different
    transposed = sincos_2d(dim, gw, gh)
    assert not torch.allclose(table, transposed)
    # generalised numpy reference (meshgrid(w, h) 'xy' with a (gh, gw) grid) agrees
    gx, gy = np.meshgrid(np.arange(gw), np.arange(gh))  # each (gh, gw)
    ref = np.concatenate([_np_1d_sincos(dim // 2, gx), _np_1d_sincos(dim // 2, gy)], axis=1)
    torch.testing.assert_close(table, torch.from_numpy(ref).float(), atol=1e-6, rtol=0)


def test_sincos_2d_non_square_cls():
    table = sincos_2d(8, 2, 3, cls_token=True)
    assert table.shape == (7, 8)
    assert torch.equal(table[0], torch.zeros(8))
    torch.testing.assert_close(table[1:], sincos_2d(8, 2, 3))


# =========================================================================== attention and blocks


def _split_heads(t, heads):
    B, N, D = t.shape
    return t.reshape(B, N, heads, D // heads).transpose(1, 2)


def _manual_attention(attn, x, qkv_b, bias=None):
    B, N, D = x.shape
    H = attn.num_heads
    W = attn.qkv.weight
    q, k, v = (_split_heads(x @ W[i * D:(i + 1) * D].T + qkv_b[i * D:(i + 1) * D], H) for i in range(3))
    s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    if bias is not None:
        s = s + bias
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
    return o @ attn.proj.weight.T + attn.proj.bias


def test_attention_qkv_bias_equals_manual_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 4, qkv_bias=True)
    with torch.no_grad():
        attn.qkv.bias.normal_()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), _manual_attention(attn, x, attn.qkv.bias), atol=1e-5, rtol=1e-5)
    assert set(attn.state_dict()) == {'qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'}


def test_attention_without_bias():
    torch.manual_seed(0)
    attn = Attention(16, 2, qkv_bias=False)
    assert attn.qkv.bias is None and attn.q_bias is None
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(attn(x), _manual_attention(attn, x, torch.zeros(48)), atol=1e-5, rtol=1e-5)


def test_attention_qv_bias_zero_k_bias(monkeypatch):
    torch.manual_seed(0)
    D, H = 16, 4
    attn = Attention(D, H, qkv_bias=True, qv_bias=True)
    assert set(attn.state_dict()) == {'qkv.weight', 'q_bias', 'v_bias', 'proj.weight', 'proj.bias'}
    assert attn.qkv.bias is None
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 5, D)

    seen = {}
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', spy)
    out = attn(x)
    W = attn.qkv.weight
    torch.testing.assert_close(seen['q'], _split_heads(x @ W[:D].T + attn.q_bias, H))
    torch.testing.assert_close(seen['k'], _split_heads(x @ W[D:2 * D].T, H))  # no k bias
    torch.testing.assert_close(seen['v'], _split_heads(x @ W[2 * D:].T + attn.v_bias, H))
    zero_k = torch.cat([attn.q_bias, torch.zeros(D), attn.v_bias])
    torch.testing.assert_close(out, _manual_attention(attn, x, zero_k), atol=1e-5, rtol=1e-5)
    # a k bias only shifts each query's scores by a constant: the output would not change with one
    some_k = torch.cat([attn.q_bias, torch.randn(D), attn.v_bias])
    torch.testing.assert_close(out, _manual_attention(attn, x, some_k), atol=1e-5, rtol=1e-5)


def test_attention_additive_bias_and_minus_inf_mask():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 6, 16)
    bias = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(attn(x, bias), _manual_attention(attn, x, attn.qkv.bias, bias), atol=1e-5,
                               rtol=1e-5)

    masked, keep = [2, 4], [0, 1, 3, 5]
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., masked] = float('-inf')
    out = attn(x, mask)
    x2 = x.clone()
    x2[:, masked] = torch.randn(2, 2, 16) * 10
    out2 = attn(x2, mask)
    torch.testing.assert_close(out[:, keep], out2[:, keep], atol=1e-6, rtol=1e-6)
    # equivalently: the kept queries see exactly the attention over the kept tokens alone
    torch.testing.assert_close(out[:, keep], attn(x[:, keep]), atol=1e-5, rtol=1e-5)


def _timm_block_keys(qkv_bias_key=True):
    keys = {'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias',
            'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'}
    return keys | ({'attn.qkv.bias'} if qkv_bias_key else set())


def test_block_state_dict_keys_match_timm():
    assert set(Block(16, 4).state_dict()) == _timm_block_keys()
    assert set(Block(16, 4, qv_bias=True).state_dict()) == _timm_block_keys(False) | {'attn.q_bias', 'attn.v_bias'}
    assert set(Block(16, 4, init_values=0.1).state_dict()) == _timm_block_keys() | {'gamma_1', 'gamma_2'}
    assert Block(16, 4, mlp_ratio=4.0).mlp.fc1.weight.shape == (64, 16)


def test_block_layer_scale_only_with_init_values():
    b = Block(16, 4)
    assert b.gamma_1 is None and b.gamma_2 is None
    assert not any('gamma' in n for n, _ in b.named_parameters())
    b = Block(16, 4, init_values=0.1)
    assert torch.equal(b.gamma_1, torch.full((16,), 0.1)) and torch.equal(b.gamma_2, torch.full((16,), 0.1))
    assert {'gamma_1', 'gamma_2'} <= {n for n, _ in b.named_parameters()}


@pytest.mark.parametrize('init_values', [0.0, 0.3])
def test_block_forward_is_pre_norm_residual(init_values):
    torch.manual_seed(0)
    D = 16
    b = Block(D, 4, init_values=init_values).eval()
    with torch.no_grad():
        for prm in b.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    x = torch.randn(2, 5, D)
    bias = torch.randn(1, 4, 5, 5)
    g1 = b.gamma_1 if init_values else 1.0
    g2 = b.gamma_2 if init_values else 1.0
    ln = lambda t, m: F.layer_norm(t, (D,), m.weight, m.bias, eps=1e-6)  # noqa: E731
    y = x + g1 * _manual_attention(b.attn, ln(x, b.norm1), b.attn.qkv.bias, bias)
    mlp = lambda t: F.gelu(t @ b.mlp.fc1.weight.T + b.mlp.fc1.bias) @ b.mlp.fc2.weight.T + b.mlp.fc2.bias  # noqa
    y = y + g2 * mlp(ln(y, b.norm2))
    torch.testing.assert_close(b(x, bias), y, atol=1e-5, rtol=1e-5)
    assert b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6


def test_drop_path_identity_in_eval_and_when_zero():
    x = torch.randn(8, 3, 4)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)
    torch.manual_seed(0)
    b = Block(8, 2, drop_path=0.9).eval()
    y = torch.randn(4, 3, 8)
    torch.testing.assert_close(b(y), b(y))  # deterministic in eval


def test_drop_path_per_sample_zero_or_rescaled():
    torch.manual_seed(0)
    p = 0.25
    x = torch.rand(400, 3, 4) + 0.5
    y = drop_path(x, p, training=True)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / (1 - p)).flatten(1).all(1)
    assert bool((dropped ^ kept).all())  # every sample is either wholly dropped or wholly kept and rescaled
    assert 0.15 < dropped.float().mean().item() < 0.35
    # unbiased on average
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.1


# =========================================================================== relative position bias


def test_relative_position_bias_table_and_index():
    gh, gw, heads = 2, 3, 4
    rpb = RelativePositionBias((gh, gw), heads)
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    assert rpb.relative_position_bias_table.shape == (n_rel + 3, heads)
    assert torch.equal(rpb.relative_position_bias_table, torch.zeros(n_rel + 3, heads))
    idx = rpb.relative_position_index
    N = gh * gw
    assert idx.shape == (N + 1, N + 1)
    assert 'relative_position_index' in rpb.state_dict()
    for a in range(N):
        i1, j1 = divmod(a, gw)
        for b in range(N):
            i2, j2 = divmod(b, gw)
            assert idx[1 + a, 1 + b] == (i1 - i2 + gh - 1) * (2 * gw - 1) + (j1 - j2 + gw - 1), (a, b)
    assert bool((idx[0, 1:] == n_rel).all())
    assert bool((idx[1:, 0] == n_rel + 1).all())
    assert idx[0, 0] == n_rel + 2
    assert int(idx.max()) == n_rel + 2 and int(idx[1:, 1:].max()) == n_rel - 1
    assert bool((idx[1:, 1:].diagonal() == (gh - 1) * (2 * gw - 1) + gw - 1).all())  # zero offset


def test_relative_position_bias_forward_picks_table_rows():
    gh, gw, heads = 3, 2, 3
    rpb = RelativePositionBias((gh, gw), heads)
    with torch.no_grad():
        rpb.relative_position_bias_table.copy_(torch.randn_like(rpb.relative_position_bias_table))
    out = rpb()
    N = gh * gw
    assert out.shape == (1, heads, N + 1, N + 1)
    table, idx = rpb.relative_position_bias_table, rpb.relative_position_index
    for h in range(heads):
        for q in range(N + 1):
            for k in range(N + 1):
                assert out[0, h, q, k] == table[idx[q, k], h]


# =========================================================================== random resized crop


def _torchvision_rrc(W, H, scale, ratio, rng):
    """torchvision RandomResizedCrop.get_params, with python's random in place of torch's draws."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= W and 0 < h <= H:
            i = rng.randint(0, H - h)
            j = rng.randint(0, W - w)
            return i, j, h, w
    in_ratio = float(W) / float(H)
    if in_ratio < min(ratio):
        w = W
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = H
        w = int(round(h * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


@pytest.mark.parametrize('W,H,scale', [(64, 48, (0.08, 1.0)), (640, 480, (0.2, 1.0)), (200, 20, (0.5, 1.0)),
                                       (30, 90, (0.3, 1.0))])
def test_random_resized_crop_matches_torchvision_algorithm(W, H, scale):
    ratio = (3 / 4, 4 / 3)
    for seed in range(25):
        r1, r2 = random.Random(seed), random.Random(seed)
        assert random_resized_crop_params(W, H, scale, ratio, r1) == _torchvision_rrc(W, H, scale, ratio, r2)
        assert r1.random() == r2.random()  # the same number of draws was taken


def test_random_resized_crop_invariants():
    W, H, scale, ratio = 640, 480, (0.2, 1.0), (3 / 4, 4 / 3)
    for seed in range(200):
        top, left, h, w = random_resized_crop_params(W, H, scale, ratio, random.Random(seed))
        assert 0 < h and 0 < w and 0 <= top and top + h <= H and 0 <= left and left + w <= W
        # w = round(sqrt(A r)), h = round(sqrt(A / r)): bounds up to rounding
        assert (w - 0.5) * (h - 0.5) <= W * H * scale[1] + 1e-6
        assert (w + 0.5) * (h + 0.5) >= W * H * scale[0] - 1e-6
        assert (w + 0.5) / (h - 0.5) >= ratio[0] and (w - 0.5) / (h + 0.5) <= ratio[1]


@pytest.mark.parametrize('W,H,expect', [(100, 20, (0, 36, 20, 27)),   # too wide: clamp to 4/3
                                        (20, 100, (36, 0, 27, 20)),   # too tall: clamp to 3/4
                                        (50, 40, (0, 0, 40, 50))])    # in range: the whole image
def test_random_resized_crop_fallback_centre_crop(W, H, expect):
    rng = random.Random(0)
    assert random_resized_crop_params(W, H, (2.0, 2.0), (3 / 4, 4 / 3), rng) == expect
    ref = random.Random(0)
    for _ in range(20):  # 10 tries of 2 draws each, then no more draws
        ref.uniform(0, 1)
    assert rng.random() == ref.random()


# =========================================================================== ImageFiles


def _const(mode, size, color):
    return Image.new(mode, size, color)


def _jpeg_bytes(img, **kw):
    import io
    buf = io.BytesIO()
    img.save(buf, 'JPEG', **kw)
    return buf.getvalue()


def _make_kinds_folder(root):
    """Class folders 'zebra' and 'ant' (created in that order) with one constant-colour image per kind.
    Returns {file name: (class name, expected RGB after conversion, tolerance)}."""
    ant, zebra = root / 'ant', root / 'zebra'
    zebra.mkdir(parents=True)
    ant.mkdir(parents=True)
    spec = {}

    def put(folder, name, img, rgb, tol, **kw):
        img.save(folder / name, **kw)
        spec[name] = (folder.name, rgb, tol)

    put(ant, 'rgb.jpg', _const('RGB', (40, 30), (200, 30, 60)), (200, 30, 60), 4, quality=95)
    put(ant, 'rgb.png', _const('RGB', (33, 50), (10, 220, 40)), (10, 220, 40), 1)
    put(ant, 'rgb.bmp', _const('RGB', (20, 20), (50, 60, 70)), (50, 60, 70), 1)
    put(ant, 'rgb.webp', _const('RGB', (24, 36), (90, 100, 110)), (90, 100, 110), 1, lossless=True)
    put(ant, 'rgb.tif', _const('RGB', (30, 30), (120, 130, 140)), (120, 130, 140), 1)
    put(ant, 'UPPER.JPG', _const('RGB', (36, 24), (30, 140, 230)), (30, 140, 230), 4, quality=95)
    put(zebra, 'gray.png', _const('L', (30, 20), 77), (77, 77, 77), 1)
    put(zebra, 'la.png', _const('LA', (30, 20), (150, 0)), (150, 150, 150), 1)
    put(zebra, 'rgba.png', _const('RGBA', (30, 20), (10, 20, 30, 128)), (10, 20, 30), 1)
    pal = Image.new('P', (30, 20), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    put(zebra, 'pal.png', pal, (255, 0, 0), 1, transparency=0)
    put(zebra, 'cmyk.jpg', _const('CMYK', (30, 20), (0, 255, 255, 0)), (255, 0, 0), 6, quality=95)
    put(zebra, 'deep16.png', Image.fromarray(np.full((20, 30), 65535, np.uint16)), (255, 255, 255), 0)
    put(zebra, 'mid16.png', Image.fromarray(np.full((20, 30), 32896, np.uint16)), (128, 128, 128), 1)
    (zebra / 'notes.txt').write_text('not an image')
    return spec


@pytest.fixture
def kinds_folder(tmp_path):
    root = tmp_path / 'kinds'
    return root, _make_kinds_folder(root)


def test_saved_kinds_have_the_modes_we_think(kinds_folder):
    root, spec = kinds_folder
    modes = {n: Image.open(root / c / n).mode for n, (c, _, _) in spec.items()}
    assert modes['deep16.png'].startswith('I') and modes['mid16.png'].startswith('I')
    assert modes['cmyk.jpg'] == 'CMYK' and modes['pal.png'] == 'P' and modes['la.png'] == 'LA'
    assert modes['rgba.png'] == 'RGBA' and modes['gray.png'] == 'L'


@pytest.mark.parametrize('size', [16, (24, 32)])
def test_image_files_every_mode_to_rgb_uint8(kinds_folder, size):
    root, spec = kinds_folder
    ds = ImageFiles(root, size)
    H, W = pair(size)
    assert len(ds) == len(spec)  # notes.txt ignored
    names = sorted(spec, key=lambda n: str(root / spec[n][0] / n))
    for i in range(len(ds)):
        x, label, bad = ds[(0, i)]
        name = names[i]
        cls, rgb, tol = spec[name]
        assert x.dtype == torch.uint8 and x.shape == (3, H, W), name
        assert bad == -1
        assert label == {'ant': 0, 'zebra': 1}[cls], name
        diff = (x.int() - torch.tensor(rgb)[:, None, None]).abs().max().item()
        assert diff <= tol, (name, x[:, 0, 0].tolist(), rgb)


def test_image_files_16_bit_scaled_not_clipped(tmp_path):
    for value, expect in [(65535, 255), (32896, 128), (257 * 10, 10)]:
        d = tmp_path / str(value)
        d.mkdir()
        Image.fromarray(np.full((20, 30), value, np.uint16)).save(d / 'a.png')
        x = ImageFiles(d, 8)[0][0]
        assert x.shape == (3, 8, 8)
        assert (x.int() - expect).abs().max().item() <= 1, (value, x.unique())


def test_image_files_in_chans_1(kinds_folder):
    root, spec = kinds_folder
    ds = ImageFiles(root, (24, 32), in_chans=1)
    names = sorted(spec, key=lambda n: str(root / spec[n][0] / n))
    for i in range(len(ds)):
        x, _, _ = ds[(0, i)]
        assert x.dtype == torch.uint8 and x.shape == (1, 24, 32)
        r, g, b = spec[names[i]][1]
        grey = 0.299 * r + 0.587 * g + 0.114 * b
        assert (x.float() - grey).abs().max().item() <= spec[names[i]][2] + 2, (names[i], x.unique(), grey)


def test_image_files_palette_with_alpha_bytes_goes_through_rgba(tmp_path):
    """PIL warns when a palette image whose transparency is per-entry alpha bytes is converted straight to RGB."""
    pal = Image.new('P', (20, 20), 1)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(tmp_path / 'p.png', transparency=bytes([0, 128] + [255] * 254))
    assert isinstance(Image.open(tmp_path / 'p.png').info['transparency'], bytes)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        x = ImageFiles(tmp_path, 8)[0][0]
    assert torch.equal(x, torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))


def test_image_files_flat_folder_labels_zero(tmp_path):
    for k, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        _const('RGB', (20, 20), c).save(tmp_path / f'{k}.png')
    ds = ImageFiles(tmp_path, 8)
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [0, 0, 0]


def test_image_files_uses_train_subfolder(tmp_path):
    (tmp_path / 'train' / 'cls').mkdir(parents=True)
    (tmp_path / 'val').mkdir()
    _const('RGB', (20, 20), (255, 0, 0)).save(tmp_path / 'train' / 'cls' / 'a.png')
    _const('RGB', (20, 20), (0, 0, 255)).save(tmp_path / 'val' / 'b.png')
    _const('RGB', (20, 20), (0, 0, 255)).save(tmp_path / 'val' / 'c.png')
    ds = ImageFiles(tmp_path, 8)
    assert len(ds) == 1
    x, label, _ = ds[0]
    assert torch.equal(x, torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    assert label == 0


def test_image_files_missing_and_empty_folder_exit(tmp_path):
    missing = tmp_path / 'nope'
    with pytest.raises(SystemExit) as e:
        ImageFiles(missing, 8)
    assert str(missing) in str(e.value.code)
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'sub' / 'readme.txt').write_text('x')
    with pytest.raises(SystemExit) as e:
        ImageFiles(empty, 8)
    assert str(empty) in str(e.value.code)


def test_image_files_skips_unreadable_files(tmp_path, capsys):
    good_a, good_e = (255, 0, 0), (0, 0, 255)
    _const('RGB', (20, 20), good_a).save(tmp_path / 'a_good.png')
    (tmp_path / 'b_corrupt.jpg').write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    full = _jpeg_bytes(noise, quality=90)
    (tmp_path / 'c_truncated.jpg').write_bytes(full[:len(full) // 2])
    (tmp_path / 'd_empty.png').write_bytes(b'')
    _const('RGB', (20, 20), good_e).save(tmp_path / 'e_good.png')
    (tmp_path / 'f_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 50)
    ds = ImageFiles(tmp_path, 8)
    assert len(ds) == 6
    capsys.readouterr()

    def colour(x):
        return tuple(x[:, 0, 0].tolist())

    x, _, bad = ds[(0, 0)]
    assert bad == -1 and colour(x) == good_a
    assert capsys.readouterr().err == ''
    # the keyed file's own index comes back (each bad file is counted once, by its own item); a warning once per file
    for idx, new_warnings in [(1, 3), (2, 0), (3, 0), (1, 0)]:
        x, label, bad = ds[(0, idx)]
        assert bad == idx and colour(x) == good_e and x.shape == (3, 8, 8) and label == 0
        err = capsys.readouterr().err
        assert err.count('warning') == new_warnings, err
        assert new_warnings == 0 or 'd_empty.png' in err
    # the last file is bad: wraps round to the first one
    x, _, bad = ds[(0, 5)]
    assert bad == 5 and colour(x) == good_a
    assert 'f_corrupt.png' in capsys.readouterr().err
    # the substitute is the same item as reading the good file directly
    assert torch.equal(ds[(3, 1)][0], ds[(3, 4)][0])


def _coordinate_image(W=256, H=192):
    """R = x, G = y, B = 0: a pixel's value says where it came from."""
    y, x = np.mgrid[0:H, 0:W]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_image_files_crop_geometry_and_flip(tmp_path):
    _coordinate_image().save(tmp_path / 'coords.png')
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    out_h, out_w = 24, 32
    ds = ImageFiles(tmp_path, (out_h, out_w), scale=scale, ratio=ratio, interpolation='bilinear', flip=False)
    for epoch in range(20):
        x = ds[(epoch, 0)][0].float()
        R, G = x[0], x[1]
        assert bool((R[:, 1:] > R[:, :-1]).all()) and bool((G[1:] > G[:-1]).all())  # not flipped, not transposed
        assert (R.std(0).max() < 1) and (G.std(1).max() < 1)  # R depends on the column only, G on the row only
        w = (R[0, -1] - R[0, 0]).item() * out_w / (out_w - 1)  # crop size in source pixels
        h = (G[-1, 0] - G[0, 0]).item() * out_h / (out_h - 1)
        assert scale[0] * 0.95 <= w * h / (256 * 192) <= scale[1] * 1.05, (w, h)
        assert ratio[0] * 0.95 <= w / h <= ratio[1] * 1.05, (w, h)
        assert R.min() >= 0 and G.min() >= 0 and R.max() <= 255 and G.max() <= 191

    flips = 0
    ds = ImageFiles(tmp_path, (out_h, out_w), scale=scale, ratio=ratio, interpolation='bilinear', flip=True)
    for epoch in range(40):
        R = ds[(epoch, 0)][0][0].float()
        flips += bool((R[:, 1:] < R[:, :-1]).all())
    assert 8 <= flips <= 32


def test_image_files_whole_image_crop_equals_pil_resize(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    img.save(tmp_path / 'a.png')
    ds = ImageFiles(tmp_path, (24, 32), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip=False)
    ref = np.asarray(img.resize((32, 24), Image.BICUBIC, box=(0, 0, 40, 30)))
    assert torch.equal(ds[(0, 0)][0], torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_image_files_augmentation_pure_function_of_seed_epoch_index(tmp_path):
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            tmp_path / f'{k}.png')
    ds = ImageFiles(tmp_path, 16)
    a = ds[(3, 1)][0]
    assert torch.equal(a, ds[(3, 1)][0])
    assert torch.equal(a, ImageFiles(tmp_path, 16)[(3, 1)][0])  # a fresh dataset: same crop
    assert any(not torch.equal(a, ds[(e, 1)][0]) for e in range(4, 9))  # other epochs: other crops
    assert any(not torch.equal(a, ImageFiles(tmp_path, 16, seed=s)[(3, 1)][0]) for s in range(1, 6))
    assert torch.equal(ds[1][0], ds[(0, 1)][0])  # a bare index means epoch 0


def test_image_files_jpeg_draft_close_to_full_decode(tmp_path, monkeypatch):
    W0, H0 = 1600, 1200
    y, x = np.mgrid[0:H0, 0:W0].astype(np.float64)
    img = np.stack([255 * x / W0, 255 * y / H0, 128 + 100 * np.sin(x / 90) * np.cos(y / 70)], -1)
    img[300:700, 400:900] = (220, 40, 90)
    Image.fromarray(img.round().astype(np.uint8)).save(tmp_path / 'big.jpg', quality=90)

    sizes = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = draft(self, mode, size)
        sizes.append(self.size)
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', spy)
    ds = ImageFiles(tmp_path, 32, flip=False)
    fast = [ds[(e, 0)][0] for e in range(4)]
    assert sizes and all(s[0] < W0 and s[1] < H0 for s in sizes)  # the draft really decoded at reduced size

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', lambda self, mode, size: None)
    full = [ds[(e, 0)][0] for e in range(4)]
    for a, b in zip(fast, full):
        assert a.shape == b.shape == (3, 32, 32)
        assert (a.float() - b.float()).abs().mean().item() < 4  # measured ~0.2


# =========================================================================== synthetic images


def test_synthetic_images():
    ds = SyntheticImages(30, (24, 40))
    assert len(ds) == 30
    labels = set()
    for i in range(30):
        x, label, bad = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 24, 40) and bad == -1
        assert x.float().std() > 5  # not constant
        assert label in (0, 1, 2)
        labels.add(label)
    assert len(labels) >= 2
    assert torch.equal(ds[5][0], ds[5][0]) and ds[5][1] == ds[5][1]
    assert torch.equal(ds[5][0], ds[(7, 5)][0])  # deterministic per index, whatever the epoch
    assert torch.equal(ds[5][0], SyntheticImages(30, (24, 40))[5][0])
    assert not torch.equal(ds[5][0], ds[6][0])
    assert not torch.equal(ds[5][0], SyntheticImages(30, (24, 40), seed=1)[5][0])
    g = SyntheticImages(4, 16, in_chans=1)[2][0]
    assert g.dtype == torch.uint8 and g.shape == (1, 16, 16) and g.float().std() > 1


# =========================================================================== sampler


@pytest.mark.parametrize('world', [1, 2, 3])
def test_epoch_sampler_shards_disjoint(world):
    n = 23
    shards = []
    for rank in range(world):
        s = EpochSampler(n, rank, world, seed=0)
        s.set_epoch(4)
        items = list(s)
        assert len(items) == len(s) == n // world
        assert all(isinstance(k, tuple) and len(k) == 2 and k[0] == 4 for k in items)
        shards.append([i for _, i in items])
    union = [i for sh in shards for i in sh]
    assert len(set(union)) == len(union) == world * (n // world)  # disjoint
    assert set(union) <= set(range(n))


def test_epoch_sampler_epochs_and_skip():
    def order(epoch, rank=0, world=2, skip=0, seed=0):
        s = EpochSampler(20, rank, world, seed=seed)
        s.set_epoch(epoch, skip)
        return [i for _, i in s]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1) + order(1, rank=1)) == sorted(order(2) + order(2, rank=1))  # same set, new order
    assert order(1) != order(1, seed=5)
    full = order(3, rank=1)
    assert order(3, rank=1, skip=4) == full[4:]
    s = EpochSampler(20, 1, 2, seed=0)
    s.set_epoch(3, skip=4)
    assert len(s) == 10 - 4 and [k for k, _ in s] == [3] * 6
    assert sorted(order(0, world=1)) == list(range(20))
    assert [i for _, i in EpochSampler(6, 0, 1, 0, shuffle=False)] == list(range(6))


# =========================================================================== schedule and parameter groups


def test_cosine_lr():
    lr, mn, wu, ep = 1.0, 0.1, 5, 25
    assert cosine_lr(0, lr, mn, wu, ep) == 0
    assert cosine_lr(2.5, lr, mn, wu, ep) == pytest.approx(0.5)
    assert cosine_lr(1, lr, mn, wu, ep) == pytest.approx(0.2)
    assert cosine_lr(wu, lr, mn, wu, ep) == pytest.approx(lr)
    assert cosine_lr(wu + (ep - wu) / 2, lr, mn, wu, ep) == pytest.approx((lr + mn) / 2)
    assert cosine_lr(ep, lr, mn, wu, ep) == pytest.approx(mn)
    vals = [cosine_lr(e, lr, mn, wu, ep) for e in np.linspace(wu, ep, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert cosine_lr(10, lr, mn, wu, ep) == pytest.approx(mn + (lr - mn) * 0.5 * (1 + math.cos(math.pi * 5 / 20)))
    # warmup from warmup_lr (VideoMAE, SimMIM): linear from it to lr, the cosine part unchanged
    assert cosine_lr(0, lr, mn, wu, ep, warmup_lr=0.1) == pytest.approx(0.1)
    assert cosine_lr(2.5, lr, mn, wu, ep, warmup_lr=0.1) == pytest.approx(0.55)
    assert cosine_lr(10, lr, mn, wu, ep, warmup_lr=0.1) == cosine_lr(10, lr, mn, wu, ep)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(2, 2))  # 2-D but named '.bias'


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(4))
        self.table = nn.Parameter(torch.zeros(5, 2))
        self.holder = _Holder()


def test_param_groups():
    net = _Net()
    groups = param_groups(net, 0.05)
    assert len(groups) == 2
    assert groups[0]['weight_decay'] == 0.0 and groups[1]['weight_decay'] == 0.05
    no_decay, decay = ({id(p) for p in g['params']} for g in groups)
    ids = {n: id(p) for n, p in net.named_parameters()}
    assert no_decay == {ids[n] for n in ('fc.bias', 'norm.weight', 'norm.bias', 'scale', 'holder.bias')}
    assert decay == {ids[n] for n in ('fc.weight', 'cls_token', 'table')}  # 3-D token decays (MAE reference)
    assert ids['pos_embed'] not in no_decay | decay  # frozen: left out
    assert sum(len(g['params']) for g in groups) == len(no_decay | decay)

    groups = param_groups(net, 0.05, skip=('table', 'cls_token'))
    no_decay, decay = ({id(p) for p in g['params']} for g in groups)
    assert ids['table'] in no_decay and ids['cls_token'] in no_decay
    assert decay == {ids['fc.weight']}


# =========================================================================== optimizer step


def _model_and_opt(cls=torch.optim.AdamW):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = cls(model.parameters(), lr=0.1, fused=True)
    return model, opt, list(model.parameters())


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def test_optimizer_step_finite_updates():
    model, opt, params = _model_and_opt()
    scaler = torch.amp.GradScaler(enabled=False)
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    _set_grads(params, grads)
    norm, skipped = optimizer_step(opt, scaler, params)
    assert isinstance(skipped, torch.Tensor) and not bool(skipped)
    torch.testing.assert_close(norm, torch.cat([g.flatten() for g in grads]).norm())
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params)
    assert all(int(opt.state[p]['step']) == 1 for p in params)


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_optimizer_step_non_finite_skips_params_and_state(bad):
    model, opt, params = _model_and_opt()
    scaler = torch.amp.GradScaler(enabled=False)
    _set_grads(params, [torch.randn_like(p) for p in params])
    optimizer_step(opt, scaler, params)  # one real step so the state exists
    snap_p = [p.detach().clone() for p in params]
    snap_s = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}

    grads = [torch.randn_like(p) for p in params]
    grads[0][0, 0] = bad
    _set_grads(params, grads)
    norm, skipped = optimizer_step(opt, scaler, params)
    assert bool(skipped) and not bool(torch.isfinite(norm))
    assert all(torch.equal(a, p) for a, p in zip(snap_p, params))
    for p in params:
        for k in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(opt.state[p][k], snap_s[id(p)][k]), k
    assert all(p.grad is None for p in params)

    # the next finite step is taken again
    _set_grads(params, [torch.randn_like(p) for p in params])
    _, skipped = optimizer_step(opt, scaler, params)
    assert not bool(skipped)
    assert all(not torch.equal(a, p) for a, p in zip(snap_p, params))
    assert all(int(opt.state[p]['step']) == 2 for p in params)


class _RecordingAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g['params'] if p.grad is not None]
        return super().step(closure)


def test_optimizer_step_clip_grad():
    model, opt, params = _model_and_opt(_RecordingAdamW)
    scaler = torch.amp.GradScaler(enabled=False)
    grads = [torch.randn_like(p) * 10 for p in params]
    total = torch.cat([g.flatten() for g in grads]).norm()
    assert total > 2
    _set_grads(params, grads)
    norm, skipped = optimizer_step(opt, scaler, params, clip_grad=1.0)
    torch.testing.assert_close(norm, total)  # the norm before clipping is reported
    torch.testing.assert_close(torch.cat([g.flatten() for g in opt.seen]).norm(), torch.tensor(1.0), rtol=1e-4,
                               atol=1e-4)
    for g, s in zip(grads, opt.seen):  # direction kept
        torch.testing.assert_close(s, g / total, rtol=1e-4, atol=1e-6)
    # a clip above the norm changes nothing
    _set_grads(params, grads)
    optimizer_step(opt, scaler, params, clip_grad=1e6)
    for g, s in zip(grads, opt.seen):
        torch.testing.assert_close(s, g)


def test_optimizer_step_with_enabled_grad_scaler():
    model, opt, params = _model_and_opt(_RecordingAdamW)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    scaler.scale(torch.ones(()))  # initialises the scale as a backward would
    grads = [torch.randn_like(p) for p in params]
    _set_grads(params, [g * 1024 for g in grads])
    before = [p.detach().clone() for p in params]
    norm, skipped = optimizer_step(opt, scaler, params)
    assert not bool(skipped)
    torch.testing.assert_close(norm, torch.cat([g.flatten() for g in grads]).norm())  # unscaled
    for g, s in zip(grads, opt.seen):
        torch.testing.assert_close(s, g)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))

    before = [p.detach().clone() for p in params]
    bad = [g * 1024 for g in grads]
    bad[1][0] = float('inf')
    _set_grads(params, bad)
    _, skipped = optimizer_step(opt, scaler, params)
    assert bool(skipped)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert scaler.get_scale() == 512.0


# =========================================================================== checkpoints


class _Arbitrary:
    def __init__(self):
        self.x = 1


def test_save_load_checkpoint_roundtrip(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    obj = {'model': {'w': torch.randn(3, 4), 'b': torch.arange(3)}, 'epoch': 7, 'step': 123,
           'args': {'lr': 1e-3, 'input_size': (224, 224), 'data': None},
           'rng': [{'torch': torch.get_rng_state(), 'python': random.getstate(), 'cuda': None}]}
    save_checkpoint(path, obj)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']  # no .tmp left behind
    got = load_checkpoint(path)
    assert torch.equal(got['model']['w'], obj['model']['w']) and torch.equal(got['model']['b'], obj['model']['b'])
    assert got['epoch'] == 7 and got['step'] == 123 and got['args'] == obj['args']
    assert torch.equal(got['rng'][0]['torch'], obj['rng'][0]['torch'])
    r1, r2 = random.Random(), random.Random()
    r1.setstate(got['rng'][0]['python'])
    r2.setstate(obj['rng'][0]['python'])
    assert r1.random() == r2.random()  # the python RNG state survives
    # overwrite atomically
    save_checkpoint(path, {'epoch': 8})
    assert load_checkpoint(path) == {'epoch': 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']


def test_load_checkpoint_is_weights_only(tmp_path):
    torch.save({'args': argparse.Namespace(lr=0.1, model='x'), 'w': torch.ones(2)}, tmp_path / 'ns.pth')
    got = load_checkpoint(tmp_path / 'ns.pth')
    assert isinstance(got['args'], argparse.Namespace) and got['args'].lr == 0.1
    save_checkpoint(tmp_path / 'evil.pth', {'x': _Arbitrary()})
    with pytest.raises(SystemExit, match=r'evil.pth: holds Python objects \(.*_Arbitrary\).*could run code') as e:
        load_checkpoint(tmp_path / 'evil.pth')
    assert 'weights_only' not in str(e.value) and '\n' not in str(e.value)


def test_load_checkpoint_reads_a_yacs_config_without_yacs(tmp_path, monkeypatch):
    # SimMIM's checkpoints store 'config' as a yacs CfgNode (a dict subclass with attributes); yacs is not installed
    import types
    pkg, mod = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):
        def __init__(self, d=None):
            super().__init__(d or {})
            self.__dict__['_immutable'] = True
    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    mod.CfgNode, pkg.config = CfgNode, mod
    monkeypatch.setitem(sys.modules, 'yacs', pkg)
    monkeypatch.setitem(sys.modules, 'yacs.config', mod)
    torch.save({'model': {'w': torch.ones(2)}, 'config': CfgNode({'DATA': CfgNode({'IMG_SIZE': 192})})},
               tmp_path / 'simmim.pth')
    monkeypatch.delitem(sys.modules, 'yacs.config')
    monkeypatch.delitem(sys.modules, 'yacs')
    got = load_checkpoint(tmp_path / 'simmim.pth')
    assert torch.equal(got['model']['w'], torch.ones(2)) and got['config']['DATA']['IMG_SIZE'] == 192


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)


def test_load_weights_strips_module_and_skips_shape_mismatch(tmp_path, capsys):
    torch.manual_seed(0)
    src, dst = _Small(), _Small()
    head_w = dst.head.weight.detach().clone()
    sd = {'module.' + k: v for k, v in src.state_dict().items()}
    sd['module.head.weight'] = torch.randn(5, 3)  # shape differs
    sd['module.extra'] = torch.ones(1)  # unknown
    torch.save({'model': sd, 'epoch': 1}, tmp_path / 'ck.pth')
    res = load_weights(dst, tmp_path / 'ck.pth')
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.fc.bias, src.fc.bias)
    assert torch.equal(dst.head.bias, src.head.bias)
    assert torch.equal(dst.head.weight, head_w)  # kept as initialised
    assert 'head.weight' in res.missing_keys and 'extra' in res.unexpected_keys
    out = capsys.readouterr().out
    assert 'loaded 3 tensors' in out and 'head.weight' in out

    # a bare state dict (no 'model' entry) without prefixes also loads
    dst2 = _Small()
    torch.save(src.state_dict(), tmp_path / 'bare.pth')
    load_weights(dst2, tmp_path / 'bare.pth')
    assert all(torch.equal(a, b) for a, b in zip(dst2.state_dict().values(), src.state_dict().values()))


def test_load_weights_nothing_matches_exits(tmp_path):
    torch.save({'model': {'other.weight': torch.ones(2), 'module.fc.weight': torch.ones(7, 7)}}, tmp_path / 'x.pth')
    dst = _Small()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(SystemExit):
        load_weights(dst, tmp_path / 'x.pth')
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


# =========================================================================== command line


@dataclasses.dataclass
class CliArgs:
    data: Optional[str] = None  # image folder or "synthetic"
    demo: bool = False  # quick CPU run
    model: str = 'base'  # model size
    lr: float = 1e-3  # learning rate
    input_size: tuple = (224,)  # input size (one or two values)
    flag: bool = True  # some switch


def test_parse_args_types_and_defaults():
    a = parse_args(CliArgs, ['--data', 'x', '--lr', '0.5', '--input_size', '32', '48', '--no-flag', '--model', 't'])
    assert a == CliArgs(data='x', demo=False, model='t', lr=0.5, input_size=(32, 48), flag=False)
    assert isinstance(a.lr, float) and isinstance(a.input_size, tuple) and all(type(v) is int for v in a.input_size)
    a = parse_args(CliArgs, ['--data', 'y', '--input_size', '64', '--lr', '1e-4'])
    assert a.input_size == (64,) and a.flag is True and a.lr == 1e-4 and a.model == 'base'
    assert parse_args(CliArgs, ['--data', 'y', '--flag']).flag is True


@dataclasses.dataclass
class OptionalArgs:
    data: Optional[str] = 'x'  # data
    size: Optional[tuple[int, ...]] = None  # None: the preset's
    epochs: Optional[int] = None  # None: the preset's
    lr: Optional[float] = None  # None: the recipe's


def test_parse_args_optional_fields():
    a = parse_args(OptionalArgs, ['--size', '32', '48', '--epochs', '7', '--lr', '1e-3'])
    assert a == OptionalArgs(data='x', size=(32, 48), epochs=7, lr=1e-3)
    assert all(type(v) is int for v in a.size) and type(a.epochs) is int and type(a.lr) is float
    assert parse_args(OptionalArgs, []) == OptionalArgs()


def test_parse_args_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(CliArgs, ['--data', 'x', '--bogus', '1'])
    assert e.value.code != 0
    with pytest.raises(SystemExit):
        parse_args(CliArgs, ['--data', 'x', '--lr', 'abc'])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parse_args(CliArgs, ['--lr', '0.1'])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert '--data' in err and '--demo' in err


def test_parse_args_demo_fills_only_missing_fields():
    demo = {'data': 'synthetic', 'model': 'tiny', 'lr': 0.1, 'input_size': (32,)}
    a = parse_args(CliArgs, ['--demo', '--lr', '0.5'], demo=demo)
    assert a.demo is True and a.data == 'synthetic' and a.model == 'tiny' and a.input_size == (32,)
    assert a.lr == 0.5  # given explicitly: wins over the demo value
    a = parse_args(CliArgs, ['--demo', '--data', 'mine'], demo=demo)
    assert a.data == 'mine' and a.model == 'tiny'
    a = parse_args(CliArgs, ['--data', 'z'], demo=demo)  # no --demo: demo values are not applied
    assert a.model == 'base' and a.lr == 1e-3 and a.input_size == (224,)


def test_parse_args_help_shows_comments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(CliArgs, ['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'learning rate' in out and '--no-flag' in out and 'quick CPU run' in out


# =========================================================================== pictures


def test_save_grid_size_and_content(tmp_path):
    torch.manual_seed(0)
    B, pad = 2, 2
    a, b = torch.rand(B, 3, 16, 16), torch.rand(B, 3, 16, 16)
    path = tmp_path / 'grid.png'
    save_grid(path, [('original', a), ('two\nlines', b)], pad=pad)
    img = Image.open(path)
    img.load()
    assert img.mode == 'RGB'
    s = 8  # 16 px enlarged (nearest) to reach min_width 128
    Ws = Hs = 16 * s
    assert img.width == 2 * (Ws + pad) + pad
    assert img.height >= B * (Hs + pad) + pad + 2 * 10  # room for two lines of titles
    arr = np.asarray(img)
    for c, im in enumerate([a, b]):
        ref = (im * 255).round().byte()
        for r in range(B):
            x0, y0 = pad + c * (Ws + pad), img.height - (B - r) * (Hs + pad)  # no note: tiles end at the bottom
            for yy, xx in [(0, 0), (3, 11), (15, 15), (9, 2)]:
                assert tuple(arr[y0 + yy * s + 4, x0 + xx * s + 4]) == tuple(ref[r, :, yy, xx].tolist())
    save_grid(tmp_path / 'note.png', [('original', a), ('two\nlines', b)], note='a note', pad=pad)
    assert Image.open(tmp_path / 'note.png').height >= img.height + 12


def test_save_grid_captions_under_each_row(tmp_path):
    """Each row's caption sits between its images and the next row's (m3ae: the caption under each image)."""
    a = torch.full((3, 3, 16, 16), 0.5)
    save_grid(tmp_path / 'plain.png', [('x', a)])
    save_grid(tmp_path / 'cap.png', [('x', a)], captions=['one', 'two\nlines', 'three'])
    plain, cap = (np.asarray(Image.open(tmp_path / n).convert('L')).astype(int) for n in ('plain.png', 'cap.png'))
    assert cap.shape[0] > plain.shape[0] + 3 * 20
    grey = np.nonzero((cap[:, 64] == 128))[0]  # the image rows in the middle column
    tiles = np.split(grey, np.nonzero(np.diff(grey) > 1)[0] + 1)
    assert len(tiles) == 3 and all(len(t) == 128 for t in tiles)
    for r in range(3):  # dark caption pixels right below each tile, before the next one (or the end)
        below = cap[tiles[r][-1] + 1:(tiles[r + 1][0] if r < 2 else cap.shape[0]), :100]
        assert (below < 100).sum() > 10, r


def test_save_grid_grey_columns(tmp_path):
    g = torch.rand(1, 1, 32, 32)
    save_grid(tmp_path / 'g.png', [('x', g)])
    arr = np.asarray(Image.open(tmp_path / 'g.png').convert('RGB'))
    assert arr.shape[1] == 128 + 4
    v = round(g[0, 0, 31, 31].item() * 255)
    assert tuple(arr[arr.shape[0] - 2 - 1, 2 + 127]) == (v, v, v)


def test_save_loss_curve(tmp_path):
    log = tmp_path / 'log.jsonl'
    with open(log, 'w') as f:
        for step, loss in [(0, 1.0), (10, 0.8), (20, float('nan')), (30, 0.5), (40, 0.45)]:
            f.write(json.dumps({'step': step, 'loss': loss}) + '\n')
    save_loss_curve(tmp_path / 'loss.png', log)
    img = Image.open(tmp_path / 'loss.png').convert('RGB')
    assert img.size == (640, 360)
    arr = np.asarray(img).astype(int)
    blue = (arr[..., 2] > 200) & (arr[..., 0] < 60) & (arr[..., 1] < 60)
    assert blue.sum() > 100  # the curve is drawn
    clean = tmp_path / 'clean.jsonl'
    clean.write_text(''.join(line for line in open(log) if 'NaN' not in line))
    save_loss_curve(tmp_path / 'clean.png', clean)
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'clean.png')), np.asarray(Image.open(tmp_path / 'loss.png')))
    label = np.nonzero((arr[360 - 36:360 - 24, 320:] < 100).all(-1).any(0))[0] + 320  # the last step's label
    assert 640 - 20 - 4 <= label.max() <= 640 - 20  # ends at the plot's right edge (the curve's last point)
    save_loss_curve(tmp_path / 'small.png', log, size=(320, 200))
    assert Image.open(tmp_path / 'small.png').size == (320, 200)
    save_loss_curve(tmp_path / 'empty.png', tmp_path / 'missing.jsonl')
    arr = np.asarray(Image.open(tmp_path / 'empty.png').convert('RGB')).astype(int)
    assert not ((arr[..., 2] > 200) & (arr[..., 0] < 60) & (arr[..., 1] < 60)).any()


# =========================================================================== normalisation


@pytest.mark.parametrize('shape', [(2, 3, 4, 5), (2, 3, 2, 4, 5)])
def test_normalize(shape):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == shape
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, c].float() / 255 - mean[c]) / std[c])
    assert common.IMAGENET_MEAN == mean and common.IMAGENET_STD == std


# =========================================================================== the loop's bookkeeping


def test_logger_averages_counts_and_stops(tmp_path):
    import signal
    from types import SimpleNamespace
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        d = SimpleNamespace(world=1, rank=0, device=torch.device('cpu'), main=True)
        log = common.Logger(tmp_path, d, step=10, unit='clip')
        for loss, bad in [(1.0, [-1, -1]), (3.0, [4, 9]), (5.0, [-1, 7])]:  # three micro-steps, 3 bad files
            log.add(torch.tensor(loss), torch.tensor(bad), {'acc': torch.tensor(loss / 10), 'b': torch.tensor(1.0)})
        log.stepped(torch.tensor(False))
        assert log.log_step(epoch=1.5, step=11, total_steps=20, lr=0.1, global_batch=8, max_bad_steps=2) is None
        rec = json.loads((tmp_path / 'log.jsonl').read_text().splitlines()[-1])
        assert rec['loss'] == pytest.approx(3.0) and rec['skipped'] == 3 and rec['step'] == 11 and rec['lr'] == 0.1
        assert rec['acc'] == pytest.approx(0.3) and rec['b'] == 1.0  # a method's own metrics: averaged like the loss
        assert rec['bad_steps'] == 0 and rec['img_per_s'] > 0
        # the averages restart after a log step; the skipped-file count is a running total of distinct files
        log.add(torch.tensor(7.0), torch.tensor([9, 4]))
        log.stepped(torch.tensor(True))  # one non-finite step: counted, the run goes on
        assert log.log_step(1.6, 12, 20, 0.1, 8, max_bad_steps=2) is None
        rec = json.loads((tmp_path / 'log.jsonl').read_text().splitlines()[-1])
        assert rec['loss'] == pytest.approx(7.0) and rec['skipped'] == 3 and rec['bad_steps'] == 1 and 'acc' not in rec
        log.add(torch.tensor(float('nan')), torch.tensor([-1]))
        log.stepped(torch.tensor(True))  # the second in a row: stop, pointing at the checkpoint
        with pytest.raises(SystemExit, match='2 steps in a row'):
            log.log_step(1.7, 13, 20, 0.1, 8, max_bad_steps=2)
        log.add(torch.tensor(1.0), torch.tensor([-1]))
        log.stepped(torch.tensor(False))  # a good step resets the run of bad ones
        log.preempt.flag = True
        assert log.log_step(1.8, 14, 20, 0.1, 8, max_bad_steps=2) == 'preempted'
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_close_group_waits_at_a_barrier_then_for_idle_gloo_workers(monkeypatch):
    """A gloo worker frees the last collective's tensors just after its wait() returns; doing so during interpreter
    shutdown aborted the process (SIGABRT at exit in about 1 two-process run in 10 without the barrier, and still
    now and then with the barrier alone on a loaded machine)."""
    calls = []
    monkeypatch.setattr(common.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(common.dist, 'barrier', lambda: calls.append('barrier'))
    monkeypatch.setattr(common.dist, 'destroy_process_group', lambda: calls.append('destroy'))
    monkeypatch.setattr(common, 'settle_workers', lambda: calls.append('settle'))
    common.close_group()
    assert calls == ['barrier', 'destroy', 'settle']
    monkeypatch.setattr(common.dist, 'is_initialized', lambda: False)
    common.close_group()  # a single process: nothing to leave
    assert calls == ['barrier', 'destroy', 'settle']


def test_settle_workers_waits_for_quiet_polls_in_a_row():
    seen = iter([['R', 'S'], ['S', 'S'], ['S', 'R'], ['S', 'S'], ['S', 'S'], ['S', 'S'], ['R', 'R']])
    polls = []
    states = lambda: polls.append(1) or next(seen)  # noqa: E731
    assert common.settle_workers(states, poll=0, quiet=3) and len(polls) == 6  # the busy poll at 3 restarts the count
    t = time.monotonic()
    assert not common.settle_workers(lambda: ['R'], poll=0.001, quiet=3, limit=0.05)  # gives up at the limit
    assert 0.05 <= time.monotonic() - t < 1
    assert common.settle_workers(lambda: [], poll=0, quiet=2)  # no gloo threads (no /proc or no group): no wait


def test_gloo_worker_states_reads_this_process_threads():
    import torch.distributed as dist
    assert common.gloo_worker_states() == []  # no group yet: no gloo threads
    store = dist.HashStore()
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        states = common.gloo_worker_states()
        assert len(states) >= 1 and set(states) <= set('RSD')
    finally:
        common.close_group()
    assert set(common.gloo_worker_states()) <= {'S'}


def test_run_script_gives_what_python_file_gives(tmp_path):
    """The CLI tests' run_script (a fork of a process that imported torch) answers as `python file.py args` would:
    exit codes, SystemExit's message, a traceback, argv, the working directory, the environment, the timeout."""
    import subprocess
    from clitools import REPO, env, run_script
    script = tmp_path / 'probe.py'
    script.write_text('import os, sys, torch\n'
                      'print(sys.argv[1:], os.getcwd(), os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads(),\n'
                      '      __name__, os.path.basename(__file__), sys.path[0] == os.path.dirname(__file__))\n'
                      'what = sys.argv[1]\n'
                      'if what == "msg": raise SystemExit("stopping: a reason")\n'
                      'if what == "code": sys.exit(3)\n'
                      'if what == "error": {}["missing"]\n'
                      'if what == "sleep": import time; time.sleep(60)\n')
    for what in ('ok', 'msg', 'code', 'error'):
        a = run_script(script, what, 'x y')
        b = subprocess.run([sys.executable, str(script), what, 'x y'], cwd=REPO, env=env(), capture_output=True,
                           text=True)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), what
        assert a.stderr.splitlines()[-1:] == b.stderr.splitlines()[-1:], (a.stderr, b.stderr)  # traceback ends alike
    assert a.returncode == 1 and a.stderr.splitlines()[-1] == "KeyError: 'missing'"
    assert run_script(script, 'msg').stderr == 'stopping: a reason\n' and run_script(script, 'code').returncode == 3
    assert run_script(script, 'ok').stdout == f"['ok'] {REPO} 1 1 __main__ probe.py True\n"
    with pytest.raises(subprocess.TimeoutExpired):
        run_script(script, 'sleep', timeout=1)
    assert run_script(script, 'ok').returncode == 0  # the zygote is still there after a timeout
