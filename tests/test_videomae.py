"""Model- and data-level tests for videomae.py against the facts of the VideoMAE reference
(shared/methods/videomae.md; MCG-NJU/VideoMAE modeling_pretrain.py, masking_generator.py, engine_for_pretraining.py,
kinetics.py, transforms.py). CPU only: tiny or hand-built models on 16-32 px clips of 4 frames."""
import argparse
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import videomae as vm

TINY = vm.MODELS['tiny']  # (patch, D, depth, heads, dec D, dec depth, dec heads)
MEAN, STD = common.IMAGENET_MEAN, common.IMAGENET_STD


def tiny(size=32, T=4, norm_pix_loss=True, seed=0, in_chans=3, **kw):
    torch.manual_seed(seed)
    mean, std = (MEAN, STD) if in_chans == 3 else ((0.5,), (0.25,))
    return vm.VideoMAE(size, *TINY, num_frames=T, in_chans=in_chans, norm_pix_loss=norm_pix_loss, mean=mean,
                       std=std, **kw)


def small(size=16, T=4, depth=1, dec_depth=1, dim=16, dec_dim=8, seed=0):
    """A very small hand-built VideoMAE: patch 8, 2 heads everywhere."""
    torch.manual_seed(seed)
    return vm.VideoMAE(size, 8, dim, depth, 2, dec_dim, dec_depth, 2, num_frames=T)


def clips(B=2, T=4, H=32, W=32, C=3, seed=0):
    return torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(seed))


def noise_for(B, hw, seed=1):
    return torch.rand(B, hw, generator=torch.Generator().manual_seed(seed))


def ref_sinusoid_table(n_position, d_hid):
    """Verbatim logic of the reference's get_sinusoid_encoding_table (modeling_finetune.py), numpy float64."""
    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]
    table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.tensor(table, dtype=torch.float)


def ref_target(videos, p, t=2, normlize_target=True, mean=MEAN, std=STD):
    """engine_for_pretraining.py's target with the einops rearranges written out (reshape/permute)."""
    mean = torch.as_tensor(mean)[None, :, None, None, None]
    std = torch.as_tensor(std)[None, :, None, None, None]
    unnorm = videos * std + mean
    B, C, T, H, W = unnorm.shape
    x = unnorm.reshape(B, C, T // t, t, H // p, p, W // p, p)  # b c t p0 h p1 w p2
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b t h w p0 p1 p2 c
    x = x.reshape(B, -1, t * p * p, C)  # 'b (t h w) (p0 p1 p2) c'
    if normlize_target:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.reshape(B, x.shape[1], -1)  # 'b n p c -> b n (p c)'


def ref_loss(videos, outputs, bool_masked_pos, p, t=2, normlize_target=True, mean=MEAN, std=STD):
    target = ref_target(videos, p, t, normlize_target, mean, std)
    B, _, C = target.shape
    labels = target[bool_masked_pos].reshape(B, -1, C)
    return nn.MSELoss()(input=outputs, target=labels)


def ref_forward(model, x, mask):
    """PretrainVisionTransformer.forward with the reference's boolean indexing."""
    enc = model.encoder
    x = enc.patch_embed(x) + enc.pos_embed
    B, _, C = x.shape
    x_vis = x[~mask].reshape(B, -1, C)
    for blk in enc.blocks:
        x_vis = blk(x_vis)
    x_vis = model.encoder_to_decoder(enc.norm(x_vis))
    B, N, C = x_vis.shape
    expand_pos_embed = model.pos_embed.expand(B, -1, -1)
    pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
    pos_emd_mask = expand_pos_embed[mask].reshape(B, -1, C)
    x_full = torch.cat([x_vis + pos_emd_vis, model.mask_token + pos_emd_mask], dim=1)
    for blk in model.decoder.blocks:
        x_full = blk(x_full)
    return model.decoder.head(model.decoder.norm(x_full[:, -pos_emd_mask.shape[1]:]))


# --------------------------------------------------------------------------- 1. positions


@pytest.mark.parametrize('n,d', [(1568, 96), (32, 128), (12, 64), (7, 6)])
def test_sinusoid_table_matches_reference_formula(n, d):
    got = vm.sinusoid_table(n, d)
    assert got.shape == (n, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref_sinusoid_table(n, d), rtol=0, atol=1e-6)
    # interleaved: column 0 is sin(pos), column 1 is cos(pos); not MAE's [all sin | all cos]
    torch.testing.assert_close(got[:, 0], torch.arange(n).float().sin(), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 1], torch.arange(n).float().cos(), rtol=0, atol=1e-6)
    assert not torch.allclose(got, common.sincos_1d(d, torch.arange(n)), atol=1e-3)


def test_pos_tables_are_fixed_buffers_outside_the_state_dict():
    model = tiny()
    N = 2 * 16
    assert torch.equal(model.encoder.pos_embed, vm.sinusoid_table(N, TINY[1])[None])
    assert torch.equal(model.pos_embed, vm.sinusoid_table(N, TINY[4])[None])
    assert not any('pos_embed' in k for k in model.state_dict())
    assert not any('pos_embed' in n for n, _ in model.named_parameters())


# --------------------------------------------------------------------------- 2. tube masking


@pytest.mark.parametrize('hw,ratio,n_mask', [(196, 0.9, 176), (196, 0.75, 147), (16, 0.9, 14), (64, 0.9, 57),
                                             (10, 0.5, 5), (16, 0.0, 0)])
def test_tube_mask_exact_count_per_slice(hw, ratio, n_mask):
    assert n_mask == int(ratio * hw)  # the reference's int(), float rounding included
    B, T = 5, 8
    mask = vm.tube_masking(B, T, hw, ratio, 'cpu')
    assert mask.shape == (B, T * hw) and mask.dtype == torch.bool
    per_slice = mask.view(B, T, hw)
    assert (per_slice.sum(-1) == n_mask).all()  # every sample, every temporal slice
    assert (mask.sum(1) == T * n_mask).all()


