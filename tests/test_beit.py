"""Model-level tests for beit.py against the facts of the BEiT reference (shared/methods/beit.md; microsoft/unilm
beit/ modeling_pretrain.py, masking_generator.py, engine_for_pretraining.py, dall_e/, optim_factory.py, utils.py).
CPU only, tiny presets and hand-built small modules; BEiT-B is built once to count parameters."""
import dataclasses
import json
import math
import os
import random
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import beit
import common

TRUNC_1SIGMA_STD = 0.5395685  # std of a standard normal truncated at +-1 sigma


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed=0, img=32, vocab=32, **kw):
    torch.manual_seed(seed)
    return beit.BEiT((img, img), 8, 64, 2, 4, vocab, **kw)  # 4x4 grid


# --------------------------------------------------------------------------- blockwise masking


class ScriptedRng:
    """Stands in for random.Random: uniform/randint answer from scripted lists (to hand-work a mask)."""

    def __init__(self, uniforms, randints):
        self.u, self.r = list(uniforms), list(randints)

    def uniform(self, a, b):
        return self.u.pop(0)

    def randint(self, a, b):
        v = self.r.pop(0)
        assert a <= v <= b
        return v


def test_mask_counts_and_bounds_over_many_draws():
    rng, counts = random.Random(0), []
    for _ in range(3000):
        m = beit.block_mask(rng, (14, 14), 75, 16)
        assert m.shape == (14, 14) and m.dtype == bool
        counts.append(int(m.sum()))
    counts = np.array(counts)
    assert counts.max() == 75 and counts.min() >= 60  # never above the target
    # about 2/3 reach exactly 75, the others stop below it (10 failed tries: remaining budget < the free areas)
    assert 0.6 < (counts == 75).mean() < 0.8 and 74 < counts.mean() < 75
    # masks differ between draws
    assert len({beit.block_mask(rng, (14, 14)).tobytes() for _ in range(50)}) == 50


def test_mask_hand_worked_blocks():
    # block 1: area 16, log-aspect 0 -> 4x4 at (0, 0): 16 new. budget 4 -> block 2: area 4, aspect 1 -> 2x2 at
    # (3, 3): overlaps one masked patch -> 3 new, count 19. Then budget 1: area 1 -> 1x1 at (0, 0): 0 new (already
    # masked) for all 10 tries -> the mask ends at 19 < 20.
    rng = ScriptedRng([16, 0, 4, 0] + [1, 0] * 10, [0, 0, 3, 3] + [0, 0] * 10)
    m = beit.block_mask(rng, (8, 8), 20, 4)
    want = np.zeros((8, 8), bool)
    want[:4, :4] = True
    want[3:5, 3:5] = True
    assert (m == want).all() and m.sum() == 19


def test_mask_strict_bounds():
    # a 4x4 block on a 4x4 grid is refused (strict <), 10 times -> nothing masked
    m = beit.block_mask(ScriptedRng([16, 0] * 10, []), (4, 4), 16, 16)
    assert m.sum() == 0
    # 3x3 (one less than the grid) is accepted
    m = beit.block_mask(ScriptedRng([9, 0], [1, 0]), (4, 4), 9, 9)
    assert m.sum() == 9 and m[1:4, 0:3].all()


# --------------------------------------------------------------------------- model


def test_relative_position_index_with_cls_entries():
    model = tiny()
    idx = model.rel_pos_bias.relative_position_index  # grid 4x4: 7*7 = 49 relative offsets + 3
    n_rel = 49
    assert idx.shape == (17, 17) and model.rel_pos_bias.relative_position_bias_table.shape == (n_rel + 3, 4)
    assert (idx[0, 1:] == n_rel).all() and (idx[1:, 0] == n_rel + 1).all() and idx[0, 0] == n_rel + 2  # cls entries
    # token (row 0, col 0) -> token (row 1, col 2): (0 - 1 + 3) * 7 + (0 - 2 + 3) = 15; the reverse: (1+3)*7 + (2+3)
    assert idx[1, 1 + 6] == 15 and idx[1 + 6, 1] == 33 and (idx[1:, 1:].diagonal() == 3 * 7 + 3).all()
    assert (model.rel_pos_bias.relative_position_bias_table == 0).all()  # zero init


