"""Unit tests of um_mae.py: uniform and secondary masking, packing, carried coordinates, decoder positions, the loss,
init, state-dict keys, parameter counts, weight-decay groups and a few optimizer steps. Values are checked against
written-out loops; the figures against the reference (implus/UM-MAE) were measured outside the repository."""
import math

import pytest
import torch

import common
import um_mae as U

TINY = U.MODELS['tiny']  # patch 2, 8-px units: a 64-px image has 8x8 units, 4x4 tokens per unit


def tiny(kind='tiny', size=64, **kw):
    torch.manual_seed(0)
    return U.UMMAE(U.MODELS[kind], size, **kw)


def visible_unit_loop(mask_row, uh, uw):
    """Written-out: for each 2x2 block in raster order, the (row, col) of its visible unit."""
    m = mask_row.view(uh, uw)
    out = []
    for bi in range(uh // 2):
        for bj in range(uw // 2):
            vis = [(2 * bi + i, 2 * bj + j) for i in range(2) for j in range(2) if not m[2 * bi + i, 2 * bj + j]]
            assert len(vis) == 1
            out.append(vis[0])
    return out


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize('gh,gw', [(16, 16), (8, 8), (4, 6)])
def test_uniform_mask_one_visible_unit_per_block(gh, gw):
    mask = U.uniform_mask(64, gh, gw, 'cpu')
    assert mask.shape == (64, gh * gw) and mask.dtype == torch.bool
    blocks = mask.view(64, gh // 2, 2, gw // 2, 2).permute(0, 1, 3, 2, 4).reshape(64, -1, 4)
    assert ((~blocks).sum(-1) == 1).all()  # exactly one visible unit in every 2x2 block
    assert (mask.sum(1) == gh * gw * 3 // 4).all()  # 192 of 256 at 256 px
    assert len({tuple(r.tolist()) for r in mask}) > 60  # a fresh mask per image
    assert not torch.equal(mask, U.uniform_mask(64, gh, gw, 'cpu'))  # and per call


def test_uniform_mask_is_the_reference_balanced_pool():
    """256 units: a pool of 128 rows, 32 of each in-block position, 64 drawn without replacement. So no position
    exceeds 32 visible units in an image, and the count of one position is hypergeometric: mean 16, variance
    64 x 1/4 x 3/4 x 64/127 = 6.05 (independent per-block choices would give 12)."""
    mask = U.uniform_mask(4000, 16, 16, 'cpu', torch.Generator().manual_seed(0))
    blocks = mask.view(-1, 8, 2, 8, 2).permute(0, 1, 3, 2, 4).reshape(-1, 64, 4)
    counts = (~blocks).sum(1).float()  # (4000, 4): visible units at each in-block position
    assert (counts.sum(1) == 64).all() and counts.max() <= 32
    assert counts.mean(0).sub(16).abs().max() < 0.25
    assert 5.3 < counts.var(0).mean() < 6.8


def test_secondary_mask_counts_and_order():
    mask = U.uniform_mask(16, 16, 16, 'cpu')
    noise = torch.rand(16, 256)
    hidden = U.secondary_mask(mask, 0.25, noise)
    assert (hidden[mask]).all()  # every US-masked unit stays hidden
    assert ((~hidden).sum(1) == 48).all()  # int(64 x 0.75) seen per image
    for b in range(16):  # the seen ones are the visible units with the smallest noise
        vis = (~mask[b]).nonzero().squeeze(1)
        seen = vis[noise[b, vis].argsort()[:48]]
        assert set(seen.tolist()) == set((~hidden[b]).nonzero().squeeze(1).tolist())
    assert torch.equal(U.secondary_mask(mask, 0.0, noise), mask)  # no secondary masking: just the US mask


# --------------------------------------------------------------------------- packing and coordinates


def encoder_inputs(model, imgs, mask, noise):
    """The packed tokens entering blocks[0], and the coordinates every Swin block receives and returns."""
    seen = {'pos': []}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))]
    for blk in model.blocks:
        if model.kind == 'swin':
            hooks.append(blk.register_forward_hook(lambda m, a, o: seen['pos'].append(o[1].clone())))
    with torch.no_grad():
        model.forward_encoder(imgs, mask, noise)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize('kind', ['tiny', 'pvt_tiny'])
def test_a_packed_tile_is_its_visible_units_tokens(kind):
    model = tiny(kind)
    imgs, mask, noise = torch.randn(2, 3, 64, 64), U.uniform_mask(2, 8, 8, 'cpu'), torch.rand(2, 64)
    hidden = U.secondary_mask(mask, 0.25, noise)
    x = encoder_inputs(model, imgs, mask, noise)['x'].view(2, 16, 16, -1)  # packed grid: 4x4 blocks of 4x4 tokens
    with torch.no_grad():
        tok = model.patch_embed(imgs)
        sm_tok = model.vis_mask_token[0, 0]
        if kind == 'tiny':
            tok, sm_tok = model.patch_embed.norm(tok), model.patch_embed.norm(model.vis_mask_token)[0, 0]
    tok = tok.view(2, 32, 32, -1)
    pe = model.pos_embed.view(32, 32, -1) if kind == 'pvt_tiny' else torch.zeros(32, 32, 1)
    for b in range(2):
        for n, (ui, uj) in enumerate(visible_unit_loop(mask[b], 8, 8)):
            bi, bj = divmod(n, 4)
            tile = x[b, 4 * bi:4 * bi + 4, 4 * bj:4 * bj + 4]
            pos = pe[4 * ui:4 * ui + 4, 4 * uj:4 * uj + 4]  # PVT: the unit's own sin-cos positions, SM units too
            if hidden[b, ui * 8 + uj]:  # secondary-masked: the shared token (Swin: through the embed LN)
                torch.testing.assert_close(tile, sm_tok.expand_as(tile) + pos, rtol=0, atol=1e-6)
            else:
                torch.testing.assert_close(tile, tok[b, 4 * ui:4 * ui + 4, 4 * uj:4 * uj + 4] + pos, rtol=0, atol=1e-6)
    assert int(hidden[~mask].sum()) == 2 * 4  # 4 of the 16 visible units per image got the token


def test_carried_coordinates_are_the_original_ones_at_every_stage():
    model = tiny()
    imgs, mask, noise = torch.randn(2, 3, 64, 64), U.uniform_mask(2, 8, 8, 'cpu'), torch.rand(2, 64)
    pos = encoder_inputs(model, imgs, mask, noise)['pos']  # after each of the 8 blocks
    assert [p.shape[1] for p in pos] == [16, 16, 8, 8, 4, 4, 2, 2]
    for b in range(2):
        expect = torch.zeros(16, 16, 2)  # packed token -> its token's (row, col) on the full 32x32 grid
        for n, (ui, uj) in enumerate(visible_unit_loop(mask[b], 8, 8)):
            bi, bj = divmod(n, 4)
            for r in range(4):
                for c in range(4):
                    expect[4 * bi + r, 4 * bj + c] = torch.tensor([4 * ui + r, 4 * uj + c])
        for i, p in enumerate(pos):  # stage s: the merged token keeps its top-left token's coordinates / 2^s
            s = i // 2
            assert torch.equal(p[b], expect[::2 ** s, ::2 ** s] / 2 ** s), (b, i)


def test_compact_is_the_sum_over_each_block_of_units():
    t = torch.randn(2, 16, 24, 5)
    out = U.compact(t, 4)
    assert out.shape == (2, 8, 12, 5)
    for a in range(8):
        for c in range(12):
            i, j = (a // 4) * 8 + a % 4, (c // 4) * 8 + c % 4
            manual = t[:, i, j] + t[:, i + 4, j] + t[:, i, j + 4] + t[:, i + 4, j + 4]
            torch.testing.assert_close(out[:, a, c], manual)


def test_windows_shift_and_clip_as_the_reference():
    model = tiny('swin_tiny', 256)
    ws_shift = [(blk.ws, blk.shift, blk.attn_mask is not None) for blk in model.blocks]
    assert ws_shift == [(8, 0, False), (8, 4, True), (8, 0, False), (8, 4, True)] + [(8, 0, False)] * 6 + \
        [(4, 0, False)] * 2  # packed maps 32, 16, 8 (not larger than the window: unshifted), 4 (clipped window)
    assert [blk.downsample is not None for blk in model.blocks] == [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0]


# --------------------------------------------------------------------------- decoder


def test_each_visible_token_gets_its_own_units_decoder_position():
    model = tiny()
    with torch.no_grad():  # the visible tokens enter the decoder as their position alone
        model.decoder_embed.weight.zero_()
        model.decoder_embed.bias.zero_()
    mask = U.uniform_mask(3, 8, 8, 'cpu')
    seen = {}
    h = model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model.forward_decoder(torch.randn(3, 4, 128), mask)
    h.remove()
    P = model.decoder_pos_embed[0]
    differs = 0
    for b in range(3):
        units = visible_unit_loop(mask[b], 8, 8)  # block raster order, as PixelShuffle hands them out
        own = torch.stack([P[i * 8 + j] for i, j in units])
        assert torch.equal(seen['x'][b, :16], own)
        masked = [u for u in range(64) if mask[b, u]]
        assert torch.equal(seen['x'][b, 16:], model.mask_token[0, 0] + P[masked])  # raster order, as the targets
        differs += (P[~mask[b]] != own).any(1).sum().item()  # the reference's full-grid order
    assert differs > 0  # the reference's order differs, so this test can fail


@pytest.mark.parametrize('ref_order,expect', [(False, [4, 3, 9, 14]), (True, [3, 4, 9, 14])])
def test_decoder_positions_hand_worked(ref_order, expect):
    """A 4x4 unit grid (32 px) whose blocks (0,0), (0,1), (1,0), (1,1) keep units 4, 3, 9, 14. PixelShuffle hands the
    tokens out in block order: units 4, 3, 9, 14. Each gets its own unit's position; the reference adds P[~mask],
    the visible units in raster order 3, 4, 9, 14, so the first two tokens swap positions. Masked tokens: the other
    units in raster order, either way."""
    model = tiny(size=32, ref_decoder_order=ref_order)
    with torch.no_grad():
        model.decoder_embed.weight.zero_()
        model.decoder_embed.bias.zero_()
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [4, 3, 9, 14]] = False
    seen = {}
    h = model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model.forward_decoder(torch.randn(1, 1, 128), mask)
    h.remove()
    P = model.decoder_pos_embed[0]
    assert torch.equal(seen['x'][0, :4], P[expect])
    hidden = [0, 1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 15]
    assert torch.equal(seen['x'][0, 4:], model.mask_token[0, 0] + P[hidden])


def test_pixelshuffle_hands_out_tokens_in_block_raster_order():
    """The packed encoder output (B, 2x2 tokens, 4 Dd) becomes one token per block: sub-pixel (i, j) of output token
    (a, b) -> block (2a+i, 2b+j), read from channel c*4 + i*2 + j."""
    model = tiny()
    lat = torch.zeros(1, 4, 128)
    with torch.no_grad():
        model.decoder_embed.weight.zero_()
        model.decoder_embed.bias.copy_(torch.arange(4 * 64).float())
        model.decoder_pos_embed.zero_()
    seen = {}
    h = model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach()))
    with torch.no_grad():
        model.forward_decoder(lat, U.uniform_mask(1, 8, 8, 'cpu'))
    h.remove()
    for blk in range(16):  # every packed token carries the same bias: block (r, c) gets sub-pixel (r % 2, c % 2)
        r, c = divmod(blk, 4)
        assert torch.equal(seen['x'][0, blk], torch.arange(64).float() * 4 + (r % 2) * 2 + c % 2)


