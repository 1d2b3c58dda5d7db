"""Model-level tests for m3ae.py against the facts of the M3AE reference (shared/methods/m3ae.md, section 2):
the tokenizer, the batch-shared masking, padding, the two losses, init, names, the timm export and the caption
data. CPU only, the 'tiny' preset on 32 px inputs."""
import collections
import contextlib
import dataclasses
import importlib
import math
import os
import pickle
import pickletools
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import common
import m3ae

VOCAB = ['[PAD]', '[UNK]', 'un', '##aff', '##able', 'hello', ',', '!', 'cafe', 'the', '##s', 'cat', 'a', '中', '.']
P, D = m3ae.MODELS['tiny'][0], m3ae.MODELS['tiny'][1]


def tiny(V=len(VOCAB), size=32, weights=(1.0, 0.5, 1.0), seed=0, ratios=(0.75, 0.75)):
    torch.manual_seed(seed)
    return m3ae.M3AE(size, *m3ae.MODELS['tiny'], V, 3, *ratios, weights, max_len=32)


def batch(B=3, L=8, V=len(VOCAB), lengths=(8, 5, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, 3, 32, 32, generator=g)
    pad = torch.arange(L)[None] >= torch.tensor(lengths)[:, None]  # (B, L): sample 2 is empty text
    text = torch.randint(2, V, (B, L), generator=g).masked_fill(pad, 0)
    return imgs, text, pad


def noises(N=16, L=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, generator=g), torch.rand(L, generator=g)


# --------------------------------------------------------------------------- 1. the tokenizer


def test_basic_words_cleans_lowercases_strips_accents_and_splits_punctuation():
    assert m3ae.basic_words('Héllo, UNAFFABLE  cats!') == ['hello', ',', 'unaffable', 'cats', '!']
    assert m3ae.basic_words("Don't\tstop...now") == ['don', "'", 't', 'stop', '.', '.', '.', 'now']
    assert m3ae.basic_words('a\x00b\ufffdc\u200bd\ne') == ['abcd', 'e']  # NUL, U+FFFD, Cf dropped; \n splits
    assert m3ae.basic_words('ab中国c') == ['ab', '中', '国', 'c']  # CJK chars are words of their own
    assert m3ae.basic_words('Crème Brûlée $5') == ['creme', 'brulee', '$', '5']  # $ (Sc) is ASCII punctuation
    assert m3ae.basic_words('naïve\u00a0x') == ['naive', 'x']  # NBSP (Zs) is whitespace


def test_wordpiece_greedy_longest_match_unknowns_and_padding():
    tok = m3ae.WordPiece(VOCAB)
    v = {t: i for i, t in enumerate(VOCAB)}
    assert tok.pieces('unaffable') == [v['un'], v['##aff'], v['##able']]
    assert tok.pieces('cats') == [v['cat'], v['##s']]
    assert tok.pieces('unx') == [v['[UNK]']]  # 'un' fits, '##x' does not: the WHOLE word is unknown
    assert tok.pieces('affable') == [v['[UNK]']]  # '##aff' never starts a word
    assert tok.pieces('s' * 101) == [v['[UNK]']] and tok.pieces('a' * 100) == [v['[UNK]']]  # over 100: unknown
    ids, pad = tok.encode('Héllo, the CATS! Café', 10)
    assert ids.tolist() == [v['hello'], v[','], v['the'], v['cat'], v['##s'], v['!'], v['cafe'], 0, 0, 0]
    assert pad.tolist() == [False] * 7 + [True] * 3 and ids.dtype == torch.long
    ids, pad = tok.encode('the cat the cat', 3)  # truncated, no [CLS]/[SEP]
    assert ids.tolist() == [v['the'], v['cat'], v['the']] and not pad.any()
    ids, pad = tok.encode('   ', 4)  # empty: all padding (ref data.py)
    assert ids.tolist() == [0] * 4 and pad.all()
    assert m3ae.WordPiece(['[PAD]', 'x'] + ['y'] * 98 + ['[UNK]']).unk == 100  # BERT's [UNK] is line 100


def test_special_tokens_in_a_text_stay_whole_as_in_bert():
    """BERT splits a text on its special tokens (exact, upper-case) before cleaning and lower-casing."""
    assert m3ae.basic_words('a [MASK] b[SEP]c [CLS][PAD]') == ['a', '[MASK]', 'b', '[SEP]', 'c', '[CLS]', '[PAD]']
    assert m3ae.basic_words('[mask] [MASK ] [UNKNOWN]') == ['[', 'mask', ']', '[', 'mask', ']', '[', 'unknown', ']']
    tok = m3ae.WordPiece(VOCAB + ['[MASK]', '[SEP]'])
    assert tok.encode('the [MASK] cat[SEP]', 5)[0].tolist() == [9, 15, 11, 16, 0]
    assert tok.encode('[CLS]', 2)[0].tolist() == [1, 0]  # a special token missing from the vocab is unknown


def test_cleaning_drops_every_char_of_category_c_but_tab_and_newlines():
    """BERT's _clean_text drops what _is_control calls control: every category starting with C (Cc control, Cf
    format, Co private use, Cn unassigned), except tab, newline and carriage return, which are whitespace."""
    assert m3ae.basic_words('ab\ue000cd x\U000f0001y') == ['abcd', 'xy']  # Co: private use
    assert m3ae.basic_words('ab\u0378cd e\U000e0080f') == ['abcd', 'ef']  # Cn: unassigned
    assert m3ae.basic_words('a\x07b c\u200bd e\ufeffg') == ['ab', 'cd', 'eg']  # Cc, Cf (a BOM too)
    assert m3ae.basic_words('a\tb\nc\rd') == ['a', 'b', 'c', 'd']


def test_text_files_are_utf8_lines_with_the_byte_offset_of_a_bad_one(tmp_path):
    cases = {'bom.txt': (b'\xef\xbb\xbf[PAD]\r\n[UNK]\rx\n\n', ['[PAD]', '[UNK]', 'x', '']),  # BERT: readlines()
             'plain.txt': (b'a\tb\nc', ['a\tb', 'c']), 'empty.txt': (b'', [])}
    for name, (data, lines) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert m3ae.read_lines(tmp_path / name, '--vocab') == lines
    for data, at in ((b'ok\ncaf\xe9\n', 'byte 6 is 0xe9'), (b'\xef\xbb\xbfab\xff', 'byte 5 is 0xff'),
                     (b'\x89PNG\r\n', 'byte 0 is 0x89')):
        (tmp_path / 'bad').write_bytes(data)
        with pytest.raises(SystemExit, match=f'--text_data {tmp_path / "bad"}: not UTF-8 text \\({at}\\)'):
            m3ae.read_lines(tmp_path / 'bad', '--text_data')


@pytest.mark.parametrize('tokens,words', [([], 'is empty'), (['hello', 'cat'], 'lacks [PAD] and [UNK]'),
                                          (['[PAD]', 'cat'], 'lacks [UNK]'),
                                          (['[UNK]', '[PAD]'], 'has [PAD] on line 2, not 1')])
def test_a_vocabulary_without_what_the_file_relies_on_is_refused(tokens, words):
    with pytest.raises(SystemExit, match=re.escape(f'--vocab v.txt {words}: padding is id 0 = [PAD]')):
        m3ae.check_vocab(tokens, 'v.txt')
    m3ae.check_vocab(['[PAD]', 'x', '[UNK]'], 'v.txt')  # BERT's order: [PAD] first, [UNK] anywhere


# --------------------------------------------------------------------------- 2. masking


@pytest.mark.parametrize('N,keep', [(16, 4), (64, 16), (64, 0), (7, 3)])
def test_masking_one_permutation_per_batch(N, keep):
    x = torch.randn(3, N, 5)
    noise = torch.rand(N, generator=torch.Generator().manual_seed(N))
    pad = torch.rand(3, N) < 0.3
    x_vis, mask, restore, pad_vis = m3ae.random_masking(x, keep, noise, pad)
    order = noise.argsort()
    assert x_vis.shape == (3, keep, 5) and mask.shape == (3, N) and mask.dtype == torch.bool
    assert (mask.sum(1) == N - keep).all() and (mask == mask[:1]).all()  # the same positions for every sample
    assert set(torch.nonzero(~mask[0]).flatten().tolist()) == set(order[:keep].tolist())  # smallest noise kept
    assert torch.equal(x_vis, x[:, order[:keep]]) and torch.equal(pad_vis, pad[:, order[:keep]])
    assert torch.equal(order[restore], torch.arange(N))  # ids_restore undoes the shuffle


def test_masks_are_fresh_each_call():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 4)
    assert not torch.equal(m3ae.random_masking(x, 16)[1], m3ae.random_masking(x, 16)[1])