def reference_keys(depth, abs_pos=False, rel=True, gammas=True):
    keys = {'cls_token', 'mask_token', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
            'lm_head.weight', 'lm_head.bias'}
    keys |= {'pos_embed'} if abs_pos else set()
    keys |= {'rel_pos_bias.relative_position_bias_table', 'rel_pos_bias.relative_position_index'} if rel else set()
    for i in range(depth):
        keys |= {f'blocks.{i}.{k}' for k in ('norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias',
                                              'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias', 'norm2.weight',
                                              'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
                                              'mlp.fc2.bias')}
        keys |= {f'blocks.{i}.gamma_1', f'blocks.{i}.gamma_2'} if gammas else set()
    return keys


def test_state_dict_keys_and_variants():
    assert set(tiny().state_dict()) == reference_keys(2)
    # the released pt1k_800ep checkpoint: abs pos, no rel pos, no layer scale
    m = tiny(abs_pos_emb=True, init_values=0.0)
    assert set(m.state_dict()) == reference_keys(2, abs_pos=True, gammas=False)
    assert m.pos_embed.shape == (1, 17, 64)
    loss, _ = m(torch.randn(2, 3, 32, 32), torch.ones(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.long))
    assert torch.isfinite(loss)
    enc = beit.encoder_state_dict(tiny())
    assert set(enc) == reference_keys(2) - {'lm_head.weight', 'lm_head.bias'}


def test_parameter_counts():
    torch.manual_seed(0)
    base = beit.BEiT((224, 224), *beit.MODELS['base'][:4])
    assert sum(p.numel() for p in base.parameters()) == 91_965_776  # = the reference's beit_base_patch16_224_8k_vocab
    assert sum(p.numel() for n, p in base.named_parameters() if not n.startswith('lm_head')) == 85_666_128
    assert base.blocks[0].gamma_1.eq(0.1).all() and beit.MODELS['large'][4] == 1e-5


def test_init_statistics():
    torch.manual_seed(0)
    m = beit.BEiT((64, 64), 8, 256, 4, 4, 1024)
    for name in ('patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.0.mlp.fc1.weight', 'lm_head.weight',
                 'mask_token', 'cls_token'):
        t = m.state_dict()[name]
        assert t.abs().max() <= 0.02 + 1e-7, name  # truncated at +-1 std
        if t.numel() > 10000:
            assert t.std().item() == pytest.approx(0.02 * TRUNC_1SIGMA_STD, rel=0.03), name
    for i, blk in enumerate(m.blocks):  # fix_init_weight: / sqrt(2 (l + 1))
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert w.abs().max() <= 0.02 / math.sqrt(2 * (i + 1)) + 1e-7
            assert w.std().item() == pytest.approx(0.02 * TRUNC_1SIGMA_STD / math.sqrt(2 * (i + 1)), rel=0.05)
        assert (blk.attn.q_bias == 0).all() and (blk.attn.v_bias == 0).all() and (blk.gamma_2 == 0.1).all()
        assert (blk.attn.proj.bias == 0).all() and blk.attn.qkv.bias is None
    assert (m.lm_head.bias == 0).all() and (m.patch_embed.proj.bias == 0).all()


def test_weight_decay_groups():
    m = tiny()
    groups = common.param_groups(m, 0.05, skip={'pos_embed', 'cls_token'})
    names = {id(p): n for n, p in m.named_parameters()}
    decay = {names[id(p)] for p in groups[1]['params']}
    assert {'mask_token', 'lm_head.weight', 'rel_pos_bias.relative_position_bias_table'} <= decay
    assert not decay & {'cls_token', 'blocks.0.gamma_1', 'blocks.0.attn.q_bias', 'lm_head.bias', 'norm.weight'}
    assert len(decay) == 4 + 2 * 4  # patch embed, mask token, table, lm_head + (qkv, proj, fc1, fc2) x 2 blocks


