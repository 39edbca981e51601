"""Train a 4-stage MLP pipeline (GPipe) with JAX + optax and with torch_xla + torch.optim.

Both sides start from the same weights (the JAX initialization, copied into the torch module by
parameter path: the torch ``state_dict`` keys are the JAX paths joined by '.'), see the same data
on the same (dp, fsdp, pp, tp) = (2, 1, 4, 1) mesh of 8 CPU devices, and take the same optimizer
steps. The script prints both loss curves and exits with status 1 if they differ by more than
``--rtol`` (relative, per step) or the loss does not decrease.

Measured on this machine over 20 steps (4 micro-batches): SGD with momentum (default) <= 1.3e-7;
Adam <= 7.3e-6 (Adam's first update is lr * sign(g) per entry, so gradient entries near zero turn
~1e-7 gradient differences into lr-sized weight differences; the curves then stay that close).

    python examples/pipeline_mlp.py [--steps 20] [--microbatches 4] [--optimizer sgd|adam]"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ringpar.devices import set_cpu_devices  # noqa: E402

# 8 CPU devices for both runtimes; must be set before jax / torch_xla start.
set_cpu_devices(8)

import functools  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402  (imported before torch_xla, see docs/design.md)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

FEATURES, HIDDEN, STAGES, BATCH = 8, 16, 4, 32
DATA_AXES = ("dp", "fsdp")


# ------------------------------------------------------------------------------------------ JAX
class JaxStage(nn.Module):
    """Residual MLP block: h + Dense_1(tanh(Dense_0(h)))."""

    @nn.compact
    def __call__(self, h):
        hidden = nn.Dense(HIDDEN)(h)  # Dense_0 (flax numbers submodules in creation order)
        return h + nn.Dense(FEATURES)(jnp.tanh(hidden))  # Dense_1


def jax_train(x, y, steps, microbatches, lr, opt):
    from jax_impl.configs import ParallelConfig
    from jax_impl.mesh import create_mesh
    from jax_impl.pipeline_parallel import PipelineModule
    from jax_impl.tensor_parallel import ModelParallelismWrapper

    mesh = create_mesh(ParallelConfig(data_axis_size=2, pipeline_axis_size=STAGES))
    model = PipelineModule(
        model_axis_name="pp", num_microbatches=microbatches,
        module_fn=functools.partial(ModelParallelismWrapper, model_axis_name="pp",
                                    module_fn=JaxStage))
    init = jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(DATA_AXES)), out_specs=P(),
                         check_vma=False)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0), x))
    params = jax.jit(jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(DATA_AXES)),
                                   out_specs=specs, check_vma=False))(jax.random.key(0), x)

    def predict(v, x):  # the last stage's output, summed over the stages (zeros elsewhere)
        return jax.lax.psum(model.apply(v, x), "pp")

    predict = jax.shard_map(predict, mesh=mesh, in_specs=(specs, P(DATA_AXES)),
                            out_specs=P(DATA_AXES))
    optimizer = optax.adam(lr) if opt == "adam" else optax.sgd(lr, momentum=0.9)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda v: jnp.mean((predict(v, x) - y) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    initial = jax.tree.map(np.asarray, nn.unbox(params))
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
    return initial, losses


# ---------------------------------------------------------------------------------------- torch
def torch_train(initial, x, y, steps, microbatches, lr, opt):
    import torch
    import torch_xla
    import torch_xla.runtime as xr

    from torch_impl.configs import ParallelConfig
    from torch_impl.mesh import create_mesh, mark_sharding, xla_device
    from torch_impl.pipeline_parallel import PipelineModule

    class Dense(torch.nn.Module):  # twin of flax nn.Dense: kernel [in, out], bias [out]
        def __init__(self, fin, fout):
            super().__init__()
            self.kernel = torch.nn.Parameter(torch.zeros(fin, fout))
            self.bias = torch.nn.Parameter(torch.zeros(fout))

        def forward(self, h):
            return h @ self.kernel + self.bias

    class TorchStage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.Dense_0 = Dense(FEATURES, HIDDEN)
            self.Dense_1 = Dense(HIDDEN, FEATURES)

        def forward(self, h):
            return h + self.Dense_1(torch.tanh(self.Dense_0(h)))

    if not xr.is_spmd():
        xr.use_spmd()
    mesh = create_mesh(ParallelConfig(data_axis_size=2, pipeline_axis_size=STAGES))
    model = PipelineModule("pp", microbatches, TorchStage, mesh=mesh)
    flat = {".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(initial["params"])}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in flat.items()})
    model.stage.shard_()
    optimizer = (torch.optim.Adam(model.parameters(), lr=lr) if opt == "adam" else
                 torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    dev = xla_device()
    xt = mark_sharding(torch.from_numpy(np.array(x)).to(dev), mesh, (DATA_AXES, None))
    yt = mark_sharding(torch.from_numpy(np.array(y)).to(dev), mesh, (DATA_AXES, None))
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.mean((model(xt) - yt) ** 2)
        loss.backward()
        optimizer.step()
        torch_xla.sync()
        losses.append(float(loss.item()))
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="sgd: SGD with momentum 0.9 (optax.sgd / torch.optim.SGD); adam: "
                             "optax.adam / torch.optim.Adam with their (equal) defaults")
    parser.add_argument("--rtol", type=float, default=None,
                        help="per-step relative tolerance (default 1e-6 for sgd, 2e-5 for adam)")
    args = parser.parse_args(argv)
    rtol = args.rtol if args.rtol is not None else (1e-6 if args.optimizer == "sgd" else 2e-5)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal((FEATURES, FEATURES)).astype(np.float32)).astype(np.float32)

    initial, jax_losses = jax_train(jnp.asarray(x), jnp.asarray(y), args.steps, args.microbatches,
                                    args.lr, args.optimizer)
    torch_losses = torch_train(initial, x, y, args.steps, args.microbatches, args.lr,
                               args.optimizer)

    print(f"{'step':>4} {'jax loss':>14} {'torch loss':>14} {'rel diff':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(jax_losses, torch_losses)):
        rel = abs(a - b) / max(abs(a), 1e-30)
        worst = max(worst, rel)
        print(f"{i:>4} {a:>14.8f} {b:>14.8f} {rel:>10.2e}")
    ok = worst <= rtol and jax_losses[-1] < jax_losses[0]
    print(f"max relative difference {worst:.2e} (rtol {rtol:.0e}); loss "
          f"{jax_losses[0]:.4f} -> {jax_losses[-1]:.4f}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
