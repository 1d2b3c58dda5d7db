"""Unit tests of milan.py: the CLIP teacher (file formats, an explicit re-computation, errors), semantic-aware
sampling, the prompting decoder, the loss, init, weight-decay groups, keys and parameter counts."""
import copy
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import milan

PATCH, D, DEPTH, HEADS, DEC_D, DEC_DEPTH, DEC_HEADS = milan.MODELS['tiny']
GRID = 4  # 32 px / patch 8
N = GRID * GRID


def tiny_teacher(seed=0, width=128, layers=2, out=32):
    torch.manual_seed(seed)
    t = milan.CLIPVisual(PATCH, width, layers, N + 1, out)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped key cannot go unnoticed
        for n, p in t.named_parameters():
            if n.startswith('ln') or '.ln_' in n or n.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    return t.eval()


def tiny_model(seed=0, out=32):
    torch.manual_seed(seed)
    return milan.MILAN(32, PATCH, D, DEPTH, HEADS, DEC_D, DEC_DEPTH, DEC_HEADS, out)


def reference_keys(depth, dec_depth):
    """models_milan.MaskedAutoencoderViT's state-dict keys (prompting decoder: attn.q + attn.kv)."""
    keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias',
            'mask_token', 'decoder_pos_embed', 'decoder_embed.weight', 'decoder_embed.bias', 'decoder_norm.weight',
            'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias'}
    for i in range(depth):
        for m in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'blocks.{i}.{m}.weight', f'blocks.{i}.{m}.bias'}
    for i in range(dec_depth):
        for m in ('norm1', 'attn.q', 'attn.kv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'decoder_blocks.{i}.{m}.weight', f'decoder_blocks.{i}.{m}.bias'}
    return keys


def clip_visual_keys(layers):
    """OpenAI CLIP's visual keys (section 4 of the method sheet), without the 'visual.' prefix."""
    keys = {'conv1.weight', 'class_embedding', 'positional_embedding', 'ln_pre.weight', 'ln_pre.bias',
            'ln_post.weight', 'ln_post.bias', 'proj'}
    for i in range(layers):
        p = f'transformer.resblocks.{i}.'
        keys |= {p + k for k in ('ln_1.weight', 'ln_1.bias', 'attn.in_proj_weight', 'attn.in_proj_bias',
                                 'attn.out_proj.weight', 'attn.out_proj.bias', 'ln_2.weight', 'ln_2.bias',
                                 'mlp.c_fc.weight', 'mlp.c_fc.bias', 'mlp.c_proj.weight', 'mlp.c_proj.bias')}
    return keys


class OpenAIStyle(nn.Module):
    """Holds a visual tower under 'visual.' plus a text-side tensor, as the CLIP file does; traced, then saved."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, x):
        return x * self.logit_scale


@pytest.fixture(scope='module')
def teacher_files(tmp_path_factory):
    """The same fp16 weights as OpenAI's TorchScript archive and as a plain state dict (MILAN's .pth.tar)."""
    d = tmp_path_factory.mktemp('teacher')
    src = tiny_teacher(1)
    wrap = OpenAIStyle(src).half()
    traced = torch.jit.trace(wrap, torch.ones(2, dtype=torch.half))
    torch.jit.save(traced, str(d / 'ViT-tiny.pt'))
    torch.save({**wrap.state_dict(), 'input_resolution': torch.tensor(32)}, d / 'clip_tiny.pth.tar')
    return d / 'ViT-tiny.pt', d / 'clip_tiny.pth.tar', src


# --------------------------------------------------------------------------- teacher


def test_teacher_file_formats_load_the_same(teacher_files):
    script, plain, src = teacher_files
    a, b = milan.load_teacher(script, N + 1, PATCH, 3), milan.load_teacher(plain, N + 1, PATCH, 3)
    assert set(a.state_dict()) == clip_visual_keys(2)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    for k, v in src.state_dict().items():  # fp16 in the file, fp32 in the teacher
        assert a.state_dict()[k].dtype == torch.float32
        assert torch.equal(a.state_dict()[k], v.half().float()) and torch.equal(b.state_dict()[k], a.state_dict()[k])
    imgs = torch.randn(2, 3, 32, 32)
    (fa, ia), (fb, ib) = a(imgs), b(imgs)
    assert fa.shape == (2, N + 1, 32) and ia.shape == (2, N)
    assert torch.equal(fa, fb) and torch.equal(ia, ib)


def explicit_clip(t, imgs):
    """CLIP's visual forward written out: explicit softmax attention, QuickGELU, ln_post + proj on all tokens."""
    x = F.conv2d(imgs, t.conv1.weight, stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([t.class_embedding.expand(x.shape[0], 1, -1), x], 1) + t.positional_embedding
    x = F.layer_norm(x, x.shape[-1:], t.ln_pre.weight, t.ln_pre.bias, 1e-5)
    for blk in t.transformer.resblocks:
        h = F.layer_norm(x, x.shape[-1:], blk.ln_1.weight, blk.ln_1.bias, 1e-5)
        q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
        B, L, W = q.shape
        heads = W // 64
        q, k, v = (z.reshape(B, L, heads, 64).transpose(1, 2) for z in (q, k, v))
        attn = (q @ k.transpose(-1, -2) / 8).softmax(-1)  # (B, heads, L, L)
        x = x + blk.attn.out_proj((attn @ v).transpose(1, 2).reshape(B, L, W))
        h = blk.mlp.c_fc(F.layer_norm(x, x.shape[-1:], blk.ln_2.weight, blk.ln_2.bias, 1e-5))
        x = x + blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))
    x = F.layer_norm(x, x.shape[-1:], t.ln_post.weight, t.ln_post.bias, 1e-5)
    return x @ t.proj, attn.mean(1)  # (B, L, out), (B, L, L) of the last block