def test_lr_schedule():
    lr = [beit.lr_at(s, 1.5e-3, 1e-5, 10, 100) for s in range(100)]
    np.testing.assert_allclose(lr[:10], np.linspace(0, 1.5e-3, 10))  # warmup from 0, linspace endpoint included
    assert lr[10] == pytest.approx(1.5e-3) and lr[55] == pytest.approx(1e-5 + 0.5 * (1.5e-3 - 1e-5))
    assert lr[99] == pytest.approx(1e-5 + 0.5 * (1.5e-3 - 1e-5) * (1 + math.cos(math.pi * 89 / 90)))


# --------------------------------------------------------------------------- loss


def batch(B=3, seed=0, vocab=32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, 16, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(16, generator=g)[:3 + 4 * b]] = True  # 3, 7, 11 masked: counts differ per image
    return torch.randn(B, 3, 32, 32, generator=g), mask, torch.randint(0, vocab, (B, 16), generator=g)


def test_loss_is_cross_entropy_over_all_masked_tokens():
    model = tiny().eval()
    imgs, mask, ids = batch()
    loss, out = model(imgs, mask, ids)
    feats = model.forward_features(imgs, mask)[:, 1:]  # (B, N, D)
    total, n = 0.0, 0
    for b in range(3):  # written out: every masked token of the batch weighs the same
        for i in range(16):
            if mask[b, i]:
                total -= F.log_softmax(model.lm_head(feats[b, i]).double(), -1)[ids[b, i]].item()
                n += 1
    assert n == 21 and loss.item() == pytest.approx(total / n, rel=1e-5)
    logits = out['logits'][out['valid']]  # (21, V): the masked tokens in row-major order (k = N: no padding cut)
    per_image = np.mean([F.cross_entropy(logits[s:e], ids[mask][s:e]).item()
                         for s, e in ((0, 3), (3, 10), (10, 21))])
    assert abs(per_image - loss.item()) > 1e-4  # not a mean of per-image means
    assert out['logits'].shape == (3, 16, 32) and logits.shape == (21, 32)
    acc = (logits.argmax(-1) == ids[mask]).float().mean()
    assert out['mlm_acc'].item() == pytest.approx(acc.item())


