"""train.fp32_residual: under bf16 autocast over fp32 weights the trainer keeps the hidden states
between decoder layers in bf16 (launcher.runtime.device.bf16_residual_stream) unless told to keep
them in fp32, as HF Trainer's autocast does."""

from __future__ import annotations

import pytest
import torch

from launcher.model.loss import next_token_loss
from launcher.session import load_config
from launcher.train.trainer import build_model

CPU = torch.device("cpu")


def built(*overrides: str) -> torch.nn.Module:
    cfg = load_config(["recipe=tiny", "train.precision=bf16", *overrides]).cfg
    torch.manual_seed(0)
    model, _ = build_model(cfg, CPU)
    return model


def stream_dtypes(model: torch.nn.Module, autocast: bool) -> set[torch.dtype]:
    """The dtypes of what each decoder layer and the final norm receive, in one forward."""
    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.add((args[0] if args else kwargs["hidden_states"]).dtype)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in (*model.model.layers, model.model.norm)]
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("fp32_residual, dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_the_stream_is_bf16_under_autocast_unless_kept_fp32(fp32_residual: bool, dtype: torch.dtype) -> None:
    model = built(f"train.fp32_residual={str(fp32_residual).lower()}")
    assert next(model.parameters()).dtype == torch.float32  # fp32 weights: autocast, not a cast model
    assert stream_dtypes(model, autocast=True) == {dtype}
    assert stream_dtypes(model, autocast=False) == {torch.float32}  # outside autocast nothing changes


def test_a_bf16_stream_trains_close_to_an_fp32_one() -> None:
    """The same weights and batch: loss and every gradient within bf16 rounding of the fp32 stream's,
    and not equal to them (the cast is on the path)."""
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :8] = -100
    results = []
    for fp32_residual in (False, True):
        model = built(f"train.fp32_residual={str(fp32_residual).lower()}")
        loss = next_token_loss(model, {"input_ids": ids}, labels, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (bf16_loss, bf16_grads), (fp32_loss, fp32_grads) = results
    assert bf16_loss != fp32_loss
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=1e-2, atol=0)
    for name, grad in fp32_grads.items():
        err = float((bf16_grads[name] - grad).norm() / grad.norm())
        assert err < 3e-2, (name, err)


def test_ftl_eval_of_a_bf16_run_computes_what_the_run_did(tmp_path) -> None:
    """A full fine-tune in bf16 evaluates with the bf16 stream after training; ``ftl eval`` of its
    run dir loads the model afresh and must do the same to report the same loss."""
    import json

    from helpers import TINY, ftl

    run = tmp_path / "run"
    short = ["eval.generate=false", "eval.max_batches=2"]
    ftl("train", *TINY, "train.precision=bf16", "train.max_steps=2", *short, f"run.dir={run}")
    trained = json.loads((run / "eval.json").read_text())["after"]
    ftl("eval", str(run), *short)
    again = json.loads((run / "eval" / "step-2" / "eval.json").read_text())["after"]
    assert again["tokens"] == trained["tokens"] and again["loss"] == pytest.approx(trained["loss"], rel=1e-6)