def test_tube_mask_identical_across_time_and_fresh_per_call():
    torch.manual_seed(0)
    B, T, hw = 6, 8, 196
    m1 = vm.tube_masking(B, T, hw, 0.9, 'cpu')
    m2 = vm.tube_masking(B, T, hw, 0.9, 'cpu')
    s1 = m1.view(B, T, hw)
    assert torch.equal(s1, s1[:, :1].expand(-1, T, -1))  # the same spatial mask in every slice (a tube)
    assert torch.equal(m1, s1[:, 0].repeat(1, T))  # np.tile(mask_per_frame, (T, 1)).flatten(): t-major
    assert not torch.equal(m1, m2)  # a new mask every call (every step)
    for b in range(1, B):
        assert not torch.equal(s1[0, 0], s1[b, 0])  # per sample


def test_tube_mask_is_the_smallest_noise_positions():
    B, T, hw = 3, 2, 20
    noise = noise_for(B, hw)
    mask = vm.tube_masking(B, T, hw, 0.75, 'cpu', noise=noise)
    n_mask = int(0.75 * hw)
    for b in range(B):
        order = sorted(range(hw), key=lambda i: noise[b, i].item())
        assert set(torch.nonzero(mask[b, :hw]).flatten().tolist()) == set(order[:n_mask])
    assert torch.equal(vm.tube_masking(B, T, hw, 0.75, 'cpu', noise=noise), mask)  # noise-determined


def test_tube_mask_uniform_over_positions():
    torch.manual_seed(0)
    mask = vm.tube_masking(4000, 1, 16, 0.75, 'cpu')
    assert (mask.float().mean(0) - 0.75).abs().max() < 0.04


def test_token_order_matches_conv3d_and_patchify():
    """Mark one tubelet (temporal slice ti, row hi, column wi) and find it among the tokens: the Conv3d's flatten,
    common.patchify (the loss target) and the tube mask's index t*hw + s must all name the same token."""
    model = tiny(size=(32, 48), T=6)  # 3 x 4 x 6 tokens: non-square, 3 temporal slices
    gh, gw, T_tok = 4, 6, 3
    p, t = 8, 2
    conv = model.encoder.patch_embed
    for ti, hi, wi in [(0, 0, 1), (1, 2, 5), (2, 3, 0)]:
        v = torch.zeros(1, 3, 6, 32, 48)
        v[:, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p] = 1.0
        want = ti * gh * gw + hi * gw + wi
        with torch.no_grad():
            tok = conv(v) - conv.proj.bias  # (1, N, D): zero except the marked tubelet's token
        assert torch.nonzero(tok.abs().sum(-1)[0]).flatten().tolist() == [want]
        target = common.patchify(v, p, t)
        assert torch.nonzero(target.abs().sum(-1)[0]).flatten().tolist() == [want]
        s = hi * gw + wi  # spatial position; its tube is tokens s, hw + s, 2hw + s
        noise = torch.ones(1, gh * gw)
        noise[0, s] = 0.0  # smallest noise: masked
        mask = vm.tube_masking(1, T_tok, gh * gw, 1.5 / (gh * gw), 'cpu', noise=noise)  # int(1.5) = 1 hidden
        assert torch.nonzero(mask[0]).flatten().tolist() == [k * gh * gw + s for k in range(T_tok)]


# --------------------------------------------------------------------------- 3. encoder / decoder


def test_model_equals_reference_forward_with_boolean_indexing():
    model = tiny().eval()
    videos, noise = clips(3), noise_for(3, 16)
    with torch.no_grad():
        loss, out = model(videos, 0.9, noise)
        mask = vm.tube_masking(3, 2, 16, 0.9, 'cpu', noise=noise)
        assert torch.equal(out['mask'], mask)
        want = ref_forward(model, videos, mask)
    assert out['pred'].shape == want.shape == (3, 2 * 14, 2 * 8 * 8 * 3)  # N_mask tokens only
    torch.testing.assert_close(out['pred'], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss(videos, want, mask, 8), rtol=1e-5, atol=1e-6)


def test_encoder_sees_only_visible_tokens():
    model = tiny().eval()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    model.decoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with torch.no_grad():
        model(clips(2), 0.9)
    assert seen == [(2, 2 * 2, TINY[1]), (2, 32, TINY[4])]  # 2 visible per slice x 2 slices; decoder sees all 32


