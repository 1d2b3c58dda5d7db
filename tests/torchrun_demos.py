"""Started by test_demo_torchrun.py under `torchrun --nproc_per_node=2`: runs each given method file's --demo, as its
`__main__` does (main(parse_args(Args, argv, demo=DEMO))), one after another in the same two processes, so torch is
imported once. They share one process group: a default group re-made in the same job would meet the keys the last
one left in torchrun's store."""
import importlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

init, destroy = dist.init_process_group, dist.destroy_process_group
dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else init(*a, **k)
dist.destroy_process_group = lambda *a, **k: None
for method, argv in json.loads(sys.argv[1]):
    mod = importlib.import_module(method)
    mod.main(common.parse_args(mod.Args, argv, demo=mod.DEMO))
    dist.barrier()
    if dist.get_rank() == 0:
        print(f'done {method}', flush=True)
destroy()
