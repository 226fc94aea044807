"""Each schedule's first, middle and last values, and scaling with the run's length."""
import math

import pytest

from selfsup.config import Config
from selfsup.train.schedules import Schedules, cosine, warmup_constant


def test_cosine_with_warmup_first_middle_last():
    s = cosine(1.0, 0.0, total=110, warmup=10, warmup_start=0.0)
    assert len(s) == 110
    assert s[0] == 0.0 and s[5] == pytest.approx(0.5)  # linear warm-up
    assert s[10] == pytest.approx(1.0)  # cosine starts at the base value
    assert s[10 + 50] == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 50 / 99))  # half-way down the cosine
    assert s[-1] == pytest.approx(0.0)


def test_warmup_then_constant():
    s = warmup_constant(0.04, 0.07, total=100, warmup=30)
    assert s[0] == pytest.approx(0.04) and s[15] == pytest.approx(0.055) and s[30] == s[-1] == pytest.approx(0.07)


def test_dino_schedules_scale_with_the_run():
    cfg = Config()  # DINO defaults: warm-up 10 / teacher-temperature warm-up 30 / frozen last layer 1 of 100 epochs
    cfg.optim.batch_size = 512
    s = Schedules.build(cfg, total_steps=1000, steps_per_epoch=100)  # a 10-epoch run keeps the shape
    lr = 5e-4 * 512 / 256
    assert s.lr[100] == pytest.approx(lr)  # 10 % warm-up: peak at step 100
    assert s.lr[50] == pytest.approx(lr / 2)
    assert s.lr[-1] == pytest.approx(1e-6)
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[300] == pytest.approx(0.07)
    assert s.teacher_temp[150] == pytest.approx(0.055)
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.weight_decay[len(s.weight_decay) // 2] == pytest.approx(0.22, abs=1e-3)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0)
    assert s.freeze_last_layer_steps == 10


def test_unscaled_schedules_keep_epoch_counts():
    cfg = Config()
    cfg.optim.schedule_epochs = None
    s = Schedules.build(cfg, total_steps=5000, steps_per_epoch=100)
    assert s.freeze_last_layer_steps == 100 and s.teacher_temp[2999] < 0.07 and s.teacher_temp[3000] == pytest.approx(0.07)


def test_sqrt_lr_scaling():
    cfg = Config()
    cfg.optim.lr_scaling, cfg.optim.lr_base_batch, cfg.optim.lr, cfg.optim.batch_size = "sqrt", 1024, 4e-3, 256
    s = Schedules.build(cfg, total_steps=100, steps_per_epoch=10)
    assert max(s.lr) == pytest.approx(4e-3 * 0.5)
