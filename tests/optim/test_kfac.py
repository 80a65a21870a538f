"""EA-KFAC: dense formula, refresh schedule, round trip, faults, bad input, real data."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm import KFAC, QKLDWRM, SOKLDWRM, NonFiniteGradientWarning
from kldwrm.experiments.data.models import paper_cnn

from ..conftest import train_epoch


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).to(dtype)


def _batches(n, seed=0, dtype=torch.float64, size=12):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 5, generator=g, dtype=dtype), torch.randint(0, 3, (size,),
             generator=g)) for _ in range(n)]


def _ordinary_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("update_freq", [1, 3])
def test_step_equals_dense_damped_kronecker_solve(update_freq):
    model = _mlp()
    lin = [model[0], model[2]]
    lr0, rho, damping, wd = 0.05, 0.7, 1e-2, 1e-3
    opt = KFAC(model, lr=lr0, rho=rho, damping=damping, weight_decay=wd, kl_clip=None,
               update_freq=update_freq, fisher="empirical")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if k < 5 else 0.3)
    A_bar, G_bar = {}, {}
    for k, (x, y) in enumerate(_batches(11)):
        # independent factors: our own hooks and per-example gradients of the summed loss
        # (on a copy, so that the optimizer's hooks see only the ordinary loop)
        twin = copy.deepcopy(model)
        ins, outs = {}, {}

        def hook(m, i, o, ins=ins, outs=outs):
            ins[m], outs[m] = i[0].detach(), o

        for m in twin:
            m.register_forward_hook(hook)
        out = twin(x)
        deltas = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"),
                                     [outs[twin[0]], outs[twin[2]]])
        ins = {lin[0]: ins[twin[0]], lin[1]: ins[twin[2]]}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        factors_before = [(b.A_bar, b.G_bar) for b in opt.engine.blocks] if k else None
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        refresh = k % update_freq == 0
        for m, d in zip(lin, deltas, strict=True):
            a = ins[m]
            if m.bias is not None:
                a = torch.cat([a, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            A, G = a.T @ a / len(x), d.T @ d / len(x)
            if refresh:
                A_bar[m] = A if m not in A_bar else rho * A_bar[m] + (1 - rho) * A
                G_bar[m] = G if m not in G_bar else rho * G_bar[m] + (1 - rho) * G
        if factors_before is not None and not refresh:  # factors change only on refresh
            for b, (A_old, G_old) in zip(opt.engine.blocks, factors_before, strict=True):
                assert torch.equal(b.A_bar, A_old) and torch.equal(b.G_bar, G_old)
        # dense expected step for each layer
        params = list(model.parameters())
        w0, b0, w2 = before
        g0 = torch.cat([grads[0] + wd * w0, (grads[1] + wd * b0)[:, None]], 1)
        g2 = grads[2] + wd * w2
        for m, gm, (idx, has_b) in ((lin[0], g0, (0, True)), (lin[1], g2, (2, False))):
            M = torch.kron(A_bar[m], G_bar[m]) + damping * torch.eye(gm.numel(), dtype=gm.dtype)
            s = -lr * torch.linalg.solve(M, gm.T.reshape(-1)).reshape(gm.shape[1], -1).T
            got = params[idx] - before[idx]
            if has_b:
                got = torch.cat([got, (params[idx + 1] - before[idx + 1])[:, None]], 1)
            torch.testing.assert_close(got, s, rtol=1e-9, atol=1e-13)


def _interrupted_and_uninterrupted(cls, dtype, n_steps, edit_checkpoint=None):
    """Train ``n_steps`` straight through, and again with a ``torch.save``/``torch.load``
    (``weights_only``) of model and optimizer halfway into a new model and optimizer built
    with another seed; ``edit_checkpoint`` may rewrite the checkpoint in between. Returns
    the two final models."""
    kw = dict(update_freq=3, fisher="mc", lr=0.05)
    data = _batches(n_steps, dtype=dtype)
    model = _mlp(dtype=dtype)
    ref_model = copy.deepcopy(model)
    opt = cls(ref_model, **kw)
    for x, y in data:
        _ordinary_step(ref_model, opt, x, y)
    opt = cls(model, **kw)
    half = n_steps // 2
    for x, y in data[:half]:
        _ordinary_step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # a checkpoint must not be able to run code
    if edit_checkpoint is not None:
        edit_checkpoint(model, opt, ckpt["opt"])
    fresh = _mlp(seed=123, dtype=dtype)
    fresh.load_state_dict(ckpt["model"])
    opt2 = cls(fresh, **{**kw, "seed": 999})
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[half:]:
        _ordinary_step(fresh, opt2, x, y)
    return fresh, ref_model


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_state_dict_round_trip_is_bit_exact(cls):
    resumed, ref = _interrupted_and_uninterrupted(cls, torch.float32, 20)
    for p, q in zip(resumed.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)


def test_q_loads_a_version_1_checkpoint_with_the_wake_in_parameter_coordinates():
    """kldwrm 0.1 saved Q's wake in parameter coordinates; loading rotates it."""
    def as_version_1(model, opt, ckpt):
        params = list(model.parameters())
        wake = opt.engine.from_eigenbasis([opt.state[p]["wake"] for p in params])
        for i, w in enumerate(wake):  # what 0.1 stored
            ckpt["state"][i]["wake"] = w.clone()
        ckpt["kldwrm"]["version"] = 1

    resumed, ref = _interrupted_and_uninterrupted(QKLDWRM, torch.float64, 14, as_version_1)
    for p, q in zip(resumed.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def _as_saved_on_cuda(model, opt, ckpt):
    """A CUDA generator's state (Philox: seed and offset, 16 bytes) in place of the CPU's."""
    ckpt["kldwrm"]["generator"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0],
                                               dtype=torch.uint8)