def test_encoder_output_ignores_masked_pixels():
    model = tiny().eval()
    videos, noise = clips(2), noise_for(2, 16)
    mask = vm.tube_masking(2, 2, 16, 0.9, 'cpu', noise=noise)
    ids = mask.to(torch.int8).argsort(dim=1, stable=True)
    s_mask = int(torch.nonzero(mask[0, :16])[0])
    s_vis = int(torch.nonzero(~mask[0, :16])[0])

    def perturbed(s, ti=1):
        out = videos.clone()
        r, c = divmod(s, 4)
        out[0, :, 2 * ti:2 * ti + 2, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 5 * torch.randn(3, 2, 8, 8)
        return out
    with torch.no_grad():
        base = model.forward_encoder(videos, ids[:, :4])
        lat_m = model.forward_encoder(perturbed(s_mask), ids[:, :4])
        lat_v = model.forward_encoder(perturbed(s_vis), ids[:, :4])
    torch.testing.assert_close(lat_m, base, rtol=0, atol=1e-6)  # a hidden tubelet never reaches the encoder
    assert (lat_v[0] - base[0]).abs().max() > 1e-3  # a visible one does
    torch.testing.assert_close(lat_v[1], base[1])  # only in its own sample


def test_decoder_gives_each_mask_token_its_own_position():
    """With no decoder blocks each output is head(norm(mask_token + pos_embed[token])), in ascending token order."""
    model = tiny().eval()
    model.decoder.blocks = nn.ModuleList()
    with torch.no_grad():
        model.mask_token.normal_()
        _, out = model(clips(2), 0.9, noise_for(2, 16))
        head = lambda x: model.decoder.head(model.decoder.norm(x))  # noqa: E731
        for b in range(2):
            masked = torch.nonzero(out['mask'][b]).flatten()
            torch.testing.assert_close(out['pred'][b], head(model.mask_token[0] + model.pos_embed[0, masked]))


# --------------------------------------------------------------------------- 4. loss


@pytest.mark.parametrize('norm_pix', [True, False])
@pytest.mark.parametrize('contrast', [1.0, 1e-3])  # low contrast: the 1e-6 is added to the std, not the variance
def test_loss_equals_reference(norm_pix, contrast):
    p, t, B, T, H, W = 8, 2, 3, 6, 32, 48
    videos = clips(B, T, H, W) * contrast
    N, hw = (T // t) * (H // p) * (W // p), (H // p) * (W // p)
    mask = vm.tube_masking(B, T // t, hw, 0.9, 'cpu', noise=noise_for(B, hw))
    ids_mask = mask.to(torch.int8).argsort(dim=1, stable=True)[:, N - int(mask[0].sum()):]
    pred = torch.randn(B, ids_mask.shape[1], t * p * p * 3, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1, 1), torch.tensor(STD).view(1, 3, 1, 1, 1)
    got = vm.forward_loss(videos, pred, ids_mask, p, t, mean, std, norm_pix)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref_loss(videos, pred, mask, p, t, norm_pix), rtol=1e-5, atol=1e-6)


def test_target_layout_channel_last_per_tubelet_and_channel():
    """Written-out index arithmetic, independent of any reshape: target[b, n, ((dt*p + i)*p + j)*C + c] is pixel
    (c, slice*t + dt, row*p + i, col*p + j); normalisation per tubelet AND per channel with the unbiased std."""
    p, t, C, T, H, W = 2, 2, 3, 4, 4, 6
    x01 = torch.rand(1, C, T, H, W, generator=torch.Generator().manual_seed(3))  # pixels in [0, 1]
    zero, one = torch.zeros(1, C, 1, 1, 1), torch.ones(1, C, 1, 1, 1)
    gh, gw = H // p, W // p
    N = (T // t) * gh * gw
    ids_all = torch.arange(N)[None]
    K = t * p * p * C
    # read the target back through the loss: zero loss iff the prediction equals it
    want = torch.empty(1, N, K)
    for n in range(N):
        s, rem = divmod(n, gh * gw)
        r, c_ = divmod(rem, gw)
        for dt in range(t):
            for i in range(p):
                for j in range(p):
                    for c in range(C):
                        want[0, n, ((dt * p + i) * p + j) * C + c] = x01[0, c, s * t + dt, r * p + i, c_ * p + j]
    assert vm.forward_loss(x01, want, ids_all, p, t, zero, one, False) < 1e-12
    normed = want.view(1, N, t * p * p, C)
    normed = ((normed - normed.mean(2, keepdim=True)) / (normed.var(2, unbiased=True, keepdim=True).sqrt() + 1e-6))
    assert vm.forward_loss(x01, normed.reshape(1, N, K), ids_all, p, t, zero, one, True) < 1e-10
    per_tubelet = (want - want.mean(-1, keepdim=True)) / (want.var(-1, keepdim=True) + 1e-6).sqrt()  # MAE-style
    assert vm.forward_loss(x01, per_tubelet, ids_all, p, t, zero, one, True) > 1e-3
    biased = want.view(1, N, -1, C)
    biased = ((biased - biased.mean(2, keepdim=True)) / (biased.var(2, unbiased=False, keepdim=True).sqrt() + 1e-6))
    assert vm.forward_loss(x01, biased.reshape(1, N, K), ids_all, p, t, zero, one, True) > 1e-4
    channel_first = want.view(1, N, -1, C).transpose(2, 3).reshape(1, N, K)
    assert vm.forward_loss(x01, channel_first, ids_all, p, t, zero, one, False) > 1e-3


def test_target_denormalises_with_mean_std():
    """The target is built from pixels in [0, 1]: the same video normalised with other statistics gives the same
    un-normalised target when the loss is told those statistics."""
    p, t = 8, 2
    x01 = torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ids = torch.arange(8)[None].expand(2, -1)
    pred = torch.zeros(2, 8, t * p * p * 3)
    for mean, std in [(MEAN, STD), ((0.5, 0.5, 0.5), (0.25, 0.3, 0.2))]:
        m, s = torch.tensor(mean).view(1, 3, 1, 1, 1), torch.tensor(std).view(1, 3, 1, 1, 1)
        loss = vm.forward_loss((x01 - m) / s, pred, ids, p, t, m, s, False)
        torch.testing.assert_close(loss, (x01 ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_constant_tubelet_target_is_finite():
    """std 0: (x - mean) / (0 + 1e-6) stays finite; it is 0 up to the rounding of the mean (|x - mean| <= ulp(x)
    ~ 1e-7, so the target stays below ~0.1), as in the reference."""
    p, t = 8, 2
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1, 1), torch.tensor(STD).view(1, 3, 1, 1, 1)
    ids = torch.arange(8)[None]
    for value in (0.7, 0.3, -1.9, 2.2):
        videos = clips(1, 4, 16, 16)
        videos[:, :, 0:2, 0:8, 0:8] = value  # token 0: one constant tubelet, in normalised units
        zero_pred = torch.zeros(1, 8, t * p * p * 3, requires_grad=True)
        loss = vm.forward_loss(videos, zero_pred, ids, p, t, mean, std, True)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zero_pred.grad).all()
        token0 = zero_pred.grad[0, 0] * loss.new_tensor(8 * t * p * p * 3) / -2  # = target of token 0
        assert token0.abs().max() < 0.25, value  # ulp(x) / 1e-6 at most
        assert zero_pred.grad[0, 1:].abs().max() > 1e-3  # the other tubelets have real targets
    model = tiny(16)
    loss, out = model(torch.full((2, 3, 4, 16, 16), 0.3), 0.9)  # every tubelet constant
    assert torch.isfinite(loss) and loss.item() < 1.0
    loss.backward()
    assert all(torch.isfinite(p_.grad).all() for p_ in model.parameters())


def test_loss_depends_only_on_hidden_tubelets():
    """Changing the pixels of a visible tubelet leaves the loss unchanged; changing a hidden one changes it."""
    p, t, B = 8, 2, 2
    videos = clips(B, 4, 32, 32)
    mask = vm.tube_masking(B, 2, 16, 0.75, 'cpu', noise=noise_for(1, 16).expand(B, -1))  # same tube mask for both
    ids_mask = mask.to(torch.int8).argsort(dim=1, stable=True)[:, 32 - 24:]
    pred = ref_target(videos, p, t)[mask].reshape(B, 24, -1)  # the exact answer: loss ~ 0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1, 1), torch.tensor(STD).view(1, 3, 1, 1, 1)
    base = vm.forward_loss(videos, pred, ids_mask, p, t, mean, std, True)
    assert base < 1e-10

    def bumped(token):
        v = videos.clone()
        ti, s = divmod(token, 16)
        r, c = divmod(s, 4)
        v[:, :, 2 * ti:2 * ti + 2, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn(B, 3, 2, p, p)
        return vm.forward_loss(v, pred, ids_mask, p, t, mean, std, True)
    for token in torch.nonzero(~mask[0]).flatten().tolist():  # every visible tubelet, both time slices
        assert torch.equal(bumped(token), base), token
    for token in torch.nonzero(mask[0]).flatten().tolist()[:4]:
        assert bumped(token).item() > 1e-3, token


def test_mask_ratio_zero_gives_zero_loss_not_nan():
    model = tiny()
    loss, out = model(clips(2), 0.0)
    assert out['pred'].shape == (2, 0, 384) and not out['mask'].any()
    assert loss.item() == 0.0


# --------------------------------------------------------------------------- 5. init


def test_init_matches_reference():
    torch.manual_seed(0)
    model = vm.VideoMAE(16, 8, 64, 1, 2, 512, 1, 4, num_frames=4)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != 'encoder_to_decoder':  # encoder/decoder _init_weights
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound + 1e-7, name
            assert m.weight.abs().max() > 0.9 * bound, name  # uniform over the whole xavier range
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, nn.LayerNorm):
            assert (m.weight == 1).all() and not m.bias.any() and m.eps == 1e-6, name
    for blk in [*model.encoder.blocks, *model.decoder.blocks]:
        assert blk.attn.qkv.bias is None and not blk.attn.q_bias.any() and not blk.attn.v_bias.any()
        assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == 'none'
    # encoder_to_decoder sits outside both _init_weights calls: PyTorch's default Linear init, U(+-1/sqrt(fan_in))
    e2d = model.encoder_to_decoder.weight
    assert model.encoder_to_decoder.bias is None
    assert 0.9 / math.sqrt(64) < e2d.abs().max() <= 1 / math.sqrt(64) + 1e-7
    assert e2d.abs().max() > math.sqrt(6 / (64 + 512))  # beyond the xavier bound: not xavier-initialised
    # Conv3d keeps PyTorch's default too: U(+-1/sqrt(fan_in)), fan_in = C*t*p*p
    w = model.encoder.patch_embed.proj.weight
    assert w.shape == (64, 3, 2, 8, 8)
    assert 0.9 / math.sqrt(384) < w.abs().max() <= 1 / math.sqrt(384) + 1e-7
    # mask_token: timm trunc_normal(std=.02) through the reference's wrapper, which cuts at a=-std, b=std
    mt = model.mask_token
    assert mt.abs().max() <= 0.02 and mt.abs().max() > 0.019
    assert 0.0095 < mt.std().item() < 0.0125  # std of N(0, .02) truncated at +-1 sigma: 0.0108


# --------------------------------------------------------------------------- 6. state dict and weight decay


def _block_keys(prefix, i):
    keys = {f'{prefix}.blocks.{i}.attn.{k}' for k in ('q_bias', 'v_bias', 'qkv.weight')}
    for m in ('norm1', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
        keys |= {f'{prefix}.blocks.{i}.{m}.weight', f'{prefix}.blocks.{i}.{m}.bias'}
    return keys


REF_KEYS_1_1 = ({'encoder.patch_embed.proj.weight', 'encoder.patch_embed.proj.bias', 'encoder.norm.weight',
                 'encoder.norm.bias', 'encoder_to_decoder.weight', 'mask_token', 'decoder.norm.weight',
                 'decoder.norm.bias', 'decoder.head.weight', 'decoder.head.bias'}
                | _block_keys('encoder', 0) | _block_keys('decoder', 0))


def test_state_dict_keys_and_shapes_match_reference():
    model = small(dim=16, dec_dim=8)
    sd = model.state_dict()
    assert set(sd) == REF_KEYS_1_1  # PretrainVisionTransformer with 1 encoder and 1 decoder block
    assert sd['encoder.patch_embed.proj.weight'].shape == (16, 3, 2, 8, 8)
    assert sd['encoder.blocks.0.attn.qkv.weight'].shape == (48, 16)
    assert sd['encoder.blocks.0.attn.q_bias'].shape == (16,)
    assert sd['encoder_to_decoder.weight'].shape == (8, 16)
    assert sd['mask_token'].shape == (1, 1, 8)
    assert sd['decoder.head.weight'].shape == (2 * 8 * 8 * 3, 8)
    deep = vm.VideoMAE(16, 8, 16, 3, 2, 8, 2, 2, num_frames=4).state_dict()
    assert set(deep) == (REF_KEYS_1_1 | _block_keys('encoder', 1) | _block_keys('encoder', 2)
                         | _block_keys('decoder', 1))


def test_encoder_export_is_the_finetuning_layout():
    model = small()
    enc = vm.encoder_state_dict(model)
    want = {k[len('encoder.'):] for k in REF_KEYS_1_1 if k.startswith('encoder.')}
    assert set(enc) == want and 'patch_embed.proj.weight' in enc and 'blocks.0.attn.q_bias' in enc
    for k, v in enc.items():
        assert torch.equal(v, model.state_dict()['encoder.' + k])
    # run_class_finetuning.py strips 'encoder.' itself: the full checkpoint gives the same dict
    stripped = {k[8:]: v for k, v in model.state_dict().items() if k.startswith('encoder.')}
    assert set(stripped) == set(enc)


def test_load_reference_style_checkpoint(tmp_path):
    src = small(seed=1)
    path = tmp_path / 'checkpoint-799.pth'  # what the reference's utils.save_model writes
    ns = argparse.Namespace(model='pretrain_videomae_base_patch16_224', mask_ratio=0.9, normlize_target=True)
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'epoch': 799, 'scaler': {}, 'args': ns}, path)
    fresh = small(seed=2)
    res = common.load_weights(fresh, path)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    videos, noise = clips(2, 4, 16, 16), noise_for(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(videos, 0.5, noise)[0], src(videos, 0.5, noise)[0])


def test_param_groups_match_reference_no_weight_decay():
    model = small()
    groups = common.param_groups(model, 0.05, skip=('mask_token',))
    assert [g['weight_decay'] for g in groups] == [0.0, 0.05]
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[0]['params']}
    decay = {names[id(p)] for p in groups[1]['params']}
    # optim_factory.get_parameter_groups with skip = model.no_weight_decay() = {pos_embed, cls_token, mask_token}
    want_no = {n for n, p in model.named_parameters()
               if p.ndim == 1 or n.endswith('.bias') or n in ('pos_embed', 'cls_token', 'mask_token')}
    assert no_decay == want_no and decay == set(names.values()) - want_no
    assert {'mask_token', 'encoder.blocks.0.attn.q_bias', 'encoder.blocks.0.attn.v_bias', 'encoder.norm.weight',
            'decoder.head.bias', 'encoder.patch_embed.proj.bias'} <= no_decay
    assert {'encoder.patch_embed.proj.weight', 'encoder.blocks.0.attn.qkv.weight', 'encoder_to_decoder.weight',
            'decoder.blocks.0.mlp.fc1.weight', 'decoder.head.weight'} <= decay


def test_presets_and_vit_base_sizes():
    assert vm.MODELS['small'] == (16, 384, 12, 6, 192, 4, 3)
    assert vm.MODELS['base'] == (16, 768, 12, 12, 384, 4, 6)
    assert vm.MODELS['large'] == (16, 1024, 24, 16, 512, 4, 8)
    assert vm.MODELS['huge'] == (16, 1280, 32, 16, 640, 4, 8)
    torch.manual_seed(0)
    model = vm.VideoMAE(224, *vm.MODELS['base'], num_frames=16)
    assert model.t_tokens * model.hw == 1568 and model.pos_embed.shape == (1, 1568, 384)
    assert model.decoder.head.out_features == 1536
    enc = sum(v.numel() for v in vm.encoder_state_dict(model).values())
    # ViT-B: Conv3d 768*3*2*16*16 + 768; 12 blocks of (qkv 3*768*768 + q/v bias 2*768 + proj, norms, mlp); norm
    block = 3 * 768 * 768 + 2 * 768 + 768 * 768 + 768 + 2 * 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768
    assert enc == 768 * 1536 + 768 + 12 * block + 2 * 768  # the fine-tuning backbone without fc_norm/head


# --------------------------------------------------------------------------- 7. forward / backward / optimisation


def test_forward_backward_shapes_tiny():
    model = tiny(size=(32, 48), T=4)
    model.train()
    loss, out = model(clips(2, 4, 32, 48), 0.9)
    assert model.hw == 24 and model.t_tokens == 2
    assert out['mask'].shape == (2, 48) and (out['mask'].sum(1) == 2 * int(0.9 * 24)).all()
    assert out['pred'].shape == (2, 2 * 21, 384)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.mask_token.grad.abs().sum() > 0 and model.encoder.blocks[0].attn.q_bias.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.v_bias.grad.abs().sum() > 0


def test_in_chans_one():
    model = tiny(in_chans=1)
    videos = clips(2, 4, 32, 32, C=1)
    loss, out = model(videos, 0.9, noise_for(2, 16))
    assert out['pred'].shape == (2, 28, 128)
    want = ref_loss(videos, out['pred'], out['mask'], 8, 2, True, (0.5,), (0.25,))
    torch.testing.assert_close(loss, want)


def test_adamw_steps_lower_the_loss():
    model = tiny()
    ds = vm.SyntheticVideos(8, 4, 32)
    videos = common.normalize(torch.stack([ds[i][0] for i in range(8)]), MEAN, STD)
    noise = noise_for(8, 16)
    opt = torch.optim.AdamW(common.param_groups(model, 0.05, skip=('mask_token',)), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(25):
        loss, _ = model(videos, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final, _ = model(videos, 0.75, noise)
    assert all(math.isfinite(v) for v in losses)
    assert final.item() < 0.7 * losses[0], (losses[0], final.item())


# --------------------------------------------------------------------------- 8. clip sampling


def ref_frame_ids(num_frames_video, new_length, new_step, start):
    """kinetics.py VideoMAE._sample_train_indices (num_segments 1, no jitter) + _video_TSN_decord_batch_loader,
    with np.random.randint(average_duration) replaced by `start`."""
    skip_length = new_length * new_step
    average_duration = (num_frames_video - skip_length + 1) // 1
    if average_duration > 0:
        offsets = np.array([0]) + start
    elif num_frames_video > max(1, skip_length):
        raise AssertionError('unreachable with one segment')
    else:
        offsets = np.zeros((1,))
    segment_indices, skip_offsets = offsets + 1, np.zeros(skip_length // new_step, dtype=int)
    frame_id_list = []
    for seg_ind in segment_indices:
        offset = int(seg_ind)
        for i, _ in enumerate(range(0, skip_length, new_step)):
            if offset + skip_offsets[i] <= num_frames_video:
                frame_id = offset + skip_offsets[i] - 1
            else:
                frame_id = offset - 1
            frame_id_list.append(frame_id)
            if offset + new_step < num_frames_video:
                offset += new_step
    return frame_id_list


class FixedStart:
    def __init__(self, start):
        self.start, self.calls = start, []

    def randrange(self, n):
        self.calls.append(n)
        return self.start


@pytest.mark.parametrize('n', [1, 2, 5, 9, 10, 16, 17, 30, 63, 64, 65, 100, 300])
@pytest.mark.parametrize('T,s', [(16, 4), (16, 2), (8, 1), (4, 3)])
def test_clip_indices_match_reference(n, T, s):
    avg = n - T * s + 1
    for start in ([0, avg // 2, avg - 1] if avg > 0 else [0]):
        rng = FixedStart(start)
        ids = vm.clip_indices(n, T, s, rng)
        assert ids == ref_frame_ids(n, T, s, start), (n, T, s, start)
        assert rng.calls == ([avg] if avg > 0 else [])
        assert len(ids) == T and all(0 <= i < n for i in ids) and ids == sorted(ids)


def test_clip_indices_long_video():
    rng = random.Random(0)
    starts = []
    for _ in range(3000):
        ids = vm.clip_indices(100, 16, 4, rng)
        assert ids == [ids[0] + 4 * i for i in range(16)]  # every 4th frame, no jitter
        starts.append(ids[0])
    assert min(starts) == 0 and max(starts) == 100 - 64  # start ~ randint(n - T*s + 1)
    counts = np.bincount(starts, minlength=37)
    assert counts.min() > 40  # every start drawn, roughly uniformly (3000/37 = 81 each)


def test_clip_indices_short_video_repeats_last_frame_reached():
    rng = random.Random(0)
    assert vm.clip_indices(10, 16, 4, rng) == [0, 4, 8] + [8] * 13
    assert vm.clip_indices(9, 16, 4, rng) == [0, 4] + [4] * 14  # the reference never steps onto frame n-1
    for start in range(4):  # 20 frames, 16 x stride 1: start in 0..4
        assert vm.clip_indices(20, 16, 1, FixedStart(start)) == list(range(start, start + 16))
    assert vm.clip_indices(20, 16, 1, FixedStart(4)) == list(range(4, 19)) + [18]  # again not the last frame
    assert vm.clip_indices(3, 4, 1, rng) == [0, 1, 1, 1]
    assert vm.clip_indices(1, 4, 2, rng) == [0, 0, 0, 0]


# --------------------------------------------------------------------------- 9. multi-scale crop


def ref_sample_crop_size(im_size, input_size, rng, scales=(1, .875, .75, .66), max_distort=1):
    """transforms.py GroupMultiScaleCrop._sample_crop_size + fill_fix_offset(more_fix_crop=True), `random` -> rng.
    input_size is (w, h) as in the reference."""
    image_w, image_h = im_size
    base_size = min(image_w, image_h)
    crop_sizes = [int(base_size * x) for x in scales]
    crop_h = [input_size[1] if abs(x - input_size[1]) < 3 else x for x in crop_sizes]
    crop_w = [input_size[0] if abs(x - input_size[0]) < 3 else x for x in crop_sizes]
    pairs = []
    for i, h in enumerate(crop_h):
        for j, w in enumerate(crop_w):
            if abs(i - j) <= max_distort:
                pairs.append((w, h))
    crop_pair = rng.choice(pairs)
    w_step, h_step = (image_w - crop_pair[0]) // 4, (image_h - crop_pair[1]) // 4
    ret = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step),
           (0, 2 * h_step), (4 * w_step, 2 * h_step), (2 * w_step, 4 * h_step), (2 * w_step, 0 * h_step),
           (1 * w_step, 1 * h_step), (3 * w_step, 1 * h_step), (1 * w_step, 3 * h_step), (3 * w_step, 3 * h_step)]
    w_offset, h_offset = rng.choice(ret)
    return crop_pair[0], crop_pair[1], w_offset, h_offset


@pytest.mark.parametrize('W,H,out', [(320, 240, (224, 224)), (340, 256, (224, 224)), (226, 300, (224, 224)),
                                     (64, 48, (32, 32)), (500, 375, (112, 160))])
def test_multiscale_crop_matches_reference(W, H, out):
    seen_pairs, seen_offsets = set(), set()
    for seed in range(400):
        left, top, cw, ch = vm.multiscale_crop_params(W, H, out, random.Random(seed))
        rw, rh, rl, rt = ref_sample_crop_size((W, H), (out[1], out[0]), random.Random(seed))
        assert (left, top, cw, ch) == (rl, rt, rw, rh)
        assert 0 <= left and left + cw <= W and 0 <= top and top + ch <= H
        seen_pairs.add((cw, ch))
        seen_offsets.add((left, top))
    sizes = [int(min(W, H) * s) for s in (1, .875, .75, .66)]
    snap_w = [out[1] if abs(x - out[1]) < 3 else x for x in sizes]
    snap_h = [out[0] if abs(x - out[0]) < 3 else x for x in sizes]
    allowed = {(snap_w[j], snap_h[i]) for i in range(4) for j in range(4) if abs(i - j) <= 1}
    assert seen_pairs == allowed and len(allowed) <= 10  # 4 + 3 + 3 (w, h) pairs, scale indices <= 1 apart
    assert 13 * 2 <= len(seen_offsets)  # 13 fixed offsets per crop size


def test_multiscale_crop_snapping_and_clamp():
    # 226 px: int(226) = 226 is within 3 of 224 and snaps to it; the other scales do not
    W = H = 226
    boxes = {vm.multiscale_crop_params(W, H, (224, 224), random.Random(s))[2:] for s in range(300)}
    assert (224, 224) in boxes and (226, 226) not in boxes
    assert {w for w, _ in boxes} <= {224, int(226 * .875), int(226 * .75), int(226 * .66)}
    # 222 px: snapping to 224 would cross the frame edge (reference: black padding); clamped to the frame
    for s in range(200):
        left, top, cw, ch = vm.multiscale_crop_params(222, 222, (224, 224), random.Random(s))
        assert cw <= 222 and ch <= 222 and left >= 0 and top >= 0 and left + cw <= 222 and top + ch <= 222


def test_multiscale_crop_offsets_are_the_13_fixed_positions():
    W, H = 400, 300
    for s in range(300):
        left, top, cw, ch = vm.multiscale_crop_params(W, H, (224, 224), random.Random(s))
        ws, hs = (W - cw) // 4, (H - ch) // 4
        grid = {(a * ws, b * hs) for a, b in [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
                                             (1, 1), (3, 1), (1, 3), (3, 3)]}
        assert (left, top) in grid


# --------------------------------------------------------------------------- 10. VideoFolders / SyntheticVideos


def frame(colour, size=(40, 30)):
    return Image.new('RGB', size, tuple(int(c) for c in colour))


def write_video(folder, n, size=(40, 30), ext='png', colour=lambda k: (k * 20 % 256, 255 - k * 20 % 256, 80)):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        frame(colour(k), size).save(folder / f'img_{k + 1:05d}.{ext}')
    return folder


def test_video_folders_discovery_labels_and_frame_order(tmp_path):
    root = tmp_path / 'data'
    write_video(root / 'train' / 'cls_b' / 'v1', 6)
    write_video(root / 'train' / 'cls_a' / 'deep' / 'nested' / 'v2', 5)
    write_video(root / 'train' / 'cls_a' / 'v3', 4, ext='jpg')
    write_video(root / 'other' / 'ignored', 4)  # outside train/
    (root / 'train' / 'cls_a' / 'notes').mkdir()
    (root / 'train' / 'cls_a' / 'notes' / 'readme.txt').write_text('no frames here')
    ds = vm.VideoFolders(root, num_frames=4, sampling_rate=1, size=16, seed=0)
    paths = [str(Path(v).relative_to(root / 'train')) for v in ds.files]
    assert paths == ['cls_a/deep/nested/v2', 'cls_a/v3', 'cls_b/v1']
    assert ds.labels == [0, 0, 1]
    # frames in name order: write a video whose names sort differently from creation order
    v = root / 'train' / 'cls_b' / 'v1'
    for f in v.iterdir():
        f.unlink()
    for k in [3, 0, 7, 2, 5, 1, 6, 4]:  # created out of order; the grey level encodes the frame index
        Image.new('RGB', (40, 30), (30 * k, 30 * k, 30 * k)).save(v / f'img_{k + 1:05d}.png')
    ds = vm.VideoFolders(root, num_frames=4, sampling_rate=2, size=16, seed=0)
    clip, label, skipped = ds[2]  # 8 frames, 4 x stride 2: the only start is 0 -> frames 0, 2, 4, 6
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.uint8 and label == 1 and skipped == -1
    assert [int(clip[0, k].float().mean().round()) for k in range(4)] == [0, 60, 120, 180]


def test_video_folders_flat_and_gif(tmp_path):
    root = tmp_path / 'flat'
    write_video(root, 3)  # the root itself holds frames: one video, label 0
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    gif_frames = [Image.new('RGB', (24, 20), c) for c in colours]
    gif_frames[0].save(root / 'anim.GIF', save_all=True, append_images=gif_frames[1:], duration=40, loop=0)
    ds = vm.VideoFolders(root, num_frames=4, sampling_rate=1, size=(16, 8), seed=0)
    assert len(ds) == 2 and ds.labels == [0, 0]
    gif_idx = [i for i, v in enumerate(ds.files) if v.endswith('.GIF')]
    assert len(gif_idx) == 1
    starts = set()
    for epoch in range(8):
        clip, _, skipped = ds[(epoch, gif_idx[0])]
        assert clip.shape == (3, 4, 16, 8) and skipped == -1
        ids = vm.clip_indices(5, 4, 1, random.Random(f'0-{epoch}-{gif_idx[0]}'))
        starts.add(ids[0])
        for k in range(4):  # frame k of the clip is GIF frame ids[k]
            got = clip[:, k].float().mean((1, 2))
            assert (got - torch.tensor(colours[ids[k]], dtype=torch.float)).abs().max() <= 3, (epoch, k)
    assert starts == {0, 1}


def test_video_folders_unreadable_and_empty_are_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / 'data'
    write_video(root / 'a_good', 4)
    bad = write_video(root / 'b_bad', 4)
    (bad / 'img_00003.png').write_bytes(b'not a png at all')
    write_video(root / 'c_good', 4, colour=lambda k: (10, 200, 30))
    (root / 'd_empty').mkdir()
    ds = vm.VideoFolders(root, num_frames=4, sampling_rate=1, size=16, seed=0)
    err = capsys.readouterr().err
    assert 'skipping 1 folder(s) without frames' in err and 'd_empty' in err
    assert len(ds) == 3
    clip, label, bad = ds[1]  # b_bad -> replaced by the next video, c_good; its own index reported
    assert bad == 1
    assert torch.equal(clip, ds[2][0])
    err = capsys.readouterr().err
    assert 'skipping unreadable video' in err and 'b_bad' in err
    assert ds[0][2] == -1 and ds[2][2] == -1


def test_video_folders_missing_or_empty_root(tmp_path):
    with pytest.raises(SystemExit) as e:
        vm.VideoFolders(tmp_path / 'nope', 4, 1, 16)
    assert 'does not exist' in str(e.value.code)
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'x.txt').write_text('hi')
    with pytest.raises(SystemExit) as e:
        vm.VideoFolders(tmp_path / 'empty', 4, 1, 16)
    assert 'no videos' in str(e.value.code)


def test_one_crop_for_every_frame_of_a_clip(tmp_path):
    """Frames that are all the same noise picture come out identical only if every frame gets the same box; the
    box and the frame indices are the ones drawn from random.Random(f'{seed}-{epoch}-{index}')."""
    noise = np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)
    v = tmp_path / 'data' / 'vid'
    v.mkdir(parents=True)
    for k in range(12):
        Image.fromarray(noise).save(v / f'img_{k:05d}.png')
    ds = vm.VideoFolders(tmp_path / 'data', num_frames=4, sampling_rate=2, size=(24, 32), seed=3)
    boxes = set()
    for epoch in range(8):
        clip, _, _ = ds[(epoch, 0)]
        assert clip.shape == (3, 4, 24, 32)
        for k in range(1, 4):
            assert torch.equal(clip[:, k], clip[:, 0])
        rng = random.Random(f'3-{epoch}-0')
        vm.clip_indices(12, 4, 2, rng)
        left, top, cw, ch = vm.multiscale_crop_params(60, 45, (24, 32), rng)
        boxes.add((left, top, cw, ch))
        want = np.asarray(Image.fromarray(noise).resize((32, 24), Image.BILINEAR, box=(left, top, left + cw, top + ch)))
        assert np.array_equal(clip[:, 0].permute(1, 2, 0).numpy(), want)
    assert len(boxes) > 1  # the crop changes with the epoch
    assert torch.equal(ds[(5, 0)][0], ds[(5, 0)][0])  # and is a pure function of (seed, epoch, index)


def test_jpeg_frames_decoded_with_draft(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin
    v = tmp_path / 'data' / 'vid'
    v.mkdir(parents=True)
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([x / 640 * 255, y / 480 * 255, np.full_like(x, 128.0)], -1).astype(np.uint8)
    for k in range(4):
        Image.fromarray(smooth).save(v / f'img_{k:05d}.jpg', quality=95)
    calls = []
    orig = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft',
                        lambda self, mode, size: calls.append(size) or orig(self, mode, size))
    ds = vm.VideoFolders(tmp_path / 'data', num_frames=4, sampling_rate=1, size=32, seed=0)
    clip, _, _ = ds[0]
    rng = random.Random('0-0-0')
    ids = vm.clip_indices(4, 4, 1, rng)
    assert len(calls) == len(set(ids)) == 3  # every decoded JPEG frame asked for a reduced decode (0, 1, 2, 2)
    assert all(w < 640 // 4 for w, h in calls)  # small enough for a 1/4 or 1/8 draft
    left, top, cw, ch = vm.multiscale_crop_params(640, 480, (32, 32), rng)
    full = np.asarray(Image.open(v / 'img_00000.jpg').convert('RGB').resize((32, 32), Image.BILINEAR,
                                                                            box=(left, top, left + cw, top + ch)))
    diff = np.abs(clip[:, 0].permute(1, 2, 0).numpy().astype(int) - full.astype(int))
    assert diff.mean() < 3  # the reduced decode gives the same picture up to resampling detail


def test_synthetic_videos_deterministic_and_moving():
    ds = vm.SyntheticVideos(20, 8, (32, 48), seed=1)
    a, la, sa = ds[3]
    b, lb, _ = ds[(7, 3)]  # the epoch does not matter: the video is a function of (seed, index)
    assert a.shape == (3, 8, 32, 48) and a.dtype == torch.uint8 and sa == -1
    assert torch.equal(a, b) and la == lb and 0 <= la <= 2
    assert not torch.equal(ds[4][0], a)
    assert not torch.equal(vm.SyntheticVideos(20, 8, (32, 48), seed=2)[3][0], a)
    moving = sum(int(not torch.equal(ds[i][0][:, 0], ds[i][0][:, -1])) for i in range(20))
    assert moving >= 18  # shapes move between the first and last frame
    assert vm.SyntheticVideos(2, 4, 16, in_chans=1)[0][0].shape == (1, 4, 16, 16)


# --------------------------------------------------------------------------- 11. visualize


@pytest.mark.parametrize('norm_pix', [True, False])
def test_visualize_writes_png_keeps_rng_and_mode(tmp_path, norm_pix):
    model = tiny(size=(32, 48), T=6, norm_pix_loss=norm_pix)
    args = vm.Args(mask_ratio=0.9, norm_pix_loss=norm_pix)
    videos = clips(2, 6, 32, 48)
    model.train()
    state = torch.get_rng_state()
    path = tmp_path / 'vis.png'
    vm.visualize(model, videos, args, path)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    with Image.open(path) as im:
        w, h = im.size
        arr = np.asarray(im.convert('RGB'))
    assert w == 4 * (3 * 48 + 2) + 2  # 4 columns of 48-px frames enlarged x3
    assert h >= 2 * 4 * (3 * 32 + 2)  # 2 clips x 4 frames as rows
    assert arr.std() > 1
    model.eval()
    vm.visualize(model, videos, args, tmp_path / 'vis2.png')
    assert not model.training
    assert np.array_equal(arr, np.asarray(Image.open(tmp_path / 'vis2.png').convert('RGB')))
