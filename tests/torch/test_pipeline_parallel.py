"""torch_impl.pipeline_parallel on 8 CPU devices (torch_xla SPMD): GPipe equals sequential
stages; the compiled program (one ring permute per direction inside a while loop); errors.

Meshes are (dp, fsdp, pp, tp) = (8/p, 1, p, 1): the batch is sharded over dp, the stages over pp.
Measured (fp32, this machine): outputs and gradients match the sequential stages to <= 6.0e-7
relative (max abs difference / max abs value); the tests allow 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import hlo
from torch_impl.mesh import compiled_hlo, mark_sharding
from torch_impl.pipeline_parallel import PipelineModule, execute_pipeline, execute_pipeline_step
from torch_impl.tensor_parallel import ModelParallelismWrapper

F = 4
B_LOCAL = 2
RTOL = 1e-5
CASES = sorted({(p, m) for p in (1, 2, 4, 8) for m in (1, p, 2 * p + 1)})
BATCH = ("dp", "fsdp")
PREFIX = "ModelParallelismWrapper_0.sharded.Dense_0."


class Dense(torch.nn.Module):
    """Twin of flax ``nn.Dense``: ``kernel`` [in, out], ``bias`` [out]."""

    def __init__(self, fin=F, fout=F):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(fin, fout) / fin ** 0.5)
        self.bias = torch.nn.Parameter(torch.randn(fout) * 0.5)

    def forward(self, x):
        return x @ self.kernel + self.bias


class Stage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0 = Dense()

    def forward(self, x, scale=None, *, shift=None):
        h = torch.tanh(self.Dense_0(x))
        if scale is not None:
            h = h * scale
        if shift is not None:
            h = h + shift
        return h


class WideStage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0 = Dense(F, F + 1)

    def forward(self, x):
        return self.Dense_0(x)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _setup(make_torch_mesh, xla_device, p, m, stage=Stage, seed=0):
    mesh = make_torch_mesh(pipeline_axis_size=p)
    torch.manual_seed(seed)
    model = PipelineModule("pp", m, stage, mesh=mesh)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.stage.shard_()
    x = torch.randn(8 // p * m * B_LOCAL, F)
    xx = mark_sharding(x.to(xla_device), mesh, (BATCH, None)).requires_grad_()
    return mesh, model, weights, x, xx


def _sequential(weights, x, scale=None, shift=None):
    h = x
    kernel, bias = weights[PREFIX + "kernel"], weights[PREFIX + "bias"]
    for s in range(kernel.shape[0]):
        h = torch.tanh(h @ kernel[s] + bias[s])
        if scale is not None:
            h = h * scale + shift
    return h


@pytest.mark.parametrize("p,m", CASES, ids=[f"p{p}-m{m}" for p, m in CASES])
def test_pipeline_equals_sequential_stages(make_torch_mesh, xla_device, p, m):
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        PREFIX + "kernel": (p, F, F), PREFIX + "bias": (p, F)}
    w_out = torch.randn(x.shape)
    y = model(xx)
    (y * w_out.to(xla_device)).sum().backward()

    ref = {k: v.clone().requires_grad_() for k, v in weights.items()}
    rx = x.clone().requires_grad_()
    ry = _sequential(ref, rx)
    (ry * w_out).sum().backward()

    assert tuple(y.shape) == tuple(x.shape)
    assert _rel(y.detach().cpu(), ry.detach()) < RTOL
    assert _rel(xx.grad.cpu(), rx.grad) < RTOL
    for name, prm in model.named_parameters():
        assert _rel(prm.grad.cpu(), ref[name].grad) < RTOL, name


def test_extra_args_and_kwargs_reach_every_stage(make_torch_mesh, xla_device):
    p, m = 4, 3
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m)
    scale, shift = 0.5, torch.arange(F, dtype=torch.float32) / 10
    y = model(xx, scale, shift=shift.to(xla_device))
    assert _rel(y.detach().cpu(), _sequential(weights, x, scale, shift)) < RTOL


def test_batch_axes_come_from_parallel_config(make_torch_mesh, xla_device):
    """Default batch axes are ParallelConfig's data/FSDP names; a config names renamed ones."""
    from torch_impl.configs import ParallelConfig
    from torch_impl.pipeline_loop import batch_axes

    assert batch_axes(make_torch_mesh(pipeline_axis_size=2), "pp", None) == (BATCH, 4)
    cfg = ParallelConfig(pipeline_axis_size=2, data_axis_name="rows", fsdp_axis_name="shards")
    mesh = make_torch_mesh(pipeline_axis_size=2, data_axis_name="rows", fsdp_axis_name="shards")
    assert batch_axes(mesh, "pp", None) == ((), 1)  # no 'dp' / 'fsdp' in this mesh
    assert batch_axes(mesh, "pp", cfg) == (("rows", "shards"), 4)
    torch.manual_seed(0)
    model = PipelineModule("pp", 3, Stage, mesh=mesh, batch_axis_names=cfg)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.stage.shard_()
    with pytest.raises(ValueError, match=r"x.shape\[0\]=6: .* times the size 4 of the data axes "
                                         r"\('rows', 'shards'\)"):
        model(torch.zeros(6, F, device=xla_device))
    x = torch.randn(4 * 3 * B_LOCAL, F)
    y = model(mark_sharding(x.to(xla_device), mesh, (("rows", "shards"), None)))
    assert _rel(y.detach().cpu(), _sequential(weights, x)) < RTOL