def test_a_state_saved_on_another_device_type_resumes_with_a_derived_label_seed():
    with pytest.warns(UserWarning, match="saved on another device type"):
        first, ref = _interrupted_and_uninterrupted(KFAC, torch.float64, 10, _as_saved_on_cuda)
    with pytest.warns(UserWarning, match="saved on another device type"):
        again, _ = _interrupted_and_uninterrupted(KFAC, torch.float64, 10, _as_saved_on_cuda)
    for p, q in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)  # the seed comes from the saved state, not the new optimizer's
    model = _mlp()
    opt = KFAC(model, update_freq=3, fisher="empirical")
    state = opt.state_dict()
    _as_saved_on_cuda(model, opt, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no labels are drawn: nothing to warn about
        KFAC(_mlp(), update_freq=3, fisher="empirical").load_state_dict(state)


def _snapshot(model, opt):
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_skip_the_step_and_change_nothing(cls, bad):
    data = _batches(7, dtype=torch.float32)
    kw = dict(update_freq=2, fisher="mc")
    clean_model = _mlp(dtype=torch.float32)
    model = copy.deepcopy(clean_model)
    clean = cls(clean_model, **kw)
    opt = cls(model, **kw)
    for x, y in data:
        _ordinary_step(clean_model, clean, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(data):
            if i in (2, 5):  # 2 is a refresh step (labels were sampled), 5 is not
                for _ in range(2):
                    snap = _snapshot(model, opt)
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    model[0].weight.grad[0, 0] = bad
                    opt.step()
                    extra = opt.state_dict()["kldwrm"]
                    assert extra["skipped_steps"] >= 1
                    opt.skipped_steps -= 1  # compare everything else bit for bit
                    assert _snapshot(model, opt) == snap
                    opt.skipped_steps += 1
            _ordinary_step(model, opt, x, y)
    assert opt.skipped_steps == 4
    assert sum(issubclass(w.category, NonFiniteGradientWarning) for w in caught) == 1
    for p, q in zip(model.parameters(), clean_model.parameters(), strict=True):
        assert torch.equal(p, q)  # skipped steps left no trace on the trajectory


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
        (dict(rho=1.0), "rho"), (dict(rho=-0.1), "rho"),
        (dict(damping=-1e-3), "damping"), (dict(weight_decay=-1.0), "weight_decay"),
        (dict(kl_clip=0.0), "kl_clip"), (dict(update_freq=0), "update_freq"),
        (dict(update_freq=2.5), "update_freq"), (dict(fisher="true"), "fisher"),
        (dict(likelihood="poisson"), "likelihood"), (dict(fisher="exact"), "fisher"),
        (dict(curvature="diag"), "curvature"), (dict(block_clip=-2.0), "block_clip"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KFAC(_mlp(), **kwargs)


def test_q_specific_arguments_are_validated():
    with pytest.raises(ValueError, match="q_solve"):
        QKLDWRM(_mlp(), q_solve="cg")
    with pytest.raises(ValueError, match="model_curvature"):
        QKLDWRM(_mlp(), model_curvature=-1.0)


def test_model_without_parameters_raises():
    with pytest.raises(ValueError, match="no parameters"):
        KFAC(nn.ReLU())


def test_wholly_frozen_model_builds_and_steps_refuse_without_gradients():
    # as torch.optim: a frozen model is accepted (to be unfrozen later); a step before
    # any gradient exists is the usual clear error
    model = _mlp()
    model.requires_grad_(False)
    opt = KFAC(model)
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.step()


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_model_with_batchnorm_and_layernorm_trains(cls):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3),
    )
    x = torch.randn(96, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long() + (x.mean((1, 2, 3)) > 0.1)
    opt = cls(model, lr=0.05, update_freq=5)
    kinds = {name: kind for name, kind, _ in opt.engine.describe()}
    assert kinds["1.weight"] == kinds["5.bias"] == "diagonal" and kinds["0"] == "kronecker"
    first = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        _ordinary_step(model, opt, x, y)
    assert F.cross_entropy(model(x), y).item() < 0.3 * first


def test_several_parameter_groups_use_their_own_lr():
    model = _mlp()
    opt = KFAC(model, params=[{"params": model[0].parameters(), "lr": 0.1},
                              {"params": model[2].parameters(), "lr": 0.0125}], kl_clip=None)
    twin = copy.deepcopy(model)
    opt_twin = KFAC(twin, lr=0.1, kl_clip=None)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _ordinary_step(model, opt, x, y)
    _ordinary_step(twin, opt_twin, x, y)
    for i, (p, q, b) in enumerate(zip(model.parameters(), twin.parameters(), before,
                                      strict=True)):
        scale = 1.0 if i < 2 else 0.125
        torch.testing.assert_close(p - b, scale * (q - b), rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_kfac_trains_the_paper_cnn_one_mnist_epoch_to_95_percent(mnist):
    torch.manual_seed(0)
    model = paper_cnn()
    acc = train_epoch(model, KFAC(model), mnist)
    assert acc >= 0.95, acc


@pytest.mark.parametrize("kl_clip", [1e-6, 1e3])
def test_kl_clip_rescales_the_step_by_kfacs_rule(kl_clip):
    x, y = _batches(1)[0]
    steps = []
    for clip in (None, kl_clip):
        model = _mlp()
        opt = KFAC(model, lr=0.2, kl_clip=clip, weight_decay=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        _ordinary_step(model, opt, x, y)
        grads = [p.grad.clone() for p in model.parameters()]
        steps.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    free, clipped = steps
    d_dot_g = sum(float(torch.sum(-s / 0.2 * g)) for s, g in zip(free, grads, strict=True))
    nu = min(1.0, (kl_clip / (0.2**2 * abs(d_dot_g))) ** 0.5)
    assert (nu < 1.0) == (kl_clip < 1.0)
    for a, b in zip(clipped, free, strict=True):
        torch.testing.assert_close(a, nu * b, rtol=1e-12, atol=1e-15)
