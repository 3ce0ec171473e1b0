import torch

from latentforge.model import HybridModel
from latentforge.model.recipes import compose, model_config_from
from latentforge.train.config import OptimConfig
from latentforge.train.optim import OptimizerContainer, param_groups


def tiny_model():
    return HybridModel(model_config_from(compose(["recipe=tiny"])))


def expected_no_decay(name: str) -> bool:
    # written out from the issue: norms, biases, A_log, D, dt_bias
    leaf = name.split(".")[-1]
    owner = name.split(".")[-2]
    return leaf in {"bias", "A_log", "D", "dt_bias"} or owner in {"norm", "norm_f", "enorm", "hnorm", "final_layernorm"}


def test_param_groups_split_decay_exactly_once():
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.1)
    ids = {id(p): wd for g in groups for p, wd in ((p, g["weight_decay"]) for p in g["params"])}
    names = dict(model.named_parameters())
    assert len(ids) == len(names) == sum(len(g["params"]) for g in groups)  # each parameter once
    for name, p in names.items():
        assert ids[id(p)] == (0.0 if expected_no_decay(name) else 0.1), name
    assert any(expected_no_decay(n) for n in names) and not all(expected_no_decay(n) for n in names)
    # the expert bias is a buffer, trained by the balancing rule: never an optimizer parameter
    bias_ids = {id(b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert bias_ids and not bias_ids & set(ids)


def test_adamw_decays_only_decay_group():
    model = tiny_model()
    opt = OptimizerContainer([model], OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only decoupled weight decay moves the weights
    opt.step()
    for name, p in model.named_parameters():
        factor = 1.0 if expected_no_decay(name) else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7, msg=name)


def test_set_lr_reaches_every_group():
    model = tiny_model()
    opt = OptimizerContainer([model.backbone, model.lm_head], OptimConfig(lr=1.0))
    opt.set_lr(0.25)
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.25] * sum(
        len(o.param_groups) for o in opt.optimizers
    )