class BufferedStage(Stage):
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.randn(F))

    def forward(self, x):
        return super().forward(x) + self.offset


def test_stage_wrapper_stacks_parameters_and_buffers(make_torch_mesh, xla_device):
    """from_modules: [p, ...] parameters AND buffers, on the CPU until shard_ (loading a
    state_dict there leaves them alone), specs over the pipeline axis, row s = stage s."""
    p = 2
    mesh = make_torch_mesh(pipeline_axis_size=p)
    stages = [BufferedStage() for _ in range(p)]
    h = torch.randn(p, 3, F)
    want = torch.stack([stages[s](h[s]) for s in range(p)]).detach()
    with pytest.raises(ValueError, match=r"modules has 3 modules: expected n=2"):
        ModelParallelismWrapper.from_modules(stages + stages[:1], "pp", mesh=mesh)
    stage = ModelParallelismWrapper.from_modules(stages, "pp", mesh=mesh)  # stages[0]: template
    shapes = {k: tuple(v.shape) for k, v in stage.state_dict().items()}
    assert shapes == {"sharded.Dense_0.kernel": (p, F, F), "sharded.Dense_0.bias": (p, F),
                      "sharded.offset": (p, F)}
    assert stage.partition_specs() == {"sharded.Dense_0.kernel": ("pp", None, None),
                                       "sharded.Dense_0.bias": ("pp", None),
                                       "sharded.offset": ("pp", None)}
    stage.load_state_dict(stage.state_dict())
    assert {t.device.type for t in stage.state_dict().values()} == {"cpu"}
    assert _rel(stage.shard_()(h.to(xla_device)).detach().cpu(), want) < RTOL


