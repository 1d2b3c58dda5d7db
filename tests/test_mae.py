"""Model-level tests for mae.py against the facts of the MAE reference (shared/methods/mae.md).

Everything runs on the CPU with the 'tiny' preset or smaller hand-built models on 16x16 to 32x48 inputs; the
one exception is a single ViT-B build to count its parameters."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import mae

TINY = mae.MODELS['tiny']  # (patch, D, depth, heads, dec D, dec depth, dec heads)


def tiny(img_size=32, in_chans=3, norm_pix_loss=True, seed=0):
    torch.manual_seed(seed)
    return mae.MAE(img_size, *TINY, in_chans=in_chans, norm_pix_loss=norm_pix_loss)


def small(img_size=16, depth=2, dec_depth=1, in_chans=3, seed=0):
    """A very small hand-built MAE: patch 8, D 16, 2 heads, decoder D 8, 2 heads."""
    torch.manual_seed(seed)
    return mae.MAE(img_size, 8, 16, depth, 2, 8, dec_depth, 2, in_chans=in_chans)


def images(B=4, H=32, W=32, C=3, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def noise_for(B, N, seed=1):
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed))


def ref_patchify(imgs, p):
    """The reference's patchify: reshape (B,C,h,p,w,p) -> einsum 'nchpwq->nhwpqc' -> (B, h*w, p*p*C)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(B, h * w, p * p * C)


def ref_loss(imgs, pred, mask, p, norm_pix_loss):
    """The reference's forward_loss, written out independently."""
    target = ref_patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.float()
    return (loss * mask).sum() / mask.sum()


