"""Train the small GPT (torch_impl.gpt) tensor-parallel on torch_xla SPMD, plain SGD on a toy task.

    python examples/gpt_block/train_torch.py [--tp 4] [--mode plain|ring] [--steps 20]
           [--init init.npz] [--save out.npz] [--hlo]
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import torch  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import gpt  # noqa: E402
from torch_impl import mesh as tm  # noqa: E402
from torch_impl.configs import ParallelConfig  # noqa: E402


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    tm.enable_spmd()
    xr.global_runtime_device_count()  # start the runtime before the first backward pass
    mesh = tm.create_mesh(ParallelConfig(model_axis_size=args.tp))
    model = gpt.GPT(gpt.GPTConfig(**_common.config_kwargs(args)), mesh=mesh, seed=0)
    gpt.load_params(model, _common.load_or_write_init(args.init, lambda: gpt.flat_params(model)))
    losses = []
    for i in range(args.steps):
        tokens, targets = _common.batch(i)
        out = gpt.loss_and_grads(model, tokens, targets, hlo=args.hlo and i == 0)
        if len(out) == 4:
            print("collectives of one step:", dict(hlo.signature(out[3])))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(args.lr * p.grad)
        tm.sync()
        losses.append(float(out[0].detach().cpu()))
        print(f"step {i:3d}  loss {losses[-1]:.6f}", flush=True)
    _common.save(args.save, losses, gpt.flat_params(model))


if __name__ == "__main__":
    main()