def _dropout_microbatches(make_torch_mesh, xla_device, loop):
    p, m = 2, 4
    mesh = make_torch_mesh(pipeline_axis_size=p)
    model = PipelineModule("pp", m, lambda: torch.nn.Dropout(0.5), mesh=mesh, loop=loop).train()
    x = mark_sharding(torch.ones(8 // p * m * 8, F, device=xla_device), mesh, (BATCH, None))
    y = model(x).cpu().numpy().reshape(8 // p, m, 8, F)[0]  # first data shard: m micro-batches
    assert set(np.unique(y)) <= {0.0, 4.0}  # two stages of p=0.5 dropout: 0 or 1/(0.5*0.5)
    return y


def test_dropout_differs_per_step_unrolled(make_torch_mesh, xla_device):
    """loop='unrolled': identical micro-batches through dropout get different masks (as JAX)."""
    y = _dropout_microbatches(make_torch_mesh, xla_device, "unrolled")
    assert not np.array_equal(y[0], y[1])


def test_dropout_differs_per_step_in_scan(make_torch_mesh, xla_device):
    """loop='scan': identical micro-batches through dropout get distinct masks on every step
    (each step has its own seed; torch_xla's scan alone repeated the mask)."""
    y = _dropout_microbatches(make_torch_mesh, xla_device, "scan")
    masks = {(y[i] > 0).tobytes() for i in range(len(y))}
    assert len(masks) == len(y)  # m = 4 micro-batches, 4 distinct masks of 32 elements


def test_unrolled_equals_scan(make_torch_mesh, xla_device):
    p, m = 4, 5
    outs = []
    for loop in ("scan", "unrolled"):
        mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m)
        model.loop = loop
        y = model(xx)
        (y * y).sum().backward()
        outs.append([y.detach().cpu(), xx.grad.cpu()] + [q.grad.cpu() for q in model.parameters()])
    for a, b in zip(*outs):
        assert _rel(a, b) < RTOL


def test_execute_pipeline_step_moves_state_one_stage_up(make_torch_mesh, xla_device):
    p = 4
    mesh = make_torch_mesh(pipeline_axis_size=p)
    add = (10.0 ** torch.arange(p, dtype=torch.float32)).view(p, 1, 1).to(xla_device)
    state = (torch.arange(p, dtype=torch.float32).view(p, 1, 1) * torch.ones(p, 2, 1))
    state = mark_sharding(state.to(xla_device), mesh, ("pp", None, None))
    inp = torch.full((2, 1), 100.0, device=xla_device)
    new_state, out = execute_pipeline_step(lambda h: h + add, state, inp, model_axis_name="pp",
                                           mesh=mesh)
    h = np.array([100.0 + 1, 1 + 10, 2 + 100, 3 + 1000])  # stage 0 reads the input
    np.testing.assert_allclose(new_state.cpu().numpy()[:, 0, 0], np.roll(h, 1))
    np.testing.assert_allclose(out.cpu().numpy()[:, 0, 0], [0, 0, 0, h[-1]])


def test_stage_wrapper_applies_stage_s_to_row_s(make_torch_mesh, xla_device):
    p = 4
    mesh = make_torch_mesh(pipeline_axis_size=p)
    torch.manual_seed(1)
    stages = [Stage() for _ in range(p)]
    h = torch.randn(p, 3, F)
    want = torch.stack([stages[s](h[s]) for s in range(p)]).detach()
    stacked = ModelParallelismWrapper.from_modules(stages, "pp", mesh=mesh).shard_()
    assert _rel(stacked(h.to(xla_device)).detach().cpu(), want) < RTOL


# ------------------------------------------------------------------------------------------ HLO
def _grad_program(model, xx) -> str:
    y = model(xx)
    (y * y).sum().backward()
    return compiled_hlo([y, xx.grad] + [prm.grad for prm in model.parameters()])


def _ring_groups(p):
    return np.arange(8).reshape(8 // p, p).tolist()


@pytest.mark.parametrize("p", [2, 4, 8])
def test_hlo_one_ring_permute_per_direction_and_no_gather(make_torch_mesh, xla_device, p):
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, 2 * p + 1)
    up, down = hlo.ring_pairs(_ring_groups(p), True), hlo.ring_pairs(_ring_groups(p), False)
    fwd = hlo.collectives(compiled_hlo([model(xx)]))
    assert [op.kind for op in fwd if op.kind != "all-reduce"] == ["collective-permute"]
    assert [op.pairs for op in fwd if op.kind == "collective-permute"] == [up]
    ops = hlo.collectives(_grad_program(model, xx))
    permutes = sorted(op.pairs for op in ops if op.kind == "collective-permute")
    assert permutes == sorted([up, down])
    assert not [op for op in ops if op.kind in ("all-gather", "all-to-all", "reduce-scatter")]
    # All-reduces only over the pipeline rings (output selection, input gradient) or the data
    # rows (parameter gradients), outside the loops.
    pp_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in _ring_groups(p)) + "}"
    dp_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}"
                               for g in np.asarray(_ring_groups(p)).T.tolist()) + "}"
    assert {op.replica_groups for op in ops if op.kind == "all-reduce"} <= {pp_groups, dp_groups}