def test_fixed_size_head_equals_boolean_indexing():
    """The LM head on k gathered positions per image (a fixed shape) gives the loss, accuracy and gradients of the
    LM head on x[mask] (a data-dependent shape, a host sync) to fp32 rounding, for any k >= the most masked."""
    model = tiny().eval()
    imgs, mask, ids = batch()
    feats = model.forward_features(imgs, mask)[:, 1:]
    logits = model.lm_head(feats[mask])  # (21, V): boolean indexing, row-major
    ref = F.cross_entropy(logits, ids[mask])
    ref_acc = (logits.argmax(-1) == ids[mask]).float().mean()
    params = list(model.parameters())
    ref_grads = torch.autograd.grad(ref, params)
    for k in (11, 13, None):  # 11: the most masked (image 3); 13: padded; None: all 16
        loss, out = model(imgs, mask, ids, k)
        assert out['logits'].shape == (3, k or 16, 32) and out['valid'].sum() == 21
        assert torch.equal(out['pos'][out['valid']].sort().values, mask.nonzero()[:, 1].sort().values)
        torch.testing.assert_close(out['logits'][out['valid']], logits, rtol=1e-5, atol=1e-6)  # same rows, same order
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        assert out['mlm_acc'].item() == pytest.approx(ref_acc.item())
        for g, r in zip(torch.autograd.grad(loss, params), ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_loss_ignores_unmasked_positions():
    model = tiny().eval()
    imgs, mask, ids = batch()
    loss, _ = model(imgs, mask, ids)
    ids2 = torch.where(mask, ids, (ids + 5) % 32)  # other targets at the unmasked positions
    assert model(imgs, mask, ids2)[0].item() == loss.item()
    # logits at unmasked positions never reach the loss: beit_loss on all-token logits after masking them away
    full = model.lm_head(model.forward_features(imgs, mask)[:, 1:])  # (B, N, V)
    noisy = torch.where(mask[..., None], full, full + 100 * torch.randn_like(full))
    assert beit.beit_loss(noisy, ids, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    assert beit.beit_loss(full, ids, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # the masked patches' pixels are not seen: changing them leaves the loss unchanged (mask token replaces them)
    up = mask.view(3, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)
    assert model(torch.where(up, torch.randn_like(imgs), imgs), mask, ids)[0].item() == pytest.approx(loss.item(),
                                                                                                     rel=1e-6)
    # nothing masked: loss 0, not NaN
    zero, _ = model(imgs, torch.zeros_like(mask), ids)
    assert zero.item() == 0.0


def test_a_few_steps_lower_the_loss():
    model = tiny(drop_path=0.0)
    imgs, mask, ids = batch()
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=3e-3)
    losses = []
    for _ in range(15):
        loss, _ = model(imgs, mask, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses[0] == pytest.approx(math.log(32), rel=0.05)


# --------------------------------------------------------------------------- tokenizer


def test_encoder_structure_and_token_grid():
    torch.manual_seed(0)
    enc = beit.Encoder(n_hid=16, n_blk=2, vocab=40)
    sd = enc.state_dict()
    assert sd['blocks.input.w'].shape == (16, 3, 7, 7) and sd['blocks.output.conv.w'].shape == (40, 128, 1, 1)
    assert 'blocks.group_1.block_1.id_path.w' not in sd and sd['blocks.group_2.block_1.id_path.w'].shape == (32, 16, 1, 1)
    assert 'blocks.group_2.block_2.id_path.w' not in sd
    assert sd['blocks.group_4.block_2.res_path.conv_1.w'].shape == (32, 128, 3, 3)  # hidden = width / 4
    assert sd['blocks.group_3.block_1.res_path.conv_4.w'].shape == (64, 16, 1, 1)
    assert enc.blocks.group_1.block_1.post_gain == 1 / 64 and not hasattr(enc.blocks.group_4, 'pool')
    x = beit.map_pixels(torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8))
    assert 0.1 <= x.min() and x.max() <= 0.9 + 1e-6
    logits = enc(x)
    assert logits.shape == (2, 40, 4, 6)  # 8x downsampling
    assert torch.equal(beit.visual_tokens(enc, x), logits.argmax(1).flatten(1))
    blk, y = enc.blocks.group_2.block_1, torch.randn(1, 16, 5, 5)  # out = id + 1/64 residual, 'same' padding
    assert torch.allclose(blk(y), blk.id_path(y) + blk.res_path(y) / 64)
    c = blk.res_path.conv_1
    assert torch.allclose(c(y), F.conv2d(y, c.w, c.b, padding=1))


def make_standin_dall_e():
    """Modules named dall_e.encoder / dall_e.utils with stand-in classes, as the pickled encoder.pkl references."""
    pkg, enc_mod, utils_mod = (types.ModuleType(n) for n in ('dall_e', 'dall_e.encoder', 'dall_e.utils'))
    for cls, mod in ((beit.Encoder, enc_mod), (beit.EncoderBlock, enc_mod), (beit.Conv, utils_mod)):
        name = 'Conv2d' if cls is beit.Conv else cls.__name__
        stand_in = type(name, (cls,), {'__module__': mod.__name__, '__qualname__': name})
        setattr(mod, name, stand_in)
    sys.modules.update({'dall_e': pkg, 'dall_e.encoder': enc_mod, 'dall_e.utils': utils_mod})
    return enc_mod, utils_mod


def pickle_like_encoder_pkl(path, n_hid=16, vocab=64):
    """torch.save of a whole module tree whose classes live under dall_e.*, with attrs-like fields (a device)."""
    enc_mod, utils_mod = make_standin_dall_e()
    try:
        torch.manual_seed(0)
        model = beit.Encoder(n_hid, 2, vocab)
        for m in model.modules():  # re-class into the stand-ins, as if built by the dall_e package
            name = {beit.Encoder: 'Encoder', beit.EncoderBlock: 'EncoderBlock', beit.Conv: 'Conv2d'}.get(type(m))
            if name:
                m.__class__ = getattr(enc_mod if name != 'Conv2d' else utils_mod, name)
                m.device, m.requires_grad, m.use_float16 = torch.device('cpu'), False, True
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        torch.save(model, path)
        x = beit.map_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
        return model.state_dict(), x, model(x)
    finally:
        for k in ('dall_e', 'dall_e.encoder', 'dall_e.utils'):
            sys.modules.pop(k, None)


def test_restricted_unpickler_loads_a_pickled_dall_e_encoder(tmp_path):
    path = tmp_path / 'encoder.pkl'
    sd, x, logits = pickle_like_encoder_pkl(path)
    assert {'dall_e.encoder.Encoder', 'dall_e.encoder.EncoderBlock', 'dall_e.utils.Conv2d'} <= set(
        torch.serialization.get_unsafe_globals_in_checkpoint(path))  # written the way encoder.pkl was
    assert 'dall_e' not in sys.modules
    tok = beit.load_tokenizer(str(path))
    assert 'dall_e' not in sys.modules and type(tok) is beit.Encoder and tok.vocab == 64
    for k, v in tok.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(tok(x), logits) and torch.equal(beit.visual_tokens(tok, x), logits.argmax(1).flatten(1))
    assert not any(p.requires_grad for p in tok.parameters())
    # a plain state dict of the same module loads too
    torch.save({k: v.clone() for k, v in sd.items()}, tmp_path / 'plain.pth')
    assert torch.equal(beit.load_tokenizer(str(tmp_path / 'plain.pth'))(x), logits)


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f'touch {self.target}',))


