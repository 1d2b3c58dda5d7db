"""Model-level tests for hivit.py against the facts of the HiViT reference (shared/methods/hivit.md).

Everything runs on the CPU with the 'micro' preset (8-px units of 2x2-px tokens) on 32x32 to 32x48 inputs; the
exceptions build HiViT-B once to count its parameters and check its hifeat width."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import hivit

MICRO = hivit.MODELS['micro']  # (unit px, D, depths, heads, dec D, dec depth, dec heads)
P, D = MICRO[0], MICRO[1]  # 8-px units, main width 128: stem widths 32 and 64
N_STEM = 2 * MICRO[2][0] + 1 + 2 * MICRO[2][1] + 1  # stem modules in `blocks` (MLP blocks and two merges)


def micro(img_size=32, in_chans=3, seed=0):
    torch.manual_seed(seed)
    return hivit.HiViTMAE(img_size, *MICRO, in_chans=in_chans)


def images(B=3, H=32, W=32, C=3, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def noise_for(B, N, seed=1):
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed))


def select(t, ids_keep):
    """t (B, N, ...) -> (B, N_vis, ...): the units ids_keep, by plain indexing (independent of torch.gather)."""
    return torch.stack([t[b, ids_keep[b]] for b in range(t.shape[0])])


def ref_loss(imgs, pred, mask, p):
    """The reference's forward_loss (norm-pix hard-coded), written out with an einsum patchify."""
    B, C, H, W = imgs.shape
    x = torch.einsum('nchpwq->nhwpqc', imgs.reshape(B, C, H // p, p, W // p, p)).reshape(B, -1, p * p * C)
    target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask.float()).sum() / mask.float().sum()


# --------------------------------------------------------------------------- 1. masking


@pytest.mark.parametrize('N,ratio,n_keep', [(196, 0.75, 49), (16, 0.75, 4), (24, 0.75, 6), (10, 0.9, 0), (7, 0.0, 7)])
def test_masking_exact_counts_and_order(N, ratio, n_keep):
    assert n_keep == int(N * (1 - ratio))  # the reference's floor
    B = 4
    noise = noise_for(B, N)
    ids_keep, ids_restore, mask = hivit.unit_masking(noise, ratio)
    assert ids_keep.shape == (B, n_keep) and ids_restore.shape == (B, N)
    assert mask.dtype == torch.bool and (mask.sum(1) == N - n_keep).all()
    for b in range(B):
        order = sorted(range(N), key=lambda i: noise[b, i].item())  # ascending noise: small = keep
        assert ids_keep[b].tolist() == order[:n_keep]
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(order[n_keep:])
        assert torch.equal(torch.tensor(order)[ids_restore[b]], torch.arange(N))  # ids_restore undoes the shuffle


def test_masking_fresh_per_step_and_per_sample():
    model = micro()
    torch.manual_seed(0)
    _, a = model(images(4), 0.75)
    _, b = model(images(4), 0.75)
    assert not torch.equal(a['mask'], b['mask'])
    assert not all(torch.equal(a['mask'][0], a['mask'][i]) for i in range(1, 4))
    assert (a['mask'].sum(1) == 12).all()  # 16 units, 4 visible


# --------------------------------------------------------------------------- 2. stem: unit-major, in-unit only


def test_patch_embed_is_unit_major():
    model = micro()
    imgs = images(2)
    with torch.no_grad():
        conv = model.patch_embed.proj(imgs)  # (2, 32, 16, 16): 2-px tokens, 4x4 per 8-px unit
        x = model.patch_embed(imgs)  # (2, 16, 4, 4, 32)
        ln = lambda v: F.layer_norm(v, (D // 4,), model.patch_embed.norm.weight, model.patch_embed.norm.bias, 1e-6)
    assert x.shape == (2, 16, 4, 4, D // 4)
    for n in (0, 5, 15):  # unit n = (row n // 4, col n % 4); inner (i, j) = (row, col) inside it
        for i, j in ((0, 0), (1, 2), (3, 1)):
            torch.testing.assert_close(x[1, n, i, j], ln(conv[1, :, 4 * (n // 4) + i, 4 * (n % 4) + j]))


def test_patch_merge_swin_order():
    merge = hivit.PatchMerge(3)
    x = torch.randn(1, 1, 2, 2, 3)
    with torch.no_grad():
        want = merge.reduction(merge.norm(torch.cat([x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 0, 0, 1], x[0, 0, 1, 1]])))
        torch.testing.assert_close(merge(x)[0, 0, 0, 0], want)  # 00, 10, 01, 11 (row, col)
    assert merge.reduction.bias is None and merge.reduction.weight.shape == (6, 12)


@pytest.mark.parametrize('name,img', [('micro', 32), ('micro', (32, 48)), ('tiny', 64)])
def test_visible_stem_features_equal_full_pass_then_select(name, img):
    """The property HiViT stands on: stem features (before each merge) and merged tokens of the visible units equal
    a full-image pass followed by selecting those units (to fp32 rounding: the two passes run matmuls of other
    sizes, which other CPUs may block differently); only the main stage differs."""
    torch.manual_seed(0)
    model = hivit.HiViTMAE(img, *hivit.MODELS[name]).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values too
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    H, W = common.pair(img)
    imgs = images(2, H, W)
    N = model.grid[0] * model.grid[1]
    ids_keep, _, _ = hivit.unit_masking(noise_for(2, N), 0.75)
    main_in = []
    model.blocks[len(model.blocks) - model.num_main_blocks].register_forward_pre_hook(lambda m, a: main_in.append(a[0]))
    with torch.no_grad():
        full = model.patch_embed(imgs)  # (2, N, 4, 4, C)
        feats_full, x_full = model.forward_stem(full)
        feats_vis, x_vis = model.forward_stem(select(full, ids_keep))
        model.forward_encoder(imgs, ids_keep)
    c1 = model.patch_embed.proj.out_channels
    assert [f.shape[-1] for f in feats_vis] == [16 * c1, 4 * 2 * c1]  # 4x4 tokens of C1, then 2x2 of 2 C1
    # features of magnitude <= ~6 after <= 6 stem layers with sums over <= 4C = 768 terms: fp32 rounding gives
    # <= 3e-6 (measured against float64); a unit leaking into another by 1e-4 of its size, or a wrong unit, fails
    for a, b in zip(feats_full + [x_full], feats_vis + [x_vis]):
        torch.testing.assert_close(select(a, ids_keep), b, rtol=1e-5, atol=1e-5)
    # and what the encoder feeds the main stage: the same merged tokens plus the gathered absolute positions (the
    # same computation on the same sizes as x_vis: exactly equal)
    assert torch.equal(main_in[0], x_vis + select(model.absolute_pos_embed.expand(2, -1, -1), ids_keep))
    with torch.no_grad():  # the main stage attends over the visible units only: it differs from full-then-select
        y_full, y_vis = x_full + model.absolute_pos_embed, main_in[0]
        for blk in model.blocks[-model.num_main_blocks:]:
            y_full, y_vis = blk(y_full), blk(y_vis)
    assert (select(y_full, ids_keep) - y_vis).abs().max() > 1e-3


def test_encoder_never_sees_masked_pixels():
    model = micro().eval()
    imgs, noise = images(2), noise_for(2, 16)
    ids_keep, _, mask = hivit.unit_masking(noise, 0.75)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, ids_keep)
        i_m, i_v = int(torch.nonzero(mask[0])[0]), int(torch.nonzero(~mask[0])[0])

        def perturbed(i):
            out = imgs.clone()
            out[0, :, P * (i // 4):P * (i // 4 + 1), P * (i % 4):P * (i % 4 + 1)] += 5 * torch.randn(3, P, P)
            return out
        lat_m, lat_v = model.forward_encoder(perturbed(i_m), ids_keep), model.forward_encoder(perturbed(i_v), ids_keep)
    assert latent.shape == (2, 4, 7 * D)
    assert torch.equal(lat_m, latent)  # a removed unit is dropped before the first block: exactly no effect
    assert (lat_v[0] - latent[0]).abs().max() > 1e-3 and torch.equal(lat_v[1], latent[1])


def test_hifeat_is_stem_features_and_main_output_normed():
    model = micro().eval()
    imgs, noise = images(2), noise_for(2, 16)
    ids_keep, _, _ = hivit.unit_masking(noise, 0.75)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, ids_keep)
        feats, x = model.forward_stem(select(model.patch_embed(imgs), ids_keep))
        x = x + select(model.absolute_pos_embed.expand(2, -1, -1), ids_keep)
        for blk in model.blocks[N_STEM:]:
            x = blk(x)
        h1 = feats[0].reshape(2, 4, 4, 4, D // 4)  # (row, col, channel) inside the unit, flattened
        want = torch.cat([h1.reshape(2, 4, -1), feats[1], x], -1)  # 16*32 + 4*64 + 128 = 896 = 7D
        want = F.layer_norm(want, (7 * D,), model.norm.weight, model.norm.bias, 1e-6)
    assert want.shape[-1] == 896
    torch.testing.assert_close(latent, want)


# --------------------------------------------------------------------------- 3. decoder


def test_decoder_unshuffles_mask_tokens_to_the_right_positions():
    model = micro().eval()
    model.decoder_blocks = nn.ModuleList()  # identity decoder: each output sees only its own token
    with torch.no_grad():
        model.mask_token.normal_()
    imgs, noise = images(2), noise_for(2, 16)
    ids_keep, ids_restore, mask = hivit.unit_masking(noise, 0.75)
    with torch.no_grad():
        latent = model.forward_encoder(imgs, ids_keep)
        pred = model.forward_decoder(latent, ids_restore)
        head = lambda t: model.decoder_pred(model.decoder_norm(t))  # noqa: E731
        emb, dpos = model.decoder_embed(latent), model.decoder_pos_embed[0]
        for b in range(2):
            for i in range(16):
                if mask[b, i]:
                    want = head(model.mask_token[0, 0] + dpos[i])
                else:
                    want = head(emb[b, ids_keep[b].tolist().index(i)] + dpos[i])
                torch.testing.assert_close(pred[b, i], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 4. loss


def test_loss_equals_written_out_reference():
    model = micro((32, 48))
    imgs, noise = images(2, 32, 48), noise_for(2, 24)
    loss, out = model(imgs, 0.75, noise)
    assert out['pred'].shape == (2, 24, P * P * 3) and (out['mask'].sum(1) == 18).all()
    torch.testing.assert_close(loss, ref_loss(imgs, out['pred'], out['mask'], P))
    # norm-pix per unit with the unbiased variance (channel-last patches), hand-checked on one unit
    pred = torch.zeros(1, 1, 12)
    img = torch.arange(12.).reshape(1, 2, 2, 3).permute(0, 3, 1, 2)  # 2x2 unit, channel-last values 0..11
    t = torch.arange(12.)
    want = (((t - t.mean()) / (t.var() + 1e-6) ** .5) ** 2).mean()  # = 11/12 (biased over unbiased var)
    torch.testing.assert_close(hivit.forward_loss(img, pred, torch.ones(1, 1, dtype=torch.bool), 2), want)
    torch.testing.assert_close(want, torch.tensor(11 / 12), rtol=1e-5, atol=0)


def test_loss_counts_masked_units_only():
    imgs, noise = images(2), noise_for(2, 16)
    _, _, mask = hivit.unit_masking(noise, 0.75)
    pred = torch.randn(2, 16, P * P * 3)
    loss = hivit.forward_loss(imgs, pred, mask, P)
    pv = pred.clone()
    pv[~mask] += 100.0  # visible units: the loss must not look
    assert torch.equal(hivit.forward_loss(imgs, pv, mask, P), loss)
    pm = pred.clone()
    pm[0, int(torch.nonzero(mask[0])[0])] += 1.0
    assert hivit.forward_loss(imgs, pm, mask, P) > loss
    x = common.patchify(imgs, P)
    tgt = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** .5
    per_unit = ((pred - tgt) ** 2).mean(-1)[mask]  # the 24 masked units' MSEs, by hand
    assert per_unit.numel() == 24
    torch.testing.assert_close(loss, per_unit.mean())
    assert hivit.forward_loss(imgs, pred, torch.zeros_like(mask), P) == 0  # nothing masked: 0, not NaN


# --------------------------------------------------------------------------- 5. init, positions, weight decay


def test_init_statistics():
    model = micro()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4 + 2 + 4 * 4 + 4 * 2 + 2  # stem fc1/fc2, merges, main and decoder blocks, embed/pred
    w = torch.cat([m.weight.flatten() for _, m in linears])
    assert abs(w.std().item() / 0.02 - 1) < 0.02 and w.abs().max() < 0.02 * 6  # trunc-normal(0.02), cut at +-2
    for n, m in linears:
        assert m.bias is None or torch.equal(m.bias, torch.zeros_like(m.bias)), n
    for n, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-6 and (m.weight == 1).all() and (m.bias == 0).all(), n
    conv = model.patch_embed.proj  # PyTorch's default init: U(+-1/sqrt(fan_in)) for weight and bias
    bound = 1 / math.sqrt(3 * (P // 4) ** 2)
    assert conv.weight.abs().max() <= bound and (conv.bias != 0).all() and conv.bias.abs().max() <= bound
    assert abs(model.mask_token.std().item() / 0.02 - 1) < 0.3 and model.mask_token.shape == (1, 1, MICRO[4])


@pytest.mark.parametrize('img', [32, (32, 48)])
def test_position_tables(img):
    model = micro(img)
    gh, gw = model.grid
    assert torch.equal(model.absolute_pos_embed[0], common.sincos_2d(D, gh, gw))  # no cls slot
    assert torch.equal(model.decoder_pos_embed[0], common.sincos_2d(MICRO[4], gh, gw))
    assert model.absolute_pos_embed.requires_grad  # as the reference (see the header), unlike mmpretrain
    assert not model.decoder_pos_embed.requires_grad


def test_param_groups_decay_the_pos_embed_and_mask_token():
    """timm add_weight_decay without skip list (the reference): 1-D and '.bias' undecayed, everything else decayed,
    the trainable absolute_pos_embed and the mask token included; the frozen decoder table is left out."""
    model = micro()
    groups = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = ({names[id(p)] for p in g['params']} for g in groups)
    assert {'absolute_pos_embed', 'mask_token', 'blocks.2.reduction.weight'} <= decay
    assert 'decoder_pos_embed' not in decay | no_decay
    assert decay == {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim <= 1}
    # the pos table learns: it gets a gradient and an AdamW step moves it (lr 1e-3, decay included)
    loss, _ = model(images(2), 0.75, noise_for(2, 16))
    loss.backward()
    assert model.absolute_pos_embed.grad.abs().sum() > 0
    before = model.absolute_pos_embed.detach().clone()
    torch.optim.AdamW(groups, lr=1e-3).step()
    assert not torch.equal(before, model.absolute_pos_embed)


# --------------------------------------------------------------------------- 6. keys, sizes, presets


def micro_reference_keys():
    """models_hivit_mae.HiViTMaskedAutoencoder(hifeat=True, rpe=False) keys for depths (1, 1, 4), decoder depth 2."""
    wb = ('weight', 'bias')
    keys = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'patch_embed.norm.weight', 'patch_embed.norm.bias',
            'absolute_pos_embed', 'norm.weight', 'norm.bias', 'decoder_embed.weight', 'decoder_embed.bias',
            'mask_token', 'decoder_pos_embed', 'decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight',
            'decoder_pred.bias', 'blocks.2.reduction.weight', 'blocks.5.reduction.weight'}
    for i in (0, 1, 3, 4):  # MLP-only stem blocks: norm2 and mlp only
        keys |= {f'blocks.{i}.{m}.{x}' for m in ('norm2', 'mlp.fc1', 'mlp.fc2') for x in wb}
    keys |= {f'blocks.{i}.norm.{x}' for i in (2, 5) for x in wb}  # PatchMerge
    full = ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
    keys |= {f'blocks.{i}.{m}.{x}' for i in range(6, 10) for m in full for x in wb}
    keys |= {f'decoder_blocks.{i}.{m}.{x}' for i in range(2) for m in full for x in wb}
    return keys


def test_state_dict_keys_match_reference():
    model = micro()
    sd = model.state_dict()
    assert set(sd) == micro_reference_keys()
    assert sd['norm.weight'].shape == (7 * D,) and sd['decoder_embed.weight'].shape == (MICRO[4], 7 * D)
    assert sd['blocks.0.mlp.fc1.weight'].shape == (96, 32)  # stem MLP ratio 3
    assert sd['blocks.5.reduction.weight'].shape == (128, 256) and sd['blocks.5.norm.weight'].shape == (256,)
    enc = hivit.encoder_state_dict(model)
    assert set(enc) == {k for k in sd if k.startswith(('patch_embed', 'absolute_pos_embed', 'blocks'))}


def test_base_parameter_count_and_hifeat_width():
    model = hivit.HiViTMAE(224, *hivit.MODELS['base'])
    assert len(model.blocks) == 4 + 1 + 4 + 1 + 20 and model.num_main_blocks == 20
    assert model.norm.weight.shape == (3584,) and model.decoder_embed.in_features == 3584  # 7 x 512
    assert model.decoder_pred.out_features == 768 and len(model.decoder_blocks) == 6
    total = sum(p.numel() for p in model.parameters())
    assert total == 87_041_152  # the sheet: the full MAE model 87.041M
    enc = sum(v.numel() for v in hivit.encoder_state_dict(model).values())
    # fine-tuning hivit_base adds 20 zero-init rpe tables of 27x27 x 8 heads, fc_norm and a 1000-class head
    finetune = enc + 20 * 27 * 27 * 8 + 2 * 512 + 512 * 1000 + 1000
    assert round(finetune / 1e6, 2) == 66.42  # the reference's comment: "Model PARAMs 66.42M"
    assert finetune == 66_418_952


def test_presets_match_reference_configs():
    assert hivit.MODELS['base'] == (16, 512, (2, 2, 20), 8, 512, 6, 16)
    assert hivit.MODELS['small'][1:4] == (384, (2, 2, 20), 6) and hivit.MODELS['tiny'][1:4] == (384, (1, 1, 10), 6)
    a = hivit.Args()
    assert (a.model, a.blr, a.global_batch, a.epochs, a.warmup_epochs, a.mask_ratio) == ('base', 1e-4, 4096, 1600, 40,
                                                                                        0.75)
    assert a.blr * a.global_batch / 256 == pytest.approx(1.6e-3) and a.weight_decay == 0.05 and a.betas == (0.9, 0.95)


# --------------------------------------------------------------------------- 7. training, checkpoints, pictures


def test_adamw_steps_lower_the_loss():
    model = micro()
    ds = common.SyntheticImages(8, 32)
    imgs = common.normalize(torch.stack([ds[i][0] for i in range(8)]), common.IMAGENET_MEAN, common.IMAGENET_STD)
    noise = noise_for(8, 16)
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    first = None
    for _ in range(30):
        loss, _ = model(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or loss.item()
    with torch.no_grad():
        final, _ = model(imgs, 0.75, noise)
    assert final.item() < 0.6 * first, (first, final.item())


def test_load_reference_style_checkpoints(tmp_path):
    src = micro(seed=1)
    ns = argparse.Namespace(model='mae_hivit_base_dec512d6b', norm_pix_loss=True, mask_ratio=0.75)
    torch.save({'model': src.state_dict(), 'optimizer': {}, 'epoch': 1600, 'scaler': {}, 'args': ns},
               tmp_path / 'a.pth')
    fresh = micro(seed=2)
    res = common.load_weights(fresh, tmp_path / 'a.pth')
    assert res.missing_keys == [] and res.unexpected_keys == []
    imgs, noise = images(2), noise_for(2, 16)
    with torch.no_grad():
        assert torch.equal(fresh(imgs, 0.75, noise)[0], src(imgs, 0.75, noise)[0])
    # a fine-tuned hivit checkpoint: encoder keys plus rpe tables/index, fc_norm and head, which are ignored
    ft = dict(hivit.encoder_state_dict(src))
    ft.update({f'blocks.{i}.attn.relative_position_bias_table': torch.zeros(49, 4) for i in range(6, 10)})
    ft.update({'relative_position_index': torch.zeros(16, 16, dtype=torch.long), 'fc_norm.weight': torch.ones(D),
               'fc_norm.bias': torch.zeros(D), 'head.weight': torch.zeros(10, D), 'head.bias': torch.zeros(10)})
    torch.save({'model': ft}, tmp_path / 'ft.pth')
    fresh = micro(seed=3)
    res = common.load_weights(fresh, tmp_path / 'ft.pth')
    assert len(res.unexpected_keys) == 9
    assert set(res.missing_keys) == micro_reference_keys() - set(hivit.encoder_state_dict(src))
    for k, v in hivit.encoder_state_dict(src).items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_visualize_writes_png_and_keeps_rng(tmp_path):
    model = micro((32, 48)).train()
    args = hivit.Args()
    state = torch.get_rng_state()
    hivit.visualize(model, images(3, 32, 48), args, tmp_path / 'vis.png')
    assert torch.equal(torch.get_rng_state(), state) and model.training
    with Image.open(tmp_path / 'vis.png') as im:
        assert im.size[0] >= 4 * 48 and im.size[1] >= 3 * 32
        assert np.asarray(im.convert('RGB')).std() > 1