def ref_sincos_2d(embed_dim, gh, gw):
    """numpy transcription of the reference's get_2d_sincos_pos_embed (util/pos_embed.py), generalised to a
    gh x gw grid the way its meshgrid(w, h) reads: grid[0] = column index, grid[1] = row index; cls row zero."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.)
        omega = 1. / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


# --------------------------------------------------------------------------- 1. random_masking


@pytest.mark.parametrize('N,ratio,n_keep', [(196, 0.75, 49), (24, 0.75, 6), (16, 0.6, 6), (10, 0.9, 0),
                                            (50, 0.5, 25), (7, 0.0, 7)])
def test_masking_exact_counts(N, ratio, n_keep):
    assert n_keep == int(N * (1 - ratio))  # the reference's floor, float rounding included
    B, D = 5, 4
    x = torch.randn(B, N, D)
    x_vis, mask, ids_restore = mae.random_masking(x, ratio)
    assert x_vis.shape == (B, n_keep, D)
    assert mask.shape == (B, N) and mask.dtype == torch.bool
    assert ids_restore.shape == (B, N)
    assert (mask.sum(1) == N - n_keep).all()  # per sample, not just on average
    assert ((~mask).sum(1) == n_keep).all()


def test_masking_196_patches_keeps_49():
    x = torch.randn(3, 196, 8)
    x_vis, mask, _ = mae.random_masking(x, 0.75)
    assert x_vis.shape == (3, 49, 8)
    assert mask.sum(1).tolist() == [147, 147, 147]


def test_masking_matches_noise_order_and_visible_tokens():
    B, N, D = 4, 20, 6
    x = torch.randn(B, N, D)
    noise = noise_for(B, N)
    x_vis, mask, ids_restore = mae.random_masking(x, 0.75, noise=noise)
    n_keep = int(N * 0.25)
    for b in range(B):
        order = sorted(range(N), key=lambda i: noise[b, i].item())  # ascending noise, independent of torch.argsort
        kept = order[:n_keep]
        # the kept set is the n_keep smallest-noise positions; mask True = removed
        assert set(kept) == set(torch.nonzero(~mask[b]).flatten().tolist())
        assert set(order[n_keep:]) == set(torch.nonzero(mask[b]).flatten().tolist())
        # x_vis holds exactly x at the kept positions, in ascending-noise order
        assert torch.equal(x_vis[b], x[b, kept])
        # ids_restore inverts the shuffle
        ids_shuffle = torch.tensor(order)
        assert torch.equal(ids_shuffle[ids_restore[b]], torch.arange(N))
        assert torch.equal(ids_restore[b][ids_shuffle], torch.arange(N))
    # ids_restore = argsort(argsort(noise)): gathering the shuffled tokens with it puts them back in patch order
    ids_shuffle = noise.argsort(1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(N).expand(B, N))
    x_shuf = x.gather(1, ids_shuffle[..., None].expand(-1, -1, D))
    assert torch.equal(x_shuf.gather(1, ids_restore[..., None].expand(-1, -1, D)), x)
    # the mask is the reference's construction: [0]*n_keep + [1]*(N-n_keep) gathered with ids_restore
    ref_mask = torch.ones(B, N)
    ref_mask[:, :n_keep] = 0
    assert torch.equal(mask, torch.gather(ref_mask, 1, ids_restore).bool())


def test_masking_fresh_masks_per_call_and_per_sample():
    torch.manual_seed(0)
    x = torch.randn(8, 196, 4)
    _, m1, r1 = mae.random_masking(x, 0.75)
    _, m2, r2 = mae.random_masking(x, 0.75)
    assert not torch.equal(m1, m2)  # a new mask every call (every step)
    assert not torch.equal(r1, r2)
    for b in range(1, 8):  # per-sample masks, not one mask broadcast over the batch
        assert not torch.equal(m1[0], m1[b])


def test_masking_is_uniform_over_positions():
    torch.manual_seed(0)
    x = torch.zeros(4000, 16, 1)
    _, mask, _ = mae.random_masking(x, 0.75)
    freq = mask.float().mean(0)  # each position removed with probability 12/16
    assert (freq - 0.75).abs().max() < 0.04


def test_masking_ratio_zero_keeps_everything():
    B, N, D = 3, 12, 5
    x = torch.randn(B, N, D)
    noise = noise_for(B, N)
    x_vis, mask, ids_restore = mae.random_masking(x, 0.0, noise=noise)
    assert x_vis.shape == (B, N, D)
    assert not mask.any()
    assert torch.equal(x_vis.gather(1, ids_restore[..., None].expand(-1, -1, D)), x)


# --------------------------------------------------------------------------- 2. encoder sees visible tokens only


def test_encoder_sees_only_visible_tokens():
    model = tiny().eval()
    imgs = images(2)
    N = model.patch_embed.num_patches  # 16
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
        model(imgs)  # default ratio 0.75
    n_vis = int(N * 0.25)
    assert latent.shape == (2, 1 + n_vis, TINY[1])
    assert seen == [(2, 1 + n_vis, TINY[1])] * 2
    assert mask.shape == (2, N) and ids_restore.shape == (2, N)


def test_encoder_matches_manual_computation():
    """pos_embed added before masking (patch i keeps slot 1+i), cls gets cls_token + pos_embed[:, 0] (zeros)."""
    model = tiny().eval()
    imgs = images(3)
    N = model.patch_embed.num_patches
    noise = noise_for(3, N)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise=noise)
        tokens = model.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + model.pos_embed[:, 1:]
        keep = noise.argsort(1)[:, :int(N * 0.25)]
        vis = torch.stack([tokens[b, keep[b]] for b in range(3)])
        x = torch.cat([model.cls_token.expand(3, -1, -1), vis], 1)
        for blk in model.blocks:
            x = blk(x)
        x = F.layer_norm(x, (TINY[1],), model.norm.weight, model.norm.bias, 1e-6)
    torch.testing.assert_close(latent, x, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, torch.ones(3, N, dtype=torch.bool).scatter(1, keep, False))


def test_encoder_output_ignores_masked_pixels():
    model = tiny().eval()
    p = TINY[0]
    imgs = images(2)
    N = model.patch_embed.num_patches
    gw = model.patch_embed.grid_size[1]
    noise = noise_for(2, N)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise=noise)
        i_masked = int(torch.nonzero(mask[0])[0])
        i_vis = int(torch.nonzero(~mask[0])[0])

        def perturbed(i):
            out = imgs.clone()
            r, c = divmod(i, gw)
            out[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 5 * torch.randn(3, p, p)
            return out
        lat_m, mask_m, _ = model.forward_encoder(perturbed(i_masked), 0.75, noise=noise)
        lat_v, _, _ = model.forward_encoder(perturbed(i_vis), 0.75, noise=noise)
    assert torch.equal(mask_m, mask)
    assert torch.allclose(lat_m, latent, rtol=0, atol=1e-6)  # a removed patch never reaches the encoder
    assert (lat_v[0] - latent[0]).abs().max() > 1e-3  # a visible one does
    torch.testing.assert_close(lat_v[1], latent[1])  # and only in its own sample


# --------------------------------------------------------------------------- 3. decoder


def test_decoder_unshuffles_mask_tokens_to_the_right_positions():
    model = tiny().eval()
    model.decoder_blocks = nn.ModuleList()  # identity decoder: each output position sees only its own token
    with torch.no_grad():
        model.mask_token.normal_()
        model.decoder_pos_embed.mul_(0.5)  # keep a distinct, position-dependent (non-zero) table
    B, N = 3, model.patch_embed.num_patches
    imgs = images(B)
    noise = noise_for(B, N)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise=noise)
        pred = model.forward_decoder(latent, ids_restore)
        head = lambda t: model.decoder_pred(model.decoder_norm(t))  # noqa: E731
        emb = model.decoder_embed(latent)  # (B, 1+N_vis, Dd)
        dpos = model.decoder_pos_embed[0]  # (1+N, Dd)
        keep = noise.argsort(1)
        assert pred.shape == (B, N, TINY[0] ** 2 * 3)  # cls dropped
        for b in range(B):
            for i in range(N):
                if mask[b, i]:
                    want = head(model.mask_token[0, 0] + dpos[1 + i])
                else:
                    k = int((keep[b] == i).nonzero())  # rank of patch i among the kept tokens
                    want = head(emb[b, 1 + k] + dpos[1 + i])
                torch.testing.assert_close(pred[b, i], want, rtol=1e-5, atol=1e-5)


def test_decoder_mask_positions_identical_without_positions():
    model = tiny().eval()
    model.decoder_blocks = nn.ModuleList()
    with torch.no_grad():
        model.decoder_pos_embed.zero_()
        model.mask_token.normal_()
        latent, mask, ids_restore = model.forward_encoder(images(2), 0.75, noise=noise_for(2, 16))
        pred = model.forward_decoder(latent, ids_restore)
        masked = pred[mask]  # (B*N_mask, p*p*C): all the same mask-token prediction
        want = model.decoder_pred(model.decoder_norm(model.mask_token[0, 0]))
        torch.testing.assert_close(masked, want.expand_as(masked), rtol=0, atol=1e-6)
        assert (pred[~mask] - want).abs().amax(-1).min() > 1e-3  # visible positions are not mask tokens


def test_decoder_keeps_cls_through_its_blocks():
    """decoder_embed projects the cls token too and the decoder blocks attend to it; only decoder_pred's output
    at position 0 is dropped."""
    model = tiny().eval()
    with torch.no_grad():
        latent, _, ids_restore = model.forward_encoder(images(2), 0.75, noise=noise_for(2, 16))
        pred = model.forward_decoder(latent, ids_restore)
        lat2 = latent.clone()
        lat2[:, 0] += 3.0
        pred2 = model.forward_decoder(lat2, ids_restore)
    assert pred.shape == (2, 16, 192)
    assert (pred2 - pred).abs().max() > 1e-3


def test_forward_returns_loss_pred_mask():
    model = tiny()
    imgs = images(2)
    noise = noise_for(2, 16)
    loss, out = model(imgs, 0.75, noise)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    pred = model.forward_decoder(latent, ids_restore)
    assert torch.equal(out['mask'], mask)
    torch.testing.assert_close(out['pred'], pred)
    torch.testing.assert_close(loss, ref_loss(imgs, pred, mask, TINY[0], True))


# --------------------------------------------------------------------------- 4. loss


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_equals_reference(norm_pix):
    p, B, C, H, W = 8, 3, 3, 32, 48
    imgs = images(B, H, W, C)
    N = (H // p) * (W // p)
    pred = torch.randn(B, N, p * p * C, generator=torch.Generator().manual_seed(2))
    _, mask, _ = mae.random_masking(torch.zeros(B, N, 1), 0.75, noise=noise_for(B, N))
    got = mae.forward_loss(imgs, pred, mask, p, norm_pix)
    torch.testing.assert_close(got, ref_loss(imgs, pred, mask, p, norm_pix), rtol=1e-5, atol=1e-6)
    assert got.dim() == 0
    if not norm_pix:  # plain MSE on the removed patches
        t = ref_patchify(imgs, p)
        torch.testing.assert_close(got, F.mse_loss(pred[mask], t[mask]), rtol=1e-5, atol=1e-6)


def test_loss_norm_pix_uses_unbiased_variance_and_channel_last_patches():
    p = 2
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) ** 1.5 / 50
    N = 4
    mask = torch.ones(2, N, dtype=torch.bool)
    t = ref_patchify(imgs, p)
    # zero loss exactly when the prediction is the (unbiased) normalised target in channel-last order
    target = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    assert mae.forward_loss(imgs, target, mask, p, True) < 1e-10
    biased = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    assert mae.forward_loss(imgs, biased, mask, p, True) > 1e-4
    channel_first = imgs.reshape(2, 3, 2, p, 2, p).permute(0, 2, 4, 1, 3, 5).reshape(2, N, -1)
    assert mae.forward_loss(imgs, t, mask, p, False) < 1e-10
    assert mae.forward_loss(imgs, channel_first, mask, p, False) > 1e-2


def test_loss_ignores_visible_patches_only():
    p, B, N = 8, 2, 16
    imgs = images(B)
    pred = torch.randn(B, N, p * p * 3)
    _, mask, _ = mae.random_masking(torch.zeros(B, N, 1), 0.75, noise=noise_for(B, N))
    base = mae.forward_loss(imgs, pred, mask, p, True)
    vis = pred.clone()
    vis[~mask] += 100 * torch.randn_like(vis[~mask])
    assert torch.equal(mae.forward_loss(imgs, vis, mask, p, True), base)
    masked = pred.clone()
    b, i = map(int, torch.nonzero(mask)[0])
    masked[b, i] += 1.0
    assert mae.forward_loss(imgs, masked, mask, p, True) > base + 1e-3
    # the mean is over all removed patches of the batch (sum(loss*mask)/sum(mask))
    per_patch = ((pred - _normed(imgs, p)) ** 2).mean(-1)
    torch.testing.assert_close(base, per_patch[mask].mean())


def _normed(imgs, p):
    t = ref_patchify(imgs, p)
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()


def test_loss_no_nan_without_masked_patches_or_on_constant_patches():
    p = 8
    imgs = images(2)
    pred = torch.randn(2, 16, 192, requires_grad=True)
    none = torch.zeros(2, 16, dtype=torch.bool)
    loss = mae.forward_loss(imgs, pred, none, p, True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad == 0).all()
    const = torch.full((2, 3, 32, 32), 0.7)
    allm = torch.ones(2, 16, dtype=torch.bool)
    loss = mae.forward_loss(const, torch.zeros(2, 16, 192), allm, p, True)
    assert torch.isfinite(loss) and loss.item() < 1e-6  # constant patch -> target 0 (var 0, eps 1e-6)
    # model with mask_ratio 0: loss 0, not NaN, and backward works
    model = tiny()
    loss, out = model(images(2), 0.0)
    assert not out['mask'].any() and loss.item() == 0.0
    loss.backward()


# --------------------------------------------------------------------------- 5. init


@pytest.mark.parametrize('img_size', [32, (32, 48)])
def test_pos_embeds_fixed_sincos(img_size):
    model = tiny(img_size)
    gh, gw = model.patch_embed.grid_size
    for name, t, d in [('pos_embed', model.pos_embed, TINY[1]), ('decoder_pos_embed', model.decoder_pos_embed, TINY[4])]:
        assert not t.requires_grad, name
        assert t.shape == (1, 1 + gh * gw, d)
        assert torch.equal(t[0, 0], torch.zeros(d))
        assert torch.equal(t[0], common.sincos_2d(d, gh, gw, cls_token=True))
        torch.testing.assert_close(t[0], ref_sincos_2d(d, gh, gw), rtol=0, atol=1e-6)


def _xavier_bound(w):
    fan_out, fan_in = w.shape
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_linear_init_xavier_uniform_zero_bias():
    model = tiny()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * TINY[2] + 4 * TINY[5] + 2  # qkv, proj, fc1, fc2 per block; decoder_embed/pred
    for name, m in linears:
        w = m.weight.detach()
        bound = _xavier_bound(w)  # fused qkv treated as one (3D, D) matrix
        assert w.abs().max() <= bound + 1e-7, name
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05, name
        assert abs(w.mean().item()) < 0.05 * bound, name
        assert m.bias is not None and torch.equal(m.bias, torch.zeros_like(m.bias)), name


def test_patch_embed_init():
    model = tiny()
    w, b = model.patch_embed.proj.weight.detach(), model.patch_embed.proj.bias.detach()
    D, C, p, _ = w.shape
    bound = _xavier_bound(w.view(D, -1))  # (D, C*p*p) as a Linear, not the conv's (D*p*p, C*p*p) fans
    assert w.abs().max() <= bound + 1e-7
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    # the conv bias keeps PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), it is not zeroed
    bb = 1 / math.sqrt(C * p * p)
    assert b.abs().max() <= bb + 1e-7
    assert (b != 0).all()
    assert abs(b.std().item() / (bb / math.sqrt(3)) - 1) < 0.25


def test_token_init_and_layernorms():
    torch.manual_seed(0)
    wide = mae.MAE(16, 8, 1024, 0, 8, 1024, 0, 8)  # no blocks: just the tokens, cheap
    for t in (wide.cls_token, wide.mask_token):
        assert t.shape == (1, 1, 1024) and t.requires_grad
        assert abs(t.std().item() / 0.02 - 1) < 0.15
        assert abs(t.mean().item()) < 0.005
    model = tiny()
    assert model.mask_token.shape == (1, 1, TINY[4])  # decoder space
    assert model.cls_token.shape == (1, 1, TINY[1])
    lns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == 2 * TINY[2] + 2 * TINY[5] + 2
    for name, m in lns:
        assert m.eps == 1e-6, name
        assert torch.equal(m.weight, torch.ones_like(m.weight)), name
        assert torch.equal(m.bias, torch.zeros_like(m.bias)), name


def test_block_matches_timm_block():
    """pre-norm timm Block: x + attn(norm1 x); x + mlp(norm2 x); fused qkv split per head, scale hd^-0.5,
    mlp ratio 4 with exact GELU."""
    model = tiny()
    blk = model.blocks[1]
    with torch.no_grad():
        for prm in blk.parameters():  # non-trivial weights everywhere
            prm.add_(0.05 * torch.randn_like(prm))
    D, H = TINY[1], TINY[3]
    assert blk.mlp.fc1.weight.shape == (4 * D, D)
    x = torch.randn(2, 7, D)

    def attn(x):
        B, N, _ = x.shape
        qkv = blk.attn.qkv(x).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * (D // H) ** -0.5).softmax(-1)
        return blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N, D))

    with torch.no_grad():
        ln = lambda t, m: F.layer_norm(t, (D,), m.weight, m.bias, 1e-6)  # noqa: E731
        y = x + attn(ln(x, blk.norm1))
        y = y + blk.mlp.fc2(F.gelu(blk.mlp.fc1(ln(y, blk.norm2))))
        torch.testing.assert_close(blk(x), y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 6. state dict


def _block_keys(prefix, i):
    subs = ['norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2']
    return [f'{prefix}.{i}.{s}.{wb}' for s in subs for wb in ('weight', 'bias')]


ENC_KEYS = (['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias']
            + _block_keys('blocks', 0) + _block_keys('blocks', 1) + ['norm.weight', 'norm.bias'])
DEC_KEYS = (['mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias']
            + _block_keys('decoder_blocks', 0)
            + ['decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'])


def test_state_dict_keys_and_shapes_match_reference():
    model = small()  # 2 encoder blocks, 1 decoder block, 16x16 input, patch 8 -> 4 patches
    sd = model.state_dict()
    assert sorted(sd) == sorted(ENC_KEYS + DEC_KEYS)
    assert len(sd) == len(ENC_KEYS) + len(DEC_KEYS)
    D, Dd, p, N = 16, 8, 8, 4
    shapes = {'cls_token': (1, 1, D), 'pos_embed': (1, N + 1, D), 'patch_embed.proj.weight': (D, 3, p, p),
              'patch_embed.proj.bias': (D,), 'blocks.0.attn.qkv.weight': (3 * D, D), 'blocks.0.attn.qkv.bias': (3 * D,),
              'blocks.1.attn.proj.weight': (D, D), 'blocks.0.mlp.fc1.weight': (4 * D, D),
              'blocks.0.mlp.fc2.weight': (D, 4 * D), 'norm.weight': (D,), 'mask_token': (1, 1, Dd),
              'decoder_pos_embed': (1, N + 1, Dd), 'decoder_embed.weight': (Dd, D),
              'decoder_blocks.0.attn.qkv.weight': (3 * Dd, Dd), 'decoder_norm.bias': (Dd,),
              'decoder_pred.weight': (p * p * 3, Dd), 'decoder_pred.bias': (p * p * 3,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    g = small(in_chans=1).state_dict()
    assert g['patch_embed.proj.weight'].shape == (D, 1, p, p) and g['decoder_pred.weight'].shape == (p * p, Dd)


def test_encoder_state_dict_is_timm_vit_layout_and_loads():
    model = small()
    enc = mae.encoder_state_dict(model)
    assert sorted(enc) == sorted(ENC_KEYS)
    for k in enc:
        assert torch.equal(enc[k], model.state_dict()[k])
    fresh = small(seed=5)
    res = fresh.load_state_dict(enc, strict=False)
    assert sorted(res.missing_keys) == sorted(DEC_KEYS)
    assert res.unexpected_keys == []
    for k, v in enc.items():
        assert torch.equal(fresh.state_dict()[k], v)


# --------------------------------------------------------------------------- 7. presets and size


def test_model_presets_match_reference_table():
    assert mae.MODELS['base'] == (16, 768, 12, 12, 512, 8, 16)
    assert mae.MODELS['large'] == (16, 1024, 24, 16, 512, 8, 16)
    assert mae.MODELS['huge'] == (14, 1280, 32, 16, 512, 8, 16)
    assert mae.Args().model in mae.MODELS
    assert mae.Args().mask_ratio == 0.75 and mae.Args().norm_pix_loss is True


def test_vit_base_parameter_count():
    model = mae.MAE(224, *mae.MODELS['base'])
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    enc = sum(v.numel() for v in mae.encoder_state_dict(model).values())
    # timm vit_base_patch16_224 has 86,567,656 params; without its 1000-class head (769,000): 85,798,656
    assert enc == 86_567_656 - 769_000
    assert enc - 197 * 768 == 85_647_360  # without pos_embed
    assert total == 111_907_840  # ~111.9M with the decoder (pos tables included)
    assert trainable == total - 197 * 768 - 197 * 512  # pos tables frozen
    assert model.decoder_pred.out_features == 768
    huge_patch = mae.MODELS['huge'][0]
    assert mae.MAE(224, huge_patch, 16, 1, 4, 8, 1, 2).decoder_pred.out_features == 14 * 14 * 3  # pred dim 588


# --------------------------------------------------------------------------- 8. weight decay groups


def test_param_groups_weight_decay():
    model = tiny()
    groups = common.param_groups(model, 0.05)
    assert [g['weight_decay'] for g in groups] == [0.0, 0.05]  # reference order [no_decay, decay]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]['params']}
    decay = {names[id(p)] for p in groups[1]['params']}
    assert not no_decay & decay
    assert {'cls_token', 'mask_token'} <= decay  # 3-D tokens ARE decayed (timm 0.3.2 add_weight_decay)
    assert {'pos_embed', 'decoder_pos_embed'}.isdisjoint(no_decay | decay)  # frozen: not in the optimizer
    want_decay = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}
    want_no = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1}
    assert decay == want_decay and no_decay == want_no
    assert all(n.endswith('.bias') or 'norm' in n for n in no_decay)
    assert 'patch_embed.proj.bias' in no_decay and 'patch_embed.proj.weight' in decay
    assert 'blocks.0.attn.qkv.weight' in decay and 'decoder_pred.weight' in decay


# --------------------------------------------------------------------------- 9. forward / backward


def test_forward_backward_non_square_tiny():
    model = tiny((32, 48))
    model.train()
    assert model.patch_embed.grid_size == (4, 6)
    imgs = images(2, 32, 48)
    loss, out = model(imgs)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert out['pred'].shape == (2, 24, 8 * 8 * 3)
    assert out['mask'].shape == (2, 24) and (out['mask'].sum(1) == 24 - 6).all()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            assert torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    assert model.mask_token.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_in_chans_one():
    model = tiny((32, 48), in_chans=1)
    imgs = images(2, 32, 48, C=1)
    noise = noise_for(2, 24)
    loss, out = model(imgs, 0.75, noise)
    assert out['pred'].shape == (2, 24, 64)
    torch.testing.assert_close(loss, ref_loss(imgs, out['pred'], out['mask'], 8, True))
    loss.backward()
    assert torch.isfinite(model.patch_embed.proj.weight.grad).all()


def test_pixel_target_model_uses_plain_mse():
    model = tiny(norm_pix_loss=False)
    imgs = images(2)
    loss, out = model(imgs, 0.75, noise_for(2, 16))
    torch.testing.assert_close(loss, ref_loss(imgs, out['pred'], out['mask'], 8, False))


# --------------------------------------------------------------------------- 10. optimisation


def test_adamw_steps_lower_the_loss():
    model = tiny()
    ds = common.SyntheticImages(8, 32)
    imgs = common.normalize(torch.stack([ds[i][0] for i in range(8)]), common.IMAGENET_MEAN, common.IMAGENET_STD)
    noise = noise_for(8, 16)
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(30):
        loss, _ = model(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final, _ = model(imgs, 0.75, noise)
    assert all(math.isfinite(v) for v in losses)
    assert final.item() < 0.5 * losses[0], (losses[0], final.item())
    assert torch.equal(model.pos_embed[0], common.sincos_2d(TINY[1], 4, 4, cls_token=True))  # frozen stays fixed


# --------------------------------------------------------------------------- 11. checkpoints


def test_load_reference_style_checkpoints(tmp_path):
    src = small(seed=1)
    enc_path = tmp_path / 'mae_pretrain_vit_tiny.pth'
    torch.save({'model': mae.encoder_state_dict(src)}, enc_path)
    fresh = small(seed=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    res = common.load_weights(fresh, enc_path)
    assert sorted(res.missing_keys) == sorted(DEC_KEYS) and res.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src.state_dict()[k] if k in ENC_KEYS else before[k]), k

    full_path = tmp_path / 'mae_visualize_vit_tiny.pth'
    ns = argparse.Namespace(model='mae_vit_base_patch16', norm_pix_loss=False, mask_ratio=0.75, input_size=224)
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'epoch': 799, 'scaler': {}, 'args': ns}, full_path)
    fresh = small(seed=3)
    res = common.load_weights(fresh, full_path)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    imgs, noise = images(2, 16, 16), noise_for(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(imgs, 0.75, noise)[0], src(imgs, 0.75, noise)[0])

    ddp_path = tmp_path / 'ddp.pth'  # 'module.' prefixes (a DDP-wrapped save) are stripped
    torch.save({'model': {'module.' + k: v for k, v in src.state_dict().items()}}, ddp_path)
    fresh = small(seed=4)
    common.load_weights(fresh, ddp_path)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


# --------------------------------------------------------------------------- 12. visualize


@pytest.mark.parametrize('in_chans,norm_pix', [(3, True), (1, False)])
def test_visualize_writes_png_keeps_rng_and_mode(tmp_path, in_chans, norm_pix):
    model = tiny((32, 48), in_chans=in_chans, norm_pix_loss=norm_pix)
    mean, std = (common.IMAGENET_MEAN, common.IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    args = mae.Args(mask_ratio=0.75, norm_pix_loss=norm_pix, mean=mean, std=std, in_chans=in_chans)
    imgs = images(3, 32, 48, C=in_chans)
    model.train()
    state = torch.get_rng_state()
    path = tmp_path / 'vis.png'
    mae.visualize(model, imgs, args, path)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (training masks) is untouched
    assert model.training
    with Image.open(path) as im:
        assert im.format == 'PNG'
        w, h = im.size
        assert w >= 4 * 48 and h >= 3 * 32
        arr = np.asarray(im.convert('RGB'))
        assert arr.std() > 1  # not a blank canvas
    model.eval()
    mae.visualize(model, imgs, args, tmp_path / 'vis2.png')
    assert not model.training
    # fixed mask and batch: the same model draws the same picture
    a, b = np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / 'vis2.png'))
    assert np.array_equal(a, b)
