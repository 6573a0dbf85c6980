"""The learning-rate schedule: pure values at the steps that matter, and the torch scheduler that
drives the optimizer from it."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.config.schema import TrainConfig
from launcher.engines.common import build_optimizer, build_scheduler, seek_schedule
from launcher.runtime.schedule import lr_at

PEAK, FLOOR = 3e-3, 3e-4  # min_lr_ratio 0.1


def train(schedule: str = "cosine", warmup: int = 2) -> TrainConfig:
    return TrainConfig(lr=PEAK, schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_is_linear_and_never_zero(schedule: str) -> None:
    cfg = train(schedule, warmup=4)
    assert [lr_at(s, cfg, 100) for s in range(4)] == pytest.approx([PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK])
    assert lr_at(4, cfg, 100) == pytest.approx(PEAK)


def test_cosine_key_steps() -> None:
    cfg = train("cosine", warmup=2)  # 20 decay steps over a 22-step run
    assert lr_at(2, cfg, 22) == pytest.approx(PEAK)
    assert lr_at(7, cfg, 22) == pytest.approx(FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(12, cfg, 22) == pytest.approx((PEAK + FLOOR) / 2)
    assert lr_at(22, cfg, 22) == pytest.approx(FLOOR)
    assert lr_at(500, cfg, 22) == pytest.approx(FLOOR)  # past the end it stays at the floor


def test_linear_key_steps() -> None:
    cfg = train("linear", warmup=2)
    assert lr_at(2, cfg, 22) == pytest.approx(PEAK)
    assert lr_at(7, cfg, 22) == pytest.approx(PEAK - 0.25 * (PEAK - FLOOR))
    assert lr_at(12, cfg, 22) == pytest.approx((PEAK + FLOOR) / 2)
    assert lr_at(22, cfg, 22) == pytest.approx(FLOOR)


def test_constant_after_warmup() -> None:
    cfg = train("constant", warmup=2)
    assert [lr_at(s, cfg, 10) for s in (2, 5, 9, 10, 50)] == pytest.approx([PEAK] * 5)


def test_no_warmup_starts_at_peak() -> None:
    for schedule in ("cosine", "linear", "constant"):
        assert lr_at(0, train(schedule, warmup=0), 10) == pytest.approx(PEAK)


def test_decay_is_monotone_and_bounded() -> None:
    for schedule in ("cosine", "linear"):
        lrs = [lr_at(s, train(schedule), 50) for s in range(2, 60)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
        assert min(lrs) == pytest.approx(FLOOR)


def test_min_lr_ratio_zero_decays_to_zero() -> None:
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(10, cfg, 10) == pytest.approx(0.0, abs=1e-12)


def test_warmup_longer_than_run() -> None:
    cfg = train("cosine", warmup=10)  # clipped to 4 of the 5 steps: the last one runs at the peak
    assert lr_at(3, cfg, 5) == pytest.approx(PEAK)
    assert lr_at(4, cfg, 5) == pytest.approx(PEAK)


def test_unknown_schedule_raises() -> None:
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, train("bogus"), 10)


def test_torch_scheduler_follows_lr_at() -> None:
    cfg = train("cosine", warmup=3)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, 12)
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, cfg, 12) for s in range(15)])


def saved_at(cfg: TrainConfig, total: int, steps: int) -> tuple[dict, dict, list[float]]:
    """An optimizer and schedule stepped `steps` times: their state dicts (what a checkpoint holds)
    and the lrs they would train the next step with."""
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict(), [g["lr"] for g in optimizer.param_groups]


def restored(
    cfg: TrainConfig, total: int, saved: tuple[dict, dict, list[float]], step: int, more: int = 0
) -> list[float]:
    """A resume as an engine does it (build from the current config, load the checkpoint's state,
    seek), then `more` steps: the lrs the next step trains with."""
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    seek_schedule(scheduler, step, cfg.lr)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [cfg.lr] * len(optimizer.param_groups)
    for _ in range(more):
        optimizer.step()
        scheduler.step()
    return [g["lr"] for g in optimizer.param_groups]


def test_a_restored_schedule_follows_the_current_config() -> None:
    """The checkpoint's scheduler state (base_lrs) and param groups (lr, initial_lr) hold the old
    lr and run length; the resumed run trains with the new ones from its first step on."""
    old = train("cosine", warmup=2)
    saved = saved_at(old, 10, 6)
    for new, total in (
        (TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1), 10),
        (old, 20),
        (TrainConfig(lr=PEAK, schedule="linear", warmup_steps=8, min_lr_ratio=0.5), 10),
    ):
        for more in (0, 2):
            assert restored(new, total, saved, 6, more) == pytest.approx([lr_at(6 + more, new, total)] * 2, rel=1e-12)


def test_a_restored_schedule_with_nothing_changed_is_bit_exact() -> None:
    cfg = train("cosine", warmup=2)
    assert restored(cfg, 10, saved_at(cfg, 10, 6), 6) == saved_at(cfg, 10, 6)[2]
    assert restored(cfg, 10, saved_at(cfg, 10, 6), 6, more=3) == saved_at(cfg, 10, 9)[2]


def test_no_weight_decay_on_biases_and_norms() -> None:
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = build_optimizer(model, cfg).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight)}


def test_a_warmup_longer_than_the_run_is_clipped_with_a_notice() -> None:
    from launcher.runtime.schedule import warmup_notice, warmup_steps

    cfg = train("cosine", warmup=8)  # recipe=demo's warmup
    assert warmup_steps(cfg, 84) == 8 and warmup_notice(cfg, 84) is None
    assert warmup_steps(cfg, 4) == 3  # train.max_steps=4: three warmup steps, the last at the peak
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([PEAK / 3, 2 * PEAK / 3, PEAK, PEAK])
    assert "train.warmup_steps=8 is not shorter than this run's 4 steps: warming up over 3 step(s)" in warmup_notice(
        cfg, 4
    )
    assert warmup_steps(cfg, 1) == 0 and lr_at(0, cfg, 1) == pytest.approx(PEAK)


def test_shortening_the_demo_recipe_plans_with_the_notice() -> None:
    import subprocess
    import sys

    from helpers import ftl_env

    from launcher.paths import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "plan", "recipe=demo", "train.max_steps=4", "run.dir=/nonexistent/ftl-plan"],
        cwd=ROOT,
        env=ftl_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warming up over 3 step(s) instead" in proc.stdout


def test_a_restored_optimizer_takes_the_current_weight_decay_and_betas() -> None:
    """The checkpoint's param groups hold the weight decay and betas they were saved under; the
    resumed run trains with the config's (decayed matrices only), as it says it does."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old = TrainConfig(lr=1e-3, weight_decay=0.0, betas=[0.9, 0.95])
    optimizer = build_optimizer(model, old)
    scheduler = build_scheduler(optimizer, old, 10)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    new = TrainConfig(lr=1e-3, weight_decay=0.1, betas=[0.8, 0.99])
    optimizer = build_optimizer(model, new)
    scheduler = build_scheduler(optimizer, new, 10)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]  # what the checkpoint brought back
    seek_schedule(scheduler, 3, new.lr)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # the matrix decays, the norm does not
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in optimizer.param_groups)
