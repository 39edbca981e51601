"""Train the small GPT (jax_impl.gpt) tensor-parallel with JAX, plain SGD on a toy task.

    python examples/gpt_block/train_jax.py [--tp 4] [--mode plain|ring] [--steps 20]
           [--init init.npz] [--save out.npz] [--hlo]
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_impl import gpt  # noqa: E402
from jax_impl.configs import ParallelConfig  # noqa: E402
from jax_impl.mesh import create_mesh  # noqa: E402
from parity import hlo  # noqa: E402


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    mesh = create_mesh(ParallelConfig(model_axis_size=args.tp))
    model = gpt.GPT(gpt.GPTConfig(**_common.config_kwargs(args)), mesh=mesh, rngs=nnx.Rngs(0))
    gpt.load_params(model, _common.load_or_write_init(args.init, lambda: gpt.flat_params(model)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(p, tokens, targets):
        return nnx.merge(graphdef, p, rest).loss(tokens, targets)

    @jax.jit
    def step(p, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, targets)
        return jax.tree.map(lambda w, g: w - args.lr * g, p, grads), loss

    losses = []
    for i in range(args.steps):
        tokens, targets = (jnp.asarray(a, jnp.int32) for a in _common.batch(i))
        if args.hlo and i == 0:
            text = step.lower(params, tokens, targets).compile().as_text()
            print("collectives of one step:", dict(hlo.signature(text)))
        params, loss = step(params, tokens, targets)
        losses.append(float(loss))
        print(f"step {i:3d}  loss {losses[-1]:.6f}", flush=True)
    nnx.update(model, params)
    _common.save(args.save, losses, gpt.flat_params(model))


if __name__ == "__main__":
    main()