# --------------------------------------------------------------------------- loss


def loss_loop(imgs, pred, mask, unit):
    """Written out: per image and masked unit in raster order, the norm-pix target and the squared error."""
    B, C, H, W = imgs.shape
    total, count = 0.0, 0
    for b in range(B):
        k = 0
        for u in range(mask.shape[1]):
            if not mask[b, u]:
                continue
            r, c = divmod(u, W // unit)
            t = imgs[b, :, r * unit:(r + 1) * unit, c * unit:(c + 1) * unit].permute(1, 2, 0).reshape(-1).double()
            t = (t - t.mean()) / math.sqrt(t.var().item() + 1e-6)
            total += ((pred[b, k].double() - t) ** 2).sum().item()
            count += t.numel()
            k += 1
    return total / count


def test_loss_equals_written_out_computation_on_192_units():
    imgs = torch.randn(2, 3, 256, 256)
    mask = U.uniform_mask(2, 16, 16, 'cpu')
    pred = torch.randn(2, 192, 768)  # the 192 uniformly masked units of a 256-px image
    loss = U.um_mae_loss(imgs, pred, mask, 16, True)
    assert loss.item() == pytest.approx(loss_loop(imgs, pred, mask, 16), rel=1e-5)
    plain = U.um_mae_loss(imgs, pred, mask, 16, False)
    target = common.patchify(imgs, 16)[mask].view(2, 192, 768)
    assert plain.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)


