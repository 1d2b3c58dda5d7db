"""A preset's own input size applies when --input_size is not given, the same rule in every file (MixMIM's tiny
preset at 224 px did not split into windows); a given --input_size always wins. main() is stopped where it would
start the run (setup_run), so nothing is built or written."""
import importlib

import pytest
import torch

import common
from clitools import REPO

SIZES = {  # px of each preset when --input_size is not given: the reference's, and 64 for the demo presets
    'mae': {'tiny': 64, 'base': 224, 'large': 224, 'huge': 224},
    'simmim': {'swin_base': 192, 'swin_large': 192, 'vit_base': 224, 'tiny': 64, 'vit_tiny': 64},
    'beit': {'tiny': 64, 'base': 224, 'large': 224},
    'um_mae': {'swin_tiny': 256, 'swin_large': 256, 'pvt_small': 256, 'tiny': 64, 'pvt_tiny': 64},
    'hivit': {'micro': 64, 'tiny': 224, 'small': 224, 'base': 224},
    'mixmim': {'tiny': 64, 'base': 224, 'large': 224, 'huge': 224},
    'videomae': {'tiny': 64, 'small': 224, 'base': 224, 'large': 224, 'huge': 224},
    'm3ae': {'tiny': 64, 'small': 256, 'base': 256, 'large': 256, 'huge': 256},
    'milan': {'tiny': 64, 'base': 224, 'large': 224},
    'maskfeat': {'tiny': 64, 'base': 224, 'large': 224},
    'ijepa': {'tiny': 48, 'base': 224, 'large': 224, 'huge': 224, 'huge448': 448, 'giant': 224},
}
METHODS = [m for m in SIZES if (REPO / f'{m}.py').exists()]


class Started(Exception):
    pass


def resolved(mod, argv, monkeypatch):
    def setup_run(args):
        raise Started(args)
    monkeypatch.setattr(mod, 'setup_run', setup_run)
    with pytest.raises(Started) as e:
        mod.main(common.parse_args(mod.Args, [str(a) for a in argv]))
    return e.value.args[0]


@pytest.mark.parametrize('method', METHODS)
def test_a_presets_own_input_size_applies_when_not_given(method, monkeypatch, tmp_path):
    mod = importlib.import_module(method)
    assert set(SIZES[method]) == set(mod.MODELS) and mod.Args().input_size is None
    extra = []
    if method == 'beit':
        torch.save(mod.Encoder(8, 1, 32).state_dict(), tmp_path / 'tok.pth')
        extra = ['--tokenizer', tmp_path / 'tok.pth', '--num_mask_patches', 24, '--min_mask_patches_per_block', 4]
    for model, px in SIZES[method].items():
        args = resolved(mod, ['--data', 'synthetic:8', '--model', model, '--output_dir', tmp_path, *extra], monkeypatch)
        assert args.input_size == (px,), model
    given = resolved(mod, ['--data', 'synthetic:8', '--model', 'tiny' if 'tiny' in SIZES[method] else 'micro',
                           '--input_size', 128, '--output_dir', tmp_path, *extra], monkeypatch)
    assert given.input_size == (128,)