class EvilDallE(nn.Module):  # a module that claims to be the encoder but smuggles a call
    def __reduce_ex__(self, proto):
        return (eval, ("__import__('os').system('touch HACKED')",))


def test_restricted_unpickler_refuses_other_calls(tmp_path):
    target = tmp_path / 'pwned'
    torch.save({'model': Evil(target)}, tmp_path / 'evil.pth')
    with pytest.raises(SystemExit) as e:
        beit.load_tokenizer(str(tmp_path / 'evil.pth'))
    assert 'refused' in str(e.value.code) and not target.exists()
    line = str(e.value.code)  # the refused function by name, not torch's advice to unpickle anyway
    assert 'posix.system' in line and 'weights_only' not in line and '\x1b' not in line and '\n' not in line, line
    torch.save(EvilDallE(), tmp_path / 'evil2.pkl')
    with pytest.raises(SystemExit) as e:
        beit.load_tokenizer(str(tmp_path / 'evil2.pkl'))
    assert 'refused' in str(e.value.code) and not os.path.exists('HACKED')
    line = str(e.value.code)
    assert 'builtins.eval' in line and 'weights_only' not in line and '\x1b' not in line and '\n' not in line, line
    torch.save({'model': {'foo': torch.zeros(2)}}, tmp_path / 'other.pth')  # loads, but is no encoder
    with pytest.raises(SystemExit, match='no DALL-E encoder'):
        beit.load_tokenizer(str(tmp_path / 'other.pth'))


