import pytest
import torch

from sonosynth.infra.config import ConfigError, build
from sonosynth.trainers.optim import OptimConfig, build_optimizer, lr_factor


def test_constant_schedule_with_warmup():
    cfg = OptimConfig(warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_to_the_floor():
    cfg = OptimConfig(schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(0.55)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)


def test_param_groups_keep_their_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt, sched = build_optimizer([{"params": [a]}, {"params": [b], "lr": 5e-5}], OptimConfig(lr=1e-4), 10)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([{"params": []}], OptimConfig(), 10)


def test_bad_lr_names_the_fix():
    with pytest.raises(ConfigError, match="lr must be positive"):
        build(OptimConfig, {"lr": 0})