# --------------------------------------------------------------------------- 3. model structure and init


def reference_keys(depth, dec_depth):
    blk = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight', 'attn.proj.bias',
           'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    keys = {'cls_token', 'encoder_image_type_embedding', 'encoder_text_type_embedding', 'decoder_image_type_embedding',
            'decoder_text_type_embedding', 'image_mask_embedding', 'text_mask_embedding', 'text_embedding.weight',
            'image_embedding.weight', 'image_embedding.bias', 'decoder_input_projection.weight',
            'decoder_input_projection.bias', 'decoder_image_output.weight', 'decoder_image_output.bias',
            'decoder_text_output.weight', 'decoder_text_output.bias', 'encoder.norm.weight', 'encoder.norm.bias',
            'decoder.norm.weight', 'decoder.norm.bias'}
    keys |= {f'encoder.blocks.{i}.{k}' for i in range(depth) for k in blk}
    return keys | {f'decoder.blocks.{i}.{k}' for i in range(dec_depth) for k in blk}


def test_state_dict_keys_and_flax_defaults():
    model = tiny()
    assert set(model.state_dict()) == reference_keys(m3ae.MODELS['tiny'][2], m3ae.MODELS['tiny'][5])
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert m.eps == 1e-6
        if isinstance(m, nn.GELU):
            assert m.approximate == 'tanh'
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 4 + 2