def test_dall_e_decoder_and_other_objects_as_tokenizer(tmp_path):
    """decoder.pkl (the other half of the DALL-E dVAE: tokens in, pixels out) is named; a decoder's state dict, a list
    and a bare tensor are no tokenizer; one line each."""
    pkg, dec_mod = types.ModuleType('dall_e'), types.ModuleType('dall_e.decoder')
    dec_mod.Decoder = type('Decoder', (nn.Module,), {'__module__': 'dall_e.decoder', '__qualname__': 'Decoder'})
    sys.modules.update({'dall_e': pkg, 'dall_e.decoder': dec_mod})
    try:
        decoder = dec_mod.Decoder()
        decoder.blocks = nn.Sequential()
        decoder.blocks.input = beit.Conv(32, 16, 1)  # vocab -> n_init, a 1x1 conv
        torch.save(decoder, tmp_path / 'decoder.pkl')
    finally:
        for k in ('dall_e', 'dall_e.decoder'):
            sys.modules.pop(k, None)
    torch.save(decoder.state_dict(), tmp_path / 'decoder_sd.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    for name, words in [('decoder.pkl', 'the DALL-E decoder; give the encoder, encoder.pkl'),
                        ('decoder_sd.pth', "no DALL-E encoder or dVAE tensors (keys like ['blocks.input.w'"),
                        ('list.pth', 'no DALL-E encoder or dVAE tensors (keys like [])'),
                        ('tensor.pth', 'no DALL-E encoder or dVAE tensors (keys like [])')]:
        with pytest.raises(SystemExit) as e:
            beit.load_tokenizer(str(tmp_path / name))
        assert e.value.code == f'--tokenizer {tmp_path / name}: {words}' or (
            e.value.code.startswith(f'--tokenizer {tmp_path / name}: {words}') and '\n' not in e.value.code), e.value.code