def test_hlo_no_permute_with_one_stage(make_torch_mesh, xla_device):
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, 1, 3)
    assert hlo.count(_grad_program(model, xx), "collective-permute") == 0


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_hlo_size_does_not_grow_with_microbatches(make_torch_mesh, xla_device, p):
    """The loop is a torch_xla scan (an XLA while loop), not unrolled."""
    counts = {}
    for m in (2 * p + 1, 4 * p + 3):
        mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m)
        counts[m] = hlo.instruction_count(_grad_program(model, xx))
    assert len(set(counts.values())) == 1, counts


def test_hlo_unrolled_grows_with_microbatches(make_torch_mesh, xla_device):
    """loop='unrolled' puts every step in the graph (measured forward + backward at p=4: 880
    instructions at m=2, 1598 at m=6, ~180 per extra micro-batch; the scan program has ~400 for
    any m). Pinned, which also shows that the instruction count can detect an unrolled loop."""
    p, counts = 4, {}
    for m in (2, 6):
        mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m)
        model.loop = "unrolled"
        counts[m] = hlo.instruction_count(_grad_program(model, xx))
    assert counts[6] > counts[2] + 4 * 100, counts


# --------------------------------------------------------------------------------------- errors
def test_error_batch_not_divisible(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    model = PipelineModule("pp", 3, Stage, mesh=mesh)
    with pytest.raises(ValueError, match=r"x.shape\[0\]=16: expected .* divisible by "
                                         r"num_microbatches=3$"):
        model(torch.zeros(16, F, device=xla_device))
    # divisible by m, but not by m times the 4 data shards the rows are split over
    with pytest.raises(ValueError, match=r"x.shape\[0\]=6: .* num_microbatches=3 times the size 4"):
        model(torch.zeros(6, F, device=xla_device))


@pytest.mark.parametrize("m", [0, -2, 1.5])
def test_error_num_microbatches(make_torch_mesh, xla_device, m):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    with pytest.raises(ValueError, match=rf"num_microbatches={m!r}: expected an int >= 1"):
        PipelineModule("pp", m, Stage, mesh=mesh)
    stage = PipelineModule("pp", 1, Stage, mesh=mesh).stage
    with pytest.raises(ValueError, match="num_microbatches"):
        execute_pipeline(stage, torch.zeros(8, F, device=xla_device), num_microbatches=m,
                         model_axis_name="pp", mesh=mesh)


def test_error_stage_changes_shape(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    model = PipelineModule("pp", 2, WideStage, mesh=mesh)
    model.stage.shard_()
    with pytest.raises(ValueError, match=r"module output has shape \(2, 4, 1, 5\).*expected the "
                                         r"shape \(2, 4, 1, 4\)"):
        model(torch.zeros(8, F, device=xla_device))


def test_error_mesh_without_axis(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    with pytest.raises(ValueError, match="model_axis_name='stages' is not an axis of the mesh"):
        PipelineModule("stages", 2, Stage, mesh=mesh)
    stage = PipelineModule("pp", 1, Stage, mesh=mesh).stage
    with pytest.raises(ValueError, match="model_axis_name='stages' is not an axis of the mesh"):
        execute_pipeline(stage, torch.zeros(8, F, device=xla_device), num_microbatches=2,
                         model_axis_name="stages", mesh=mesh)


def test_error_unknown_loop(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    with pytest.raises(ValueError, match=r"loop='while': expected one of \('scan', 'unrolled'\)"):
        PipelineModule("pp", 2, Stage, mesh=mesh, loop="while")


def test_error_input_not_on_xla_device(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2)
    with pytest.raises(ValueError, match="x is on device cpu"):
        PipelineModule("pp", 2, Stage, mesh=mesh)(torch.zeros(8, F))