def test_parameter_count_base_and_large():
    """Counted by hand from the Flax modules: Dense(p*p*3 -> D), Embed(30522, D), cls and 2 types (D),
    2 types and 2 masks (512), blocks of
    12D^2 + 13D, a final LN per stack, Dense(D -> 512), heads Dense(512 -> 768) and Dense(512 -> 30522)."""
    V, Dd = 30522, 512
    for name in ('base', 'large'):
        p, Dm, depth, _, _, dec_depth, _ = m3ae.MODELS[name]
        with torch.device('meta'):
            model = m3ae.M3AE(256, *m3ae.MODELS[name], V)
        want = (768 * Dm + Dm) + V * Dm + 3 * Dm + 4 * Dd + depth * (12 * Dm * Dm + 13 * Dm) + 2 * Dm \
            + (Dm * Dd + Dd) + dec_depth * (12 * Dd * Dd + 13 * Dd) + 2 * Dd + (Dd * 768 + 768) + (Dd * V + V)
        assert sum(q.numel() for q in model.parameters()) == want
    assert want == 376_155_194  # large (302.3M in its encoder blocks), with BERT's 30522-token vocabulary in and out


def test_init_statistics():
    model = m3ae.M3AE(32, *m3ae.MODELS['tiny'], 3000)
    assert abs(model.text_embedding.weight.std().item() - 1.0) < 0.02  # Flax Embed: N(0, 1)
    for name in ('cls_token', 'encoder_image_type_embedding', 'decoder_text_type_embedding', 'text_mask_embedding'):
        assert 0.01 < getattr(model, name).std().item() < 0.04  # N(0, .02) on 128 values
    for lin in (model.image_embedding, model.encoder.blocks[0].attn.qkv, model.decoder_text_output):
        out_f, in_f = lin.weight.shape
        bound = math.sqrt(6 / (in_f + out_f))  # xavier_uniform of the whole (fused) matrix
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.95 * bound
        assert not lin.bias.any()
    assert (model.encoder.norm.weight == 1).all() and not model.decoder.blocks[1].norm2.bias.any()