def test_dvae_file_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = beit.DVAE(24, 8)
    torch.save({'model': vae.state_dict(), 'args': {}}, tmp_path / 'tokenizer.pth')
    tok = beit.load_tokenizer(str(tmp_path / 'tokenizer.pth'))
    assert type(tok) is beit.DVAE and tok.vocab == 24
    x = beit.map_pixels(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    ids = beit.visual_tokens(tok, x)
    assert ids.shape == (2, 16) and torch.equal(ids, beit.visual_tokens(vae, x))
    rec = tok.decode(ids, (4, 4))
    assert rec.shape == (2, 3, 32, 32) and 0 <= rec.min() and rec.max() <= 1
    loss, ex = vae(x, 1.0, 0.0)
    assert loss.item() == pytest.approx(ex['rec_loss'].item()) and ex['rec'].shape == x.shape


# --------------------------------------------------------------------------- data


def test_two_views_share_crop_flip_and_masks_are_fresh(tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    yy, xx = np.mgrid[0:90, 0:120]
    a = np.stack([xx * 2, yy * 2, (xx * yy) % 256], -1).astype(np.uint8)  # asymmetric: flips and crops show
    Image.fromarray(a).save(data / 'a.png')
    Image.fromarray(a[::-1].copy()).save(data / 'b.png')
    args = beit.Args(data=str(data), input_size=(64,), num_mask_patches=12, min_mask_patches_per_block=4)
    ds = beit.TwoViews(args, (8, 8))
    flips, masks = 0, set()
    for epoch in range(12):
        (v1, v2, mask), _, bad = ds[(epoch, 0)]
        assert v1.shape == (3, 64, 64) and v2.shape == (3, 64, 64) and v1.dtype == torch.uint8 and bad == -1
        assert mask.shape == (64,) and mask.dtype == torch.bool and 0 < mask.sum() <= 12
        masks.add(mask.numpy().tobytes())
        diff = (v1.float() - v2.float()).abs().mean()  # same crop + flip: nearly the same pixels
        other = (v1.float() - v2.flip(-1).float()).abs().mean()
        assert diff < 6 and other > 2 * diff, (diff, other)
        # the flip: red grows with x in the source image
        flips += bool(v1[0, :, :8].float().mean() > v1[0, :, -8:].float().mean())
    assert 2 <= flips <= 10 and len(masks) == 12  # both flips occur; masks differ per epoch
    assert all(torch.equal(x, y) for x, y in zip(ds[(3, 1)][0], ds[(3, 1)][0]))  # a pure function of the key
    assert not torch.equal(ds[(3, 0)][0][0], ds[(3, 1)][0][0])
    # the tokenizer view is 8 px per patch: 112 for 224 / 16
    (v1, v2, mask), _, _ = beit.TwoViews(dataclasses.replace(args, input_size=(224,)), (14, 14))[(0, 0)]
    assert v1.shape == (3, 224, 224) and v2.shape == (3, 112, 112) and mask.shape == (196,)


def test_tokenizer_stage_lowers_reconstruction_loss(tmp_path, restore_signals):
    args = common.parse_args(beit.Args, argv=[
        '--stage', 'tokenizer', '--data', 'synthetic:64', '--model', 'tiny', '--input_size', '32', '--batch_size', '16',
        '--num_workers', '0', '--vocab_size', '32', '--tok_width', '8', '--tok_epochs', '6', '--tok_lr', '3e-3',
        '--kl_weight', '0', '--log_every', '4', '--output_dir', str(tmp_path)])
    torch.manual_seed(0)  # what setup_run does for rank 0: the same initial dVAE
    fresh = beit.DVAE(32, 8)
    vae = beit.main(args)  # --stage tokenizer: output_dir/tokenizer/tokenizer.pth
    ds = beit.TwoViews(args, (4, 4))
    x = beit.map_pixels(torch.stack([ds[(0, i)][0][1] for i in range(32)]))
    with torch.no_grad():
        before = F.mse_loss(fresh.decoder(F.one_hot(beit.visual_tokens(fresh, x), 32).float().transpose(1, 2).reshape(32, 32, 4, 4)), x)
        after = F.mse_loss(vae.decoder(F.one_hot(beit.visual_tokens(vae, x), 32).float().transpose(1, 2).reshape(32, 32, 4, 4)), x)
    assert after < 0.5 * before, (before, after)
    recs = [json.loads(line) for line in open(tmp_path / 'tokenizer' / 'log.jsonl')]
    assert [r['step'] for r in recs] == [4, 8, 12, 16, 20, 24] and recs[-1]['loss'] < recs[0]['loss']
    temps = [1 / 16 + 0.5 * (1 - 1 / 16) * (1 + math.cos(math.pi * s / 24)) for s in range(20, 24)]  # annealed
    assert recs[-1]['temp'] == pytest.approx(sum(temps) / 4) and recs[-1]['lr'] == 3e-3  # the Adam lr under 'lr'
    tok = beit.load_tokenizer(str(tmp_path / 'tokenizer' / 'tokenizer.pth'))
    assert type(tok) is beit.DVAE and torch.equal(beit.visual_tokens(tok, x), beit.visual_tokens(vae, x))
    assert (tmp_path / 'tokenizer' / 'loss.png').exists() and sorted(p.name for p in tmp_path.iterdir()) == ['tokenizer']


def test_picture_compares_accuracy_with_the_commonest_code(monkeypatch):
    """The honest baseline beside chance: always guessing the commonest true code among the masked patches."""
    notes = []
    monkeypatch.setattr(beit, 'save_grid', lambda path, cols, note='': notes.append(note))
    torch.manual_seed(0)
    tok = beit.Encoder(8, 1, 32)  # 8x downsampling: 4x4 tokens of a 32-px view
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    mask = batch()[1]
    beit.visualize(tiny(), tok, (imgs, imgs, mask), beit.Args(model='tiny'), 'unused.png')
    ids = beit.visual_tokens(tok, beit.map_pixels(imgs))[mask].tolist()
    top = max(ids.count(c) for c in set(ids)) / len(ids)
    assert f'(always the commonest code {top:.3f}, chance {1 / 32:.4f})' in notes[0]
