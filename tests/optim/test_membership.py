"""Parameters that change during training: ``requires_grad`` turned on or off, and groups
added with ``add_param_group``. A tensor unfrozen later is trained from its first gradient
with a block of its own kind and the curvature of that batch; one frozen later keeps its
block's state and takes no step; added groups train with their own hyperparameters; all
of it survives a ``state_dict`` round trip bit for bit (float64)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kldwrm

pytestmark = pytest.mark.usefixtures("float64")

RULES = {
    "kfac": {},
    "so": {},
    "q": {},
    "qe": dict(window=2, inner_steps=2, inner_lr=0.05),
}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def _batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _step(model: nn.Module, opt: torch.optim.Optimizer, k: int) -> None:
    x, y = _batch(k)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _build(name: str, model: nn.Module, **kw) -> kldwrm.CurvatureOptimizer:
    kw = {"lr": 0.05, "update_freq": 4, "fisher": "empirical", **RULES[name], **kw}
    return kldwrm.make_optimizer(name, model, **kw)


def _kinds(opt) -> dict[str, str]:
    return {name: kind for name, kind, _ in opt.engine.describe()}


def _kron(opt, name: str):
    return next(b for b in opt.engine.blocks if b.name == name).factors


# -- requires_grad turned on ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(RULES))
def test_layer_unfrozen_later_trains_from_its_first_gradient(name):
    model = _model()
    model[0].requires_grad_(False)
    opt = _build(name, model)
    assert _kinds(opt)["0"] == "kronecker"
    frozen = [p.detach().clone() for p in model[0].parameters()]
    for k in range(6):  # refreshes at 0 and 4 leave the frozen layer's block untouched
        _step(model, opt, k)
    assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen, strict=True))
    assert not _kron(opt, "0").initialized
    model[0].requires_grad_(True)  # step 6 is not a refresh step (update_freq 4)
    twin = copy.deepcopy(model)
    _step(model, opt, 6)
    assert all(not torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen, strict=True))
    # the block's curvature is that of the batch it was unfrozen on
    ref = _build("kfac", twin)
    _step(twin, ref, 6)
    torch.testing.assert_close(_kron(opt, "0").A_bar, _kron(ref, "0").A_bar, rtol=1e-13, atol=0)
    torch.testing.assert_close(_kron(opt, "0").G_bar, _kron(ref, "0").G_bar, rtol=1e-13, atol=0)
    assert not opt.engine.capture.armed  # back to the refresh schedule
    for k in range(7, 10):
        _step(model, opt, k)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unfrozen_kfac_step_is_the_fresh_kronecker_step():
    """K-FAC without the KL clip is blockwise: the unfrozen layer's first step equals the
    first step of a new optimizer on the same model and batch."""
    model = _model()
    model[0].requires_grad_(False)
    opt = _build("kfac", model, kl_clip=None)
    for k in range(3):
        _step(model, opt, k)
    model[0].requires_grad_(True)
    twin = copy.deepcopy(model)
    ref = _build("kfac", twin, kl_clip=None)
    before = [p.detach().clone() for p in model[0].parameters()]
    _step(model, opt, 3)
    _step(twin, ref, 3)
    for p, q, b in zip(model[0].parameters(), twin[0].parameters(), before, strict=True):
        torch.testing.assert_close(p - b, q - b, rtol=1e-12, atol=1e-15)


def test_unfrozen_between_zero_grad_and_forward_is_captured():
    """The loop ``step(); zero_grad()`` then unfreezing before the next forward pass: the
    watch hook arms the capture for that pass."""
    model = _model()
    model[0].requires_grad_(False)
    opt = _build("kfac", model)
    x, y = _batch(0)
    for k in range(2):
        x, y = _batch(k)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model[0].requires_grad_(True)
    before = model[0].weight.detach().clone()
    x, y = _batch(2)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert _kron(opt, "0").initialized
    assert not torch.equal(model[0].weight, before)


def test_no_watch_hook_when_nothing_is_frozen():
    model = _model()
    opt = _build("kfac", model)
    assert opt._watcher is None
    _step(model, opt, 0)
    assert len(model._forward_pre_hooks) == 0  # the capture is disarmed between refreshes


@pytest.mark.parametrize("name", list(RULES))
def test_layer_frozen_later_keeps_its_state_and_takes_no_step(name):
    model = _model()
    opt = _build(name, model)
    for k in range(3):
        _step(model, opt, k)
    model[2].requires_grad_(False)
    state = {k: v.clone() for k, v in _kron(opt, "2").state_dict().items()}
    rule = {k: v.clone() if torch.is_tensor(v) else v
            for k, v in opt.state[model[2].weight].items()}
    frozen = [p.detach().clone() for p in model[2].parameters()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for k in range(3, 10):  # two refresh steps (4, 8)
            _step(model, opt, k)
    assert not [w for w in record if issubclass(w.category, kldwrm.MissingCurvatureWarning)]
    assert all(torch.equal(p, f) for p, f in zip(model[2].parameters(), frozen, strict=True))
    after = _kron(opt, "2").state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    for k, v in rule.items():  # QE's window goes on recording the (constant) iterates
        now = opt.state[model[2].weight][k]
        if k != "qe_window":
            assert torch.equal(now, v) if torch.is_tensor(v) else now == v, k
    assert not torch.equal(model[0].weight, _model()[0].weight)  # the others did train


@pytest.mark.parametrize("name", list(RULES))
def test_frozen_then_unfrozen_resumes_bit_exactly(name):
    model = _model()
    model[0].requires_grad_(False)
    opt = _build(name, model)
    for k in range(5):
        _step(model, opt, k)
    model[0].requires_grad_(True)
    model[4].requires_grad_(False)
    _step(model, opt, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for k in range(6, 12):
        _step(model, opt, k)

    other = _model(seed=1)
    other.load_state_dict(saved_model)
    other[4].requires_grad_(False)
    resumed = _build(name, other)
    resumed.load_state_dict(saved_opt)
    for k in range(6, 12):
        _step(other, resumed, k)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_pending_catch_up_survives_a_round_trip():
    """Saved after unfreezing but before the catch-up step: the resumed run catches up."""
    model = _model()
    model[0].requires_grad_(False)
    opt = _build("q", model)
    _step(model, opt, 0)
    model[0].requires_grad_(True)
    opt._arm_next()  # what the next zero_grad/forward would notice
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _step(model, opt, 1)
    other = _model(seed=1)
    other.load_state_dict(saved_model)
    resumed = _build("q", other)
    resumed.load_state_dict(saved_opt)
    _step(other, resumed, 1)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


# -- add_param_group ------------------------------------------------------------------------
def _body_and_head(opt_name: str, model: nn.Module, later: bool, **kw):
    body = [p for m in list(model)[:4] for p in m.parameters()]
    head = {"params": list(model[4].parameters()), "lr": 0.02, "damping": 0.05}
    if later:
        opt = _build(opt_name, model, params=body, **kw)
        opt.add_param_group(head)
        return opt
    return _build(opt_name, model, params=[{"params": body}, head], **kw)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("name", list(RULES))
def test_group_added_before_training_equals_it_given_at_construction(name, fisher):
    runs = []
    for later in (False, True):
        model = _model()
        opt = _body_and_head(name, model, later, fisher=fisher, seed=3)
        for k in range(9):
            _step(model, opt, k)
        runs.append([p.detach() for p in model.parameters()])
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(RULES))
def test_group_added_later_trains_with_its_own_settings_and_resumes(name):
    model = _model()
    body = [p for m in list(model)[:4] for p in m.parameters()]
    opt = _build(name, model, params=body)
    head = list(model[4].parameters())
    before = [p.detach().clone() for p in head]
    for k in range(3):
        _step(model, opt, k)
    assert all(torch.equal(p, b) for p, b in zip(head, before, strict=True))  # not optimized
    opt.add_param_group({"params": head, "lr": 0.02})
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[1]["damping"] == 1e-2
    assert _kinds(opt)["4"] == "kronecker"
    _step(model, opt, 3)
    assert all(not torch.equal(p, b) for p, b in zip(head, before, strict=True))
    assert name == "kfac" or all(p in opt.state for p in head)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for k in range(4, 10):
        _step(model, opt, k)

    other = _model(seed=1)
    other.load_state_dict(saved_model)
    resumed = _build(name, other, params=[p for m in list(other)[:4] for p in m.parameters()])
    resumed.add_param_group({"params": list(other[4].parameters()), "lr": 0.02})
    resumed.load_state_dict(saved_opt)
    for k in range(4, 10):
        _step(other, resumed, k)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_add_param_group_bad_input():
    model = _model()
    opt = _build("kfac", model, params=list(model[0].parameters()))
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [model[0].weight]})
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="parameter of the model"):
        opt.add_param_group({"params": [stranger]})
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]"):
        opt.add_param_group({"params": list(model[2].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.engine.params) == 2
    _step(model, opt, 0)  # still usable


def test_a_layer_added_to_the_model_later_gets_a_block():
    """Progressive training: a new head module attached to the model, then its group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = _build("q", model)
    for k in range(2):
        _step(model, opt, k)
    model.append(nn.Tanh())
    model.append(nn.Linear(3, 3))
    opt.add_param_group({"params": list(model[4].parameters())})
    before = model[4].weight.detach().clone()
    for k in range(2, 6):
        _step(model, opt, k)
    assert _kinds(opt)["4"] == "kronecker" and _kron(opt, "4").initialized
    assert not torch.equal(model[4].weight, before)