def test_position_tables_hand_values():
    model = tiny()
    t = model.enc_text_pos[0]  # (32, 128): 1-D [sin | cos], omega_k = 1 / 10000^(k / 64)
    assert torch.allclose(t[3, :2], torch.tensor([math.sin(3), math.sin(3 / 10000 ** (1 / 64))]))
    assert torch.allclose(t[3, 64:66], torch.tensor([math.cos(3), math.cos(3 / 10000 ** (1 / 64))]))
    img = model.dec_image_pos[0]  # (16, 128) for a 4x4 grid, row-major; first half the column, second the row
    assert img.shape == (16, 128)
    assert torch.allclose(img[6, 0], torch.tensor(math.sin(2.0))) and torch.allclose(img[6, 64], torch.tensor(math.sin(1.0)))


def test_no_decay_list_by_name_component():
    model = tiny()
    groups = m3ae.param_groups(model, 0.05)
    names = {id(q): n for n, q in model.named_parameters()}
    no_decay = {names[id(q)] for q in groups[0]['params']}
    assert no_decay == {n for n, _ in model.named_parameters() if n.endswith('bias') or n in {
        'cls_token', 'encoder_image_type_embedding', 'encoder_text_type_embedding', 'decoder_image_type_embedding',
        'decoder_text_type_embedding', 'image_mask_embedding', 'text_mask_embedding', 'text_embedding.weight'}}
    decay = {names[id(q)] for q in groups[1]['params']}
    assert {'encoder.norm.weight', 'image_embedding.weight', 'decoder_text_output.weight'} <= decay  # LN scale too
    assert groups[1]['weight_decay'] == 0.05 and len(no_decay) + len(decay) == len(names)


# --------------------------------------------------------------------------- 4. losses


def test_image_loss_written_out_and_blind_to_visible_patches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    want = sum(sum(((pred[b, n] - target[b, n]) ** 2).mean() for n in range(6) if mask[b, n]) / 3 for b in range(2)) / 2
    assert torch.allclose(m3ae.image_loss(pred, target, mask), want)
    moved = pred + 5 * (~mask)[..., None]  # change predictions of visible patches only
    assert torch.equal(m3ae.image_loss(moved, target, mask), m3ae.image_loss(pred, target, mask))


def test_text_loss_written_out_ignores_pads_and_visible_tokens():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 1], [1, 0, 1, 0, 0]], dtype=torch.bool)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # 3rd: empty caption
    logp = torch.log_softmax(logits, -1)
    per = [-sum(logp[b, i, ids[b, i]] for i in range(5) if mask[b, i] and not pad[b, i]) /
           max(sum(bool(mask[b, i] and not pad[b, i]) for i in range(5)), 1e-5) for b in range(3)]
    loss, acc = m3ae.text_loss(logits, ids, mask, pad)
    assert torch.allclose(loss, (per[0] + per[1] + 0.0) / 3)  # the empty sample counts 0 in the batch mean
    moved = logits + 10 * torch.randn(3, 5, 7) * (~mask | pad)[..., None]
    assert torch.equal(m3ae.text_loss(moved, ids, mask, pad)[0], loss)
    right = nn.functional.one_hot(ids, 7).float() * 50
    assert m3ae.text_loss(right, ids, mask, pad)[1].item() == pytest.approx(2 / 3)  # 2 samples right, 1 empty