def test_loss_looks_only_at_uniformly_masked_units():
    model = tiny()
    imgs, mask, noise = torch.randn(2, 3, 64, 64), U.uniform_mask(2, 8, 8, 'cpu'), torch.rand(2, 64)
    hidden = U.secondary_mask(mask, 0.25, noise)
    loss, out = model(imgs, mask, noise)
    pred = out['pred']
    assert pred.shape == (2, 64, 192)
    moved = pred.clone()
    moved[:, :16] += 5.0  # the 16 visible units' predictions (secondary-masked ones included) are not in the loss
    assert U.um_mae_loss(imgs, moved[:, 16:], mask, 8, True) == loss
    moved = pred.clone()
    moved[:, 16] += 1.0  # a masked unit's is
    assert U.um_mae_loss(imgs, moved[:, 16:], mask, 8, True) != loss

    def unit_pixels(which):  # (B, 1, H, W) over the units in `which` (B, 64)
        return which.view(2, 1, 8, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)

    sm = hidden & ~mask
    changed = imgs + 3.0 * torch.randn_like(imgs) * unit_pixels(sm)  # new pixels inside secondary-masked units
    assert torch.equal(model(changed, mask, noise)[0], loss)  # neither seen nor a target: nothing changes
    seen = imgs + 3.0 * torch.randn_like(imgs) * unit_pixels(~hidden)
    assert model(seen, mask, noise)[0] != loss