def test_teacher_matches_explicit_computation():
    t = tiny_teacher(2)
    imgs = torch.randn(3, 3, 32, 32)
    feat, importance = t(imgs)
    ref_feat, attn = explicit_clip(t, imgs)
    torch.testing.assert_close(feat, ref_feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(importance, attn[:, 0, 1:], rtol=1e-5, atol=1e-7)  # cls query row, patch keys
    assert torch.all(importance > 0) and torch.all(importance.sum(1) < 1)  # not renormalised: cls column left out


def test_teacher_errors(teacher_files, tmp_path):
    script, plain, _ = teacher_files
    (tmp_path / 'broken.pt').write_bytes(script.read_bytes()[:3000])
    torch.save({'visual.conv1.weight': torch.zeros(8, 3, 8, 8)}, tmp_path / 'other.pth')
    sd = torch.load(plain, weights_only=True)
    del sd['visual.transformer.resblocks.1.attn.in_proj_bias']
    torch.save(sd, tmp_path / 'partial.pth')
    cases = [(tmp_path / 'none.pt', 'no such file'), (tmp_path / 'broken.pt', 'cut short'),
             (tmp_path / 'other.pth', 'not a CLIP ViT image tower'), (tmp_path / 'partial.pth', 'does not fit')]
    for path, words in cases:
        with pytest.raises(SystemExit) as e:
            milan.load_teacher(path, N + 1, PATCH, 3)
        assert str(path) in str(e.value) and words in str(e.value), e.value
    with pytest.raises(SystemExit, match='patch 8, 17 tokens.*the student has patch 8, 65 tokens'):
        milan.load_teacher(script, 65, PATCH, 3)


class ScriptableBlock(nn.Module):
    """OpenAI CLIP's ResidualAttentionBlock as its model.py writes it (nn.MultiheadAttention), so it can be scripted."""

    def __init__(self, width):
        super().__init__()
        self.attn, self.ln_1, self.ln_2 = nn.MultiheadAttention(width, width // 64), nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=milan.QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):  # (L, B, W), sequence first as in CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ScriptableCLIP(nn.Module):
    """OpenAI CLIP's layout: the VisionTransformer under 'visual' (forward: ln_post(cls) @ proj) and text-side state."""

    def __init__(self, width=128, layers=2, out=32):
        super().__init__()
        self.visual = nn.Module()
        v, s = self.visual, width ** -0.5
        v.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
        v.class_embedding, v.positional_embedding = nn.Parameter(s * torch.randn(width)), nn.Parameter(
            s * torch.randn(N + 1, width))
        v.ln_pre, v.ln_post, v.proj = nn.LayerNorm(width), nn.LayerNorm(width), nn.Parameter(s * torch.randn(width, out))
        v.transformer = nn.Module()
        v.transformer.resblocks = nn.Sequential(*[ScriptableBlock(width) for _ in range(layers)])
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.register_buffer('input_resolution', torch.tensor(32))

    def forward(self, imgs):
        v = self.visual
        x = v.conv1(imgs).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer.resblocks(v.ln_pre(x).transpose(0, 1)).transpose(0, 1)  # (B, 1+N, W)
        return v.ln_post(x[:, 0]) @ v.proj * self.logit_scale.exp()


def archive_tensors(path):
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].split('/')[0]
        return milan.script_tensors(milan.ArchiveUnpickler(z, root).load())


def test_torchscript_archive_is_read_as_data_like_jit_load(tmp_path):
    """A scripted fp16 CLIP (nn.MultiheadAttention, OpenAI's layout): the reader gives exactly torch.jit.load's
    state_dict, and the teacher built from it computes CLIP's cls feature."""
    torch.manual_seed(0)
    src = ScriptableCLIP()
    with torch.no_grad():
        for name, p in src.named_parameters():  # non-trivial norms and biases; values exact in fp16
            p.copy_((p + 0.1 * torch.randn_like(p) * (name.endswith('bias') or '.ln_' in name)).half())
    path = tmp_path / 'ViT-tiny.pt'
    torch.jit.save(torch.jit.script(copy.deepcopy(src).half()), str(path))
    ours, jit = archive_tensors(path), torch.jit.load(str(path)).state_dict()
    assert set(ours) == set(jit) and 'visual.transformer.resblocks.1.attn.in_proj_weight' in ours
    for k in jit:
        assert ours[k].dtype == jit[k].dtype and torch.equal(ours[k], jit[k]), k
    teacher = milan.load_teacher(path, N + 1, PATCH, 3)
    imgs = torch.randn(2, 3, 32, 32)
    feats, _ = teacher(imgs)
    with torch.no_grad():
        torch.testing.assert_close(feats[:, 0] * src.logit_scale.exp(), src(imgs), rtol=1e-4, atol=1e-5)


class WritesOnLoad(nn.Module):
    """A scripted module whose TorchScript __setstate__ creates a file: torch.jit.load runs it while loading."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.w = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.target, self.w, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        self.w = state[1] + torch.from_file(self.target, True, 2, dtype=torch.float32)  # used: not optimised away

    def forward(self, x):
        return x * self.w


class WithPayload(nn.Module):
    def __init__(self, target, visual):
        super().__init__()
        self.payload, self.visual = WritesOnLoad(target), visual

    def forward(self, x):
        return self.payload(x)


def test_teacher_archive_runs_no_code(tmp_path):
    """torch.jit.load of this archive creates a file (shown on a copy aimed at another path); milan.py reads the
    same archive, with a genuine CLIP tower beside the payload, and nothing is created."""
    def archive(name, with_clip=True):
        path = tmp_path / f'{name}.pt'
        module = WithPayload(str(tmp_path / f'{name}.marker'), ScriptableCLIP().visual) if with_clip else \
            WritesOnLoad(str(tmp_path / f'{name}.marker'))
        torch.jit.save(torch.jit.script(module), str(path))
        return path, tmp_path / f'{name}.marker'
    control, evil, alone = archive('control'), archive('evil'), archive('alone', with_clip=False)
    torch.jit.load(str(control[0]))
    assert control[1].exists()  # the route works on this torch: loading the archive with torch.jit runs its code
    teacher = milan.load_teacher(evil[0], N + 1, PATCH, 3)  # the tower beside the payload is read
    assert not evil[1].exists() and teacher.proj.shape == (128, 32)
    with pytest.raises(SystemExit) as e:
        milan.load_teacher(alone[0], N + 1, PATCH, 3)
    line = str(e.value.code)
    assert line.startswith(f'--teacher {alone[0]}: not a CLIP ViT image tower') and '\n' not in line, line
    assert not alone[1].exists() and not evil[1].exists()


class Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class StorageRef:  # written as torch writes a tensor's storage: a persistent id naming data/<key>
    def __init__(self, key):
        self.key = key


class ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ('storage', torch.FloatStorage, obj.key, 'cpu', 1) if isinstance(obj, StorageRef) else None


def test_crafted_archive_pickles_are_refused_in_one_line(tmp_path):
    """data.pkl that names a function, a storage outside the archive, or a view past its storage: one line each."""
    marker = tmp_path / 'marker'
    tensor = lambda key, size: Call(torch._utils._rebuild_tensor_v2, StorageRef(key), 0, size, (1,), False,  # noqa
                                    OrderedDict())
    cases = [(Call(os.system, f'touch {marker}'), 'refused posix.system'),
             (Call(eval, f'open({str(marker)!r}, "w")'), 'refused builtins.eval'),
             ({'visual.proj': tensor('../../x', (1,))}, "KeyError: \"There is no item named 'x/data/../../x'"),
             ({'visual.proj': tensor('0', (1000,))}, 'RuntimeError'),  # 1000 floats from a storage of 1
             ({'visual.proj': tensor('0', (1,)), 'visual.conv1.weight': tensor('0', (1,)),
               'visual.positional_embedding': tensor('0', (1,))}, 'not a CLIP ViT image tower'),  # 1-D, not 2-D/4-D
             ({'visual.proj': tensor('0', (1,))}, 'not a CLIP ViT image tower')]  # a well-formed archive, not CLIP
    for i, (obj, words) in enumerate(cases):
        buf = __import__('io').BytesIO()
        ArchivePickler(buf, protocol=2, fix_imports=False).dump(obj)
        path = tmp_path / f'crafted{i}.pt'
        with zipfile.ZipFile(path, 'w') as z:
            z.writestr('x/data.pkl', buf.getvalue())
            z.writestr('x/constants.pkl', pickle.dumps(()))
            z.writestr('x/data/0', torch.ones(1).numpy().tobytes())
        with pytest.raises(SystemExit) as e:
            milan.load_teacher(path, N + 1, PATCH, 3)
        line = str(e.value.code)
        assert line.startswith(f'--teacher {path}: ') and words in line and '\n' not in line, line
    assert not marker.exists()


def test_clip_vit_b16_parameter_count():
    t = milan.CLIPVisual(16, 768, 12, 197, 512)
    per_block = 4 * 768 + 3 * 768 * 768 + 3 * 768 + 768 * 768 + 768 + 2 * 4 * 768 * 768 + 4 * 768 + 768
    expected = 768 * 3 * 256 + 768 + 197 * 768 + 4 * 768 + 12 * per_block + 768 * 512
    assert sum(p.numel() for p in t.parameters()) == expected == 86_192_640


# --------------------------------------------------------------------------- sampling


def test_order_to_mask_invariants():
    torch.manual_seed(0)
    ids = milan.attention_order(torch.rand(5, N) + 0.01)
    assert torch.equal(ids.sort(1).values, torch.arange(N).expand(5, -1))  # a permutation, no repeats
    ids_restore, mask = milan.order_to_mask(ids, 0.75)
    assert mask.dtype == torch.bool and torch.all(mask.sum(1) == 12)  # int(16 x 0.25) = 4 kept
    assert torch.equal(ids.gather(1, ids_restore), torch.arange(N).expand(5, -1))
    assert not mask.gather(1, ids[:, :4]).any() and mask.gather(1, ids[:, 4:]).all()
    assert not torch.equal(ids, milan.attention_order(torch.rand(5, N) + 0.01))  # fresh each call
    assert torch.all(milan.order_to_mask(ids, 0.7)[1].sum(1) == 12)  # int(16 x 0.3) = 4: the reference's rounding


def test_high_attention_patches_are_kept_more_often():
    torch.manual_seed(0)
    w = torch.tensor([8.0, 4.0, 2.0, 1.0] + [0.5] * 12)  # (16,)
    ids = milan.attention_order(w.expand(20000, -1))
    kept = torch.zeros(N).index_add_(0, ids[:, :4].flatten(), torch.ones(80000)) / 20000  # P(kept)
    assert kept[0] > kept[1] > kept[2] > kept[3] > kept[4:].max()
    first = torch.bincount(ids[:, 0], minlength=N) / 20000  # first draw: exactly w / sum(w)
    torch.testing.assert_close(first, w / w.sum(), atol=0.01, rtol=0)
    assert kept[0] < 1  # stochastic, not top-k


def test_sampling_matches_multinomial_without_replacement():
    """The first and the kept (first 2 of 5) positions are drawn with the probabilities of sampling without
    replacement, worked out by hand: P(first = i) = w_i / W; P(i in the first two) = w_i / W + sum_j w_j / W x
    w_i / (W - w_j). Also as often as torch.multinomial(replacement=False) keeps them. 200000 draws: a frequency
    has a standard deviation under 0.0012, the tolerances are 5 of them (one draw alone, 7 for two)."""
    w = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])
    W, n = w.sum().item(), 200_000
    first = w / W
    kept = torch.tensor([w[i] / W + sum(w[j] / W * w[i] / (W - w[j]) for j in range(5) if j != i) for i in range(5)])
    assert kept.sum().item() == pytest.approx(2.0)  # two positions kept per draw
    torch.manual_seed(0)
    ids = milan.attention_order(w.expand(n, -1))  # (n, 5)
    assert torch.equal(ids.sort(1).values, torch.arange(5).expand(n, -1))  # permutations
    freq = lambda ids, k: torch.bincount(ids[:, :k].flatten(), minlength=5) / n  # noqa: E731
    torch.testing.assert_close(freq(ids, 1), first, atol=0.006, rtol=0)
    torch.testing.assert_close(freq(ids, 2), kept, atol=0.006, rtol=0)
    torch.manual_seed(1)
    ref = torch.multinomial(w.expand(n, -1), 5, replacement=False)
    torch.testing.assert_close(freq(ids, 2), freq(ref, 2), atol=0.0085, rtol=0)


def test_random_order_is_uniform():
    torch.manual_seed(0)
    ids = milan.random_order(20000, N, 'cpu')
    kept = torch.bincount(ids[:, :4].flatten(), minlength=N) / 20000
    torch.testing.assert_close(kept, torch.full((N,), 0.25), atol=0.015, rtol=0)


# --------------------------------------------------------------------------- decoder, loss


def explicit_decoder(model, latent, mask, ids_keep):
    """Prompting decoder written out in patch order: every block updates only the masked positions; keys/values are
    the raw cls/visible tokens and the norm1-ed mask tokens."""
    x = model.decoder_embed(latent)  # (B, 1+N_vis, Dd)
    B = x.shape[0]
    full = model.mask_token.expand(B, N + 1, -1).clone()
    full[:, 0] = x[:, 0]
    for b in range(B):  # the encoder's visible tokens come in ids_keep order
        full[b, 1 + ids_keep[b]] = x[b, 1:]
    full = full + model.decoder_pos_embed
    is_mask = torch.cat([torch.zeros(B, 1, dtype=torch.bool), mask], 1)[..., None]  # (B, 1+N, 1)
    for blk in model.decoder_blocks:
        h = torch.where(is_mask, blk.norm1(full), full)
        q = blk.attn.q(h).reshape(B, N + 1, DEC_HEADS, -1).transpose(1, 2)
        k, v = (z.reshape(B, N + 1, DEC_HEADS, -1).transpose(1, 2) for z in blk.attn.kv(h).chunk(2, -1))
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(DEC_D // DEC_HEADS)).softmax(-1)
        y = full + blk.attn.proj((a @ v).transpose(1, 2).reshape(B, N + 1, -1))
        y = y + blk.mlp(blk.norm2(y))
        full = torch.where(is_mask, y, full)
    return model.decoder_pred(model.decoder_norm(full))


def test_decoder_updates_only_mask_tokens_and_matches_explicit():
    model = tiny_model()
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    ids = milan.random_order(3, N, 'cpu')
    ids_restore, mask = milan.order_to_mask(ids, 0.75)
    latent = model.forward_encoder(imgs, ids[:, :4])  # (B, 1+4, D)
    seen = {}
    model.decoder_norm.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    pred = model.forward_decoder(latent, ids, ids_restore)
    torch.testing.assert_close(pred, explicit_decoder(model, latent, mask, ids[:, :4]), rtol=1e-5, atol=1e-5)
    # cls and visible positions leave the blocks exactly as they entered (decoder_embed + pos)
    x = model.decoder_embed(latent) + 0
    torch.testing.assert_close(seen['x'][:, 0], x[:, 0] + model.decoder_pos_embed[0, 0], rtol=0, atol=0)
    vis = seen['x'][:, 1:].gather(1, ids[:, :4, None].expand(-1, -1, DEC_D))
    pos = model.decoder_pos_embed[0, 1:][ids[:, :4]]
    torch.testing.assert_close(vis, x[:, 1:] + pos, rtol=0, atol=0)
    # the fixed tokens are not detached: the loss at visible positions alone trains the encoder
    pred[:, 1:][~mask].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_hand_values_and_scope():
    t = torch.randn(2, N + 1, 32)
    assert milan.forward_loss(t * 3.7, t).item() == pytest.approx(0, abs=1e-6)  # scale-invariant, cos 1
    assert milan.forward_loss(-t, t).item() == pytest.approx(4, abs=1e-6)
    u = torch.zeros(2, N + 1, 32)
    u[..., 0], v = 1.0, torch.zeros(2, N + 1, 32)
    v[..., 1] = 1.0
    assert milan.forward_loss(u, v).item() == pytest.approx(2, abs=1e-6)  # orthogonal
    pred = torch.randn(2, N + 1, 32)
    p, q = pred / pred.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    expected = sum(2 - 2 * (p[b, i] * q[b, i]).sum() for b in range(2) for i in range(N + 1)) / (2 * (N + 1))
    torch.testing.assert_close(milan.forward_loss(pred, t), expected)
    base = milan.forward_loss(pred, t)
    for i in (0, 1, N):  # cls, a patch, the last patch: every token counts, whatever the mask
        bumped = pred.clone()
        bumped[:, i] += torch.randn(32)
        assert milan.forward_loss(bumped, t) != base, i


def test_model_forward_counts_cls_visible_and_masked():
    model, t = tiny_model(), tiny_teacher(3)
    imgs = torch.randn(2, 3, 32, 32)
    target, importance = t(imgs)
    torch.manual_seed(2)
    loss, out = model(imgs, target, importance, 0.75)
    assert out['pred'].shape == (2, N + 1, 32) and out['mask'].sum().item() == 24
    torch.testing.assert_close(loss, milan.forward_loss(out['pred'], target))
    loss.backward()
    assert model.cls_token.grad.abs().sum() > 0 and model.mask_token.grad.abs().sum() > 0


# --------------------------------------------------------------------------- init, keys, groups, training


def test_init_keys_and_groups():
    model = tiny_model()
    sd = model.state_dict()
    assert set(sd) == reference_keys(DEPTH, DEC_DEPTH)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0], common.sincos_2d(D, GRID, GRID, cls_token=True))
    assert torch.equal(model.decoder_pos_embed[0, 0], torch.zeros(DEC_D))
    for name, (fan_out, fan_in) in {'decoder_blocks.0.attn.kv.weight': (2 * DEC_D, DEC_D),
                                    'decoder_blocks.0.attn.q.weight': (DEC_D, DEC_D),
                                    'blocks.0.attn.qkv.weight': (3 * D, D), 'decoder_pred.weight': (32, DEC_D),
                                    'patch_embed.proj.weight': (D, 3 * PATCH * PATCH)}.items():
        w = sd[name].flatten(1)
        bound = math.sqrt(6 / (fan_in + fan_out))  # xavier over the whole (fused) matrix
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
    for k, v in sd.items():
        if k.endswith('.bias') and k != 'patch_embed.proj.bias':
            assert torch.all(v == 0), k
    big = milan.MILAN(224, *milan.MODELS['base'][:7])
    assert abs(big.cls_token.std().item() - 0.02) < 0.002 and abs(big.mask_token.std().item() - 0.02) < 0.003
    assert sum(p.numel() for p in big.parameters()) == 111_776_512  # = the reference's, pos tables included
    assert sum(p.numel() for p in big.parameters() if p.requires_grad) == 111_776_512 - 197 * (768 + 512)
    no_decay, decay = common.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay['params']}
    assert {'cls_token', 'mask_token', 'decoder_blocks.0.attn.kv.weight'} <= decayed
    assert not any(n.endswith('.bias') or 'norm' in n for n in decayed)
    assert len(decay['params']) + len(no_decay['params']) == len(sd) - 2


def test_encoder_state_dict_is_timm_vit():
    enc = milan.encoder_state_dict(tiny_model())
    assert set(enc) == {k for k in reference_keys(DEPTH, DEC_DEPTH) if not k.startswith(('decoder', 'mask_token'))}


def test_a_few_steps_lower_the_loss():
    model, t = tiny_model(), tiny_teacher(4)
    imgs = torch.randn(4, 3, 32, 32)
    target, importance = t(imgs)
    opt = torch.optim.AdamW(common.param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    ids = milan.attention_order(importance)
    losses = []
    for _ in range(8):
        loss, _ = model(imgs, target, importance, 0.75, ids_shuffle=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