def test_forward_combines_the_weighted_losses_and_targets_are_the_input_patches():
    model = tiny(weights=(1.0, 0.5, 2.0))
    imgs, text, pad = batch()
    utext, upad = batch(seed=3)[1:]
    torch.manual_seed(5)
    loss, out = model(imgs, text, pad, utext, upad)
    assert torch.allclose(loss, out['image_loss'] + 0.5 * out['text_loss'] + 2.0 * out['unpaired_loss'])
    assert out['pred'].shape == (3, 16, P * P * 3) and out['logits'].shape == (3, 8, len(VOCAB))
    assert torch.allclose(out['image_loss'], m3ae.image_loss(out['pred'], common.patchify(imgs, P), out['mask']))
    assert out['mask'].sum(1).tolist() == [12] * 3 and out['text_mask'].sum(1).tolist() == [6] * 3


def test_padding_never_changes_real_tokens():
    """Other ids at padded positions, same masks: every output at a real position (and both losses) is unchanged."""
    model = tiny().eval()
    imgs, text, pad = batch()
    other = text.masked_fill(pad, 7)
    n = noises()
    _, a = model(imgs, text, pad, noise=n)
    _, b = model(imgs, other, pad, noise=n)
    assert torch.allclose(a['pred'], b['pred'], atol=1e-6)
    assert torch.allclose(a['logits'][~pad], b['logits'][~pad], atol=1e-6)
    assert torch.allclose(a['text_loss'], b['text_loss']) and torch.allclose(a['image_loss'], b['image_loss'])
    assert not torch.allclose(a['logits'][pad], b['logits'][pad])  # the pads themselves did change


def test_text_only_forward_is_cls_plus_text():
    model = tiny()
    _, text, pad = batch()
    x, img, (mask, restore) = model.forward_encoder(None, text, pad)
    assert img == (None, None) and x.shape == (3, 1 + 2, D) and mask.shape == (3, 8)
    _, logits = model.forward_decoder(x, None, restore, pad)
    assert logits.shape == (3, 8, len(VOCAB))