# --------------------------------------------------------------------------- init, keys, counts, optimizer


def test_init_statistics():
    model = tiny('swin_tiny', 256)
    sd = dict(model.named_parameters())
    w = sd['blocks.0.attn.qkv.weight']
    assert w.std().item() == pytest.approx(math.sqrt(2 / (96 + 288)), rel=0.02)  # xavier uniform
    assert w.abs().max() <= math.sqrt(6 / (96 + 288))
    pe = sd['patch_embed.proj.weight']  # xavier on the (96, 48) view, after the conv init
    assert pe.abs().max() <= math.sqrt(6 / (96 + 48)) and pe.std().item() == pytest.approx(math.sqrt(2 / 144), rel=0.05)
    for k, fan_out in [('blocks.0.attn.posmlp.0.weight', 32), ('blocks.2.downsample.proj.weight', 4 * 192)]:
        assert sd[k].std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1), k  # fan-out normal
    assert all(sd[k].abs().sum() == 0 for k in sd if k.endswith('.bias') and 'norm' not in k)
    assert all(torch.equal(sd[k], torch.ones_like(sd[k])) for k in sd if k.endswith('norm1.weight'))
    for k in ('mask_token', 'vis_mask_token'):
        assert sd[k].std().item() == pytest.approx(0.02, rel=0.15) and sd[k].abs().sum() > 0
    assert not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.decoder_pos_embed[0], common.sincos_2d(512, 16, 16))  # the 16x16 unit grid
    assert model.blocks[0].norm1.eps == 1e-5 and model.patch_embed.norm.eps == 1e-6 and model.norm.eps == 1e-6
    assert model.blocks[2].downsample.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6


