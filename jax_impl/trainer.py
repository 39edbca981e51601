"""One training step of the 4-D-mesh GPT with AdamW on JAX (twin: :mod:`torch_impl.trainer`).

:class:`Trainer` holds the model of :mod:`jax_impl.model`, its sharded parameters and the optax
state of :mod:`jax_impl.optim` (AdamW, global-norm clip, warmup + cosine: ``ringpar.optim``).
Parameters enter and leave in the mesh-independent reference layout of
:mod:`ringpar.gpt_model_config`, so a run can continue on the other backend or another mesh.

Example::

    from ringpar.configs import ParallelConfig
    from ringpar.gpt_model_config import gpt_model_config, init_reference
    from ringpar.optim import OptimizerConfig
    from jax_impl.trainer import Trainer

    cfg = gpt_model_config(ParallelConfig(model_axis_size=8), vocab_size=256, hidden_size=64,
                           num_heads=8, num_layers=2)
    trainer = Trainer(cfg, OptimizerConfig(total_steps=100),
                      init_reference(cfg.model_config, seed=0))
    loss, grad_norm = trainer.step(tokens, targets)   # int [B, S] arrays
    params, opt_state = trainer.export()              # reference layout, numpy
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ringpar import checkpoint as ckpt
from ringpar.configs import ModelConfig
from ringpar.gpt_model_config import from_layout, to_layout
from ringpar.optim import OptimizerConfig

from . import optim
from .model import build_gpt

__all__ = ["Trainer"]


# Deliberate twin of torch_impl.trainer.Trainer, kept line-for-line parallel on purpose: same
# steps, attributes and method order.
class Trainer:
    """The model, its sharded parameters and the optax state on a JAX mesh.

    Args:
        model: The GPT's ``ModelConfig`` (``ringpar.gpt_model_config.gpt_model_config``).
        optimizer: AdamW / clip / schedule hyperparameters.
        params: Reference-layout parameters (``init_reference`` or a checkpoint's).
        opt_state: Reference-layout moments and step count (a checkpoint's), or ``None`` for a
            fresh optimizer.
        mesh: The device mesh (default: ``create_mesh`` over every device).
    """

    def __init__(self, model: ModelConfig, optimizer: OptimizerConfig,
                 params: Mapping[str, np.ndarray], opt_state: Mapping | None = None, mesh=None):
        self.config = model
        self.model = build_gpt(model, mesh)
        self.params = self.model.from_reference(params)
        self.tx = optim.make_optimizer(optimizer)
        state = (self.tx.init(self.params) if opt_state is None else optim.import_state(
            self.tx, self.params, ckpt.map_moments(opt_state, self._to_layout)))
        # Pin every sharding (moments like their parameter, counts replicated) so the update's
        # outputs are the next step's inputs as they are: one compile of each program.
        param_sh = {k: v.sharding for k, v in self.params.items()}
        replicated = NamedSharding(self.model.mesh, PartitionSpec())
        state_sh = optax.tree_utils.tree_set(jax.tree.map(lambda _: replicated, state),
                                             mu=param_sh, nu=param_sh)
        self.state = jax.device_put(state, state_sh)
        # No buffer donation: donating the parameters crashed (segfault) when torch_xla shares
        # the process (tests/parity/test_train_script.py); the model is small.
        self._update = jax.jit(lambda p, g, s: optim.apply_step(self.tx, p, g, s),
                               out_shardings=(param_sh, state_sh, replicated))

    def _to_layout(self, ref):
        return to_layout(ref, self.config, self.model.sizes)

    def step(self, tokens, targets) -> tuple[float, float]:
        """One AdamW step on the batch: (loss before the update, global gradient norm)."""
        loss, grads = self.model.loss_and_grads(self.params, tokens, targets)
        self.params, self.state, norm = self._update(self.params, grads, self.state)
        return float(loss), float(norm)

    def compiled_text(self, tokens, targets) -> str:
        """HLO text of the compiled loss + gradient program (for collective signatures)."""
        return self.model.compiled_text(self.params, tokens, targets)

    def export(self) -> tuple[dict, dict]:
        """(parameters, optimizer state), both in the reference layout as numpy."""
        ref = self.model.to_reference(self.params)
        state = optim.export_state(self.state, self.params)
        to_ref = lambda m: from_layout(m, self.config, self.model.sizes)  # noqa: E731
        return ref, ckpt.map_moments(state, to_ref)