class TimmViT(nn.Module):
    """timm's VisionTransformer forward (cls prepended, + pos_embed, blocks, norm) with its names."""

    def __init__(self, depth, heads):
        super().__init__()
        self.patch_embed = common.PatchEmbed(32, P, 3, D)
        self.cls_token, self.pos_embed = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(1, 17, D))
        self.blocks = nn.ModuleList(common.Block(D, heads, eps=1e-6) for _ in range(depth))
        for blk in self.blocks:
            blk.mlp.act = nn.GELU(approximate='tanh')
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def test_encoder_export_in_timm_layout_gives_the_same_features():
    model = tiny()
    vit = TimmViT(m3ae.MODELS['tiny'][2], m3ae.MODELS['tiny'][3])
    vit.load_state_dict(m3ae.encoder_state_dict(model), strict=True)
    imgs = batch()[0]
    model.mask_ratio = 0.0  # the reference's forward_representation: every patch, in order, no text
    ours = model.forward_encoder(common.patchify(imgs, P), None, None, noise=(torch.arange(16.0), None))[0]
    assert torch.allclose(vit(imgs), ours, atol=1e-5)
    assert not m3ae.encoder_state_dict(model)['pos_embed'][0, 0].any()  # cls: no position, no type


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = tiny()
    imgs, text, pad = batch()
    opt = torch.optim.AdamW(m3ae.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    n = noises()
    losses = []
    for _ in range(8):
        loss, _ = model(imgs, text, pad, noise=n)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --------------------------------------------------------------------------- 5. data


def test_caption_folder_and_tsv_pairing_and_skips(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    (root / 'sub').mkdir(parents=True)
    for name in ('a.jpg', 'b.png', 'sub/d.jpg'):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / name)
    (root / 'a.txt').write_text('Hello, the cat!\n')
    (root / 'sub' / 'd.txt').write_text('un')
    (root / 'c.jpg').write_bytes(b'\xff\xd8\xff\xe0 broken')
    (root / 'c.txt').write_text('the cat')
    ds = m3ae.CaptionedImages(root, 32, 6, seed=0)
    assert 'note: 1 of 4 images have no .txt caption' in capsys.readouterr().err  # b.png
    ds.tokenizer = m3ae.WordPiece(VOCAB)
    assert [f.name for f in ds.files] == ['a.jpg', 'b.png', 'c.jpg', 'd.jpg']
    v = {t: i for i, t in enumerate(VOCAB)}
    (img, ids, pad), label, bad = ds[(0, 0)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and bad == -1
    assert ids.tolist() == [v['hello'], v[','], v['the'], v['cat'], v['!'], 0] and pad.tolist() == [0] * 5 + [1]
    (_, ids, pad), _, bad = ds[(0, 1)]
    assert pad.all() and bad == -1  # no caption: empty text
    (_, ids, pad), _, bad = ds[(0, 2)]  # broken image: the next pair stands in, with ITS caption
    assert bad == 2 and ids.tolist()[:1] == [v['un']] and pad.sum() == 5
    assert torch.equal(ds[(3, 0)][0][0], ds[(3, 0)][0][0])  # crops are a function of (seed, epoch, index)
    (tmp_path / 'pairs.tsv').write_text('data/a.jpg\tthe cat\ndata/gone.jpg\thello\n\ndata/sub/d.jpg\n')
    tsv = m3ae.CaptionedImages(tmp_path / 'pairs.tsv', 32, 4)
    tsv.tokenizer = m3ae.WordPiece(VOCAB)
    assert [f.name for f in tsv.files] == ['a.jpg', 'gone.jpg', 'd.jpg'] and tsv.texts == ['the cat', 'hello', '']
    (_, ids, _), _, bad = tsv[(0, 1)]  # missing file: replaced by d.jpg (empty caption) and counted
    assert bad == 1 and not ids.any()


def test_synthetic_captions_describe_the_picture():
    ds = m3ae.SyntheticPairs(40, 32, 12)
    ds.tokenizer = m3ae.WordPiece(['[PAD]', '[UNK]'] + sorted({w for i in range(40) for w in ds.caption(i).split()}))
    for i in range(40):
        bg, fg, shape, size, place = ds.scene(i)
        (img, ids, pad), _, _ = ds[i]
        assert ds.caption(i) == f'a {size} {fg} {shape} on {bg} at the {place}'
        assert ' '.join(ds.tokenizer.tokens[t] for t in ids[~pad]) == ds.caption(i)
        cy, cx = {'left': (16, 8), 'right': (16, 23), 'top': (8, 16), 'bottom': (23, 16), 'middle': (16, 16)}[place]
        assert img[:, cy + (2 if shape == 'triangle' else 0), cx].tolist() == list(m3ae.COLOURS[fg])
        assert img[:, 0, 0].tolist() == list(m3ae.COLOURS[bg])


# --------------------------------------------------------------------------- 6. --init from the reference's Flax pickle


def flax_params(sd, depth, dec_depth):
    """A torch state dict of m3ae.py in the reference's Flax layout (model.py's nn.compact names, Dense kernels as
    (in, out)), written out by hand."""
    n = lambda k: sd[k].numpy().copy()  # noqa: E731
    dense = lambda k: {'kernel': np.asfortranarray(n(k + '.weight').T), 'bias': n(k + '.bias')}  # noqa: E731

    def transformer(prefix, blocks):
        t = {'LayerNorm_0': {'scale': n(f'{prefix}.norm.weight'), 'bias': n(f'{prefix}.norm.bias')}}
        for i in range(blocks):
            b = f'{prefix}.blocks.{i}.'
            t[f'Block_{i}'] = {'LayerNorm_0': {'scale': n(b + 'norm1.weight'), 'bias': n(b + 'norm1.bias')},
                               'Attention_0': {'Dense_0': dense(b + 'attn.qkv'), 'Dense_1': dense(b + 'attn.proj')},
                               'LayerNorm_1': {'scale': n(b + 'norm2.weight'), 'bias': n(b + 'norm2.bias')},
                               'TransformerMLP_0': {'fc1': dense(b + 'mlp.fc1'), 'fc2': dense(b + 'mlp.fc2')}}
        return t
    params = {'text_embedding': {'embedding': n('text_embedding.weight')}, 'image_embedding': dense('image_embedding'),
              'encoder': transformer('encoder', depth), 'decoder': transformer('decoder', dec_depth),
              'decoder_input_projection': dense('decoder_input_projection'),
              'decoder_image_output': {'Dense_0': dense('decoder_image_output')},
              'decoder_text_output': {'Dense_0': dense('decoder_text_output')}}
    params.update({k: n(k) for k in sd if k.endswith(('cls_token', '_type_embedding', '_mask_embedding'))})
    params['encoder']['Block_0']['LayerNorm_1']['scale'].flags.writeable = False  # jax.device_get: read-only arrays
    return params


@contextlib.contextmanager
def importable(**classes):
    """Modules holding `classes` ('pkg.mod.Name': object) while a pickle is written, gone before it is read."""
    mods = {}
    for path, obj in classes.items():
        module, name = path.rsplit('.', 1)
        parts = module.split('.')
        for i in range(1, len(parts) + 1):
            mods.setdefault('.'.join(parts[:i]), types.ModuleType('.'.join(parts[:i])))
        obj.__module__, obj.__qualname__ = module, name
        setattr(mods[module], name, obj)
    new = {k: v for k, v in mods.items() if k not in sys.modules}
    sys.modules.update(new)
    try:
        yield
    finally:
        for k in new:
            del sys.modules[k]


def cloudpickle_like(params, step=1234):
    """The bytes m3ae_main.py writes (cloudpickle.dump of {'step', 'epoch', 'variant', 'state'}) without cloudpickle:
    the same globals and opcodes cloudpickle 3.1 writes for such a state (checked outside the repository on a
    real cloudpickle file): the train state and optax's states by reference (NEWOBJ + BUILD), numpy arrays through
    _frombuffer (bytearray or bytes), and the optimizer's local functions by value (_make_function of a code object
    that _builtin_type('CodeType') makes, with subimport'ed modules and _function_setstate)."""
    cp = dict(_make_function=lambda *a: None, _builtin_type=lambda name: None, subimport=lambda name: None,
              _function_setstate=lambda obj, state: None)
    cp = {k: types.FunctionType(v.__code__, {}, k) for k, v in cp.items()}

    class Code:
        def __reduce__(self):
            return CodeType(), (2, 0, 0, 2, 3, 19, b'|\x00S\x00', (None,), (), ('updates', 'state'), 'optax', 'fn')

    class CodeType:
        def __call__(self, *args):
            pass

        def __reduce__(self):
            return cp['_builtin_type'], ('CodeType',)

    class Function:
        def __init__(self, name):
            self.name = name

        def __call__(self):
            pass

        def __reduce__(self):
            globs = {'jnp': Module('jax.numpy'), '__package__': 'optax._src'}
            return (cp['_make_function'], (Code(), globs, self.name, None, None), ({'__name__': self.name}, {}), None,
                    None, cp['_function_setstate'])

    class Module:
        def __init__(self, name):
            self.name = name

        def __reduce__(self):
            return cp['subimport'], (self.name,)

    @dataclasses.dataclass(frozen=True)
    class M3AETrainState:  # flax.struct.dataclass: a frozen dataclass
        step: object
        apply_fn: object
        params: object
        tx: object
        opt_state: object
        tokenizer_params: object = None

    GradientTransformation = collections.namedtuple('GradientTransformation', 'init update')
    ScaleByAdamState = collections.namedtuple('ScaleByAdamState', 'count mu nu')

    class FrozenDict(dict):
        def __reduce__(self):
            return FrozenDict, (dict(self),)

    with importable(**{f'cloudpickle.cloudpickle.{k}': v for k, v in cp.items()},
                    **{'m3ae.model.M3AETrainState': M3AETrainState, 'flax.core.frozen_dict.FrozenDict': FrozenDict,
                       'optax._src.base.GradientTransformation': GradientTransformation,
                       'optax._src.transform.ScaleByAdamState': ScaleByAdamState}):
        tx = GradientTransformation(Function('init_fn'), Function('update_fn'))
        adam = ScaleByAdamState(np.asarray(step, np.int32), {'params': params}, FrozenDict({'params': params}))
        state = M3AETrainState(np.asarray(step, np.int32), None, {'params': params}, tx, (adam,))
        variant = collections.OrderedDict([('m3ae.model_type', 'tiny'), ('seed', 42)])
        return pickle.dumps({'step': step, 'epoch': 3, 'variant': variant, 'state': state}, protocol=5)


def test_init_reads_the_reference_flax_pickle_as_data(tmp_path, capsys):
    src = tiny(V=len(VOCAB), seed=5)
    path = tmp_path / 'model.pkl'
    path.write_bytes(cloudpickle_like(flax_params(src.state_dict(), m3ae.MODELS['tiny'][2], m3ae.MODELS['tiny'][5])))
    globals_named = {a for op, a, _ in pickletools.genops(path.read_bytes()) if op.name == 'SHORT_BINUNICODE'}
    assert {'_make_function', '_builtin_type', 'M3AETrainState', '_frombuffer'} <= globals_named
    before = set(sys.modules)
    model = tiny(V=len(VOCAB), seed=6)
    assert m3ae.load_flax(model, path) is True
    assert '--init ' + str(path) + ': Flax parameters of the reference at step 1234: 92 of 92 tensors loaded' in \
        capsys.readouterr().out
    assert set(sys.modules) == before  # nothing imported: no flax, optax, jax or cloudpickle
    for k, v in src.state_dict().items():  # values copied as they are (kernels transposed back)
        assert torch.equal(model.state_dict()[k], v), k
    other = tiny(V=len(VOCAB) + 1)  # another vocabulary size: its text tensors keep their initialisation
    m3ae.load_flax(other, path)
    assert 'kept as initialised: [\'decoder_text_output.bias\', \'decoder_text_output.weight\', ' \
           '\'text_embedding.weight\']' in capsys.readouterr().out
    torch.save(src.state_dict(), tmp_path / 'ours.pth')  # a torch checkpoint is not read here
    assert m3ae.load_flax(model, tmp_path / 'ours.pth') is False


@pytest.mark.parametrize('target', ['os.system', 'subprocess.call', 'builtins.exec'])
def test_a_pickle_naming_a_harmful_global_is_refused_and_runs_nothing(target, tmp_path):
    marker = tmp_path / 'ran'
    module, name = target.rsplit('.', 1)
    fn = getattr(importlib.import_module(module), name)
    arg = f'open({str(marker)!r}, "w")' if name == 'exec' else (['touch', str(marker)] if module == 'subprocess' else
                                                               f'touch {marker}')

    class Payload:
        def __reduce__(self):
            return fn, (arg,)
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps({'step': 1, 'variant': {'x': Payload()}, 'state': {}}, protocol=4))
    with pytest.raises(SystemExit) as e:
        m3ae.load_flax(tiny(), path)
    shown = {'os.system': os.system.__module__ + '.system'}.get(target, target)  # posix.system on Linux
    assert f'refused: it names {shown}, which no Flax checkpoint needs; nothing of the file was run' in str(e.value)
    assert '\n' not in str(e.value) and not marker.exists()
    path.write_bytes(pickle.dumps({'state': 1}, protocol=5)[:-5])  # cut short
    with pytest.raises(SystemExit, match='not a checkpoint of the M3AE reference'):
        m3ae.load_flax(tiny(), path)