def swin_reference_keys(depths, dec_depth):
    keys = {'vis_mask_token', 'mask_token', 'decoder_pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias',
            'patch_embed.norm.weight', 'patch_embed.norm.bias', 'norm.weight', 'norm.bias'}
    i = 0
    for s, d in enumerate(depths):
        for j in range(d):
            mods = ['norm1', 'attn.qkv', 'attn.proj', 'attn.posmlp.0', 'attn.posmlp.2', 'norm2', 'mlp.fc1', 'mlp.fc2']
            mods += ['downsample.norm', 'downsample.proj'] if s > 0 and j == 0 else []
            keys |= {f'blocks.{i}.{m}.{p}' for m in mods for p in ('weight', 'bias')}
            i += 1
    for m in ('decoder_embed', 'decoder_norm', 'decoder_pred'):
        keys |= {f'{m}.weight', f'{m}.bias'}
    for i in range(dec_depth):
        keys |= {f'decoder_blocks.{i}.{m}.{p}' for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
                 for p in ('weight', 'bias')}
    return keys


def test_state_dict_keys_parameter_counts_and_encoder_export():
    """Counts of the reference's mae_swin_tiny_256 / mae_pvt_small_256 (its state dict has the same keys and
    shapes; checked with the reference code)."""
    swin = tiny('swin_tiny', 256)
    assert set(swin.state_dict()) == swin_reference_keys((2, 2, 6, 2), 2)
    assert sum(p.numel() for p in swin.parameters() if p.requires_grad) == 35_774_346
    enc = U.encoder_state_dict(swin)
    assert set(enc) == {k for k in swin_reference_keys((2, 2, 6, 2), 0) if 'mask_token' not in k and 'decoder' not in k}
    assert sum(v.numel() for v in enc.values()) == 27_499_050  # the Swin-T encoder models_swin.py loads
    pvt = tiny('pvt_small', 256)
    sd = pvt.state_dict()
    assert sum(p.numel() for p in pvt.parameters() if p.requires_grad) == 28_522_560
    assert sd['pos_embed'].shape == (1, 4096, 64) and not pvt.pos_embed.requires_grad
    assert {'blocks.0.attn.q.weight', 'blocks.0.attn.kv.weight', 'blocks.0.attn.sr.weight', 'blocks.0.attn.norm.weight',
            'blocks.3.downsample.proj.weight'} <= set(sd) and 'blocks.3.downsample.norm.weight' not in sd
    assert [b.attn.sr_ratio for b in pvt.blocks] == [4] * 3 + [2] * 4 + [1] * 6 + [1] * 3
    assert 'pos_embed' in U.encoder_state_dict(pvt) and 'vis_mask_token' not in U.encoder_state_dict(pvt)
    assert 'vis_mask_token' not in tiny(vis_mask_ratio=0.0).state_dict()  # ref: only with secondary masking


def test_weight_decay_groups_as_add_weight_decay_without_skip_list():
    model = tiny()
    no_decay, decay = common.param_groups(model, 0.05)
    ids = {id(p) for p in decay['params']}
    named = dict(model.named_parameters())
    for k in ('mask_token', 'vis_mask_token', 'blocks.0.attn.posmlp.0.weight', 'blocks.0.attn.posmlp.2.weight',
              'blocks.2.downsample.proj.weight', 'patch_embed.proj.weight'):
        assert id(named[k]) in ids, k
    assert all(p.ndim <= 1 for p in no_decay['params']) and decay['weight_decay'] == 0.05
    assert id(model.decoder_pos_embed) not in ids | {id(p) for p in no_decay['params']}


@pytest.mark.parametrize('kind', ['tiny', 'pvt_tiny'])
def test_adamw_steps_lower_the_loss(kind):
    model = tiny(kind)
    g = torch.Generator().manual_seed(0)
    imgs, mask, noise = torch.randn(4, 3, 64, 64, generator=g), U.uniform_mask(4, 8, 8, 'cpu', g), torch.rand(4, 64)
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(8):
        loss, _ = model(imgs, mask, noise)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_non_square_and_grayscale():
    model = U.UMMAE(TINY, (64, 128), in_chans=1)
    mask = U.uniform_mask(2, 8, 16, 'cpu')
    loss, out = model(torch.randn(2, 1, 64, 128), mask)
    assert out['pred'].shape == (2, 128, 64) and torch.isfinite(loss)
    loss.backward()
