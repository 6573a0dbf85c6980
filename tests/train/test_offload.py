"""strategy.activation_offloading: the saved activations wait in pinned host memory (CUDA only)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY, ftl

from launcher.data.types import IGNORE_INDEX
from launcher.train.device import offloaded_activations
from launcher.train.loss import next_token_loss


def test_a_cpu_rank_refuses_activation_offloading_before_training(tmp_path) -> None:
    """train.device=auto passes validation on a machine without a GPU; the rank, which knows its
    device, refuses: exit 2, no step trained."""
    out = ftl("train", *TINY, "strategy.activation_offloading=true", f"run.dir={tmp_path / 'run'}", check=False)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "strategy.activation_offloading: needs a CUDA GPU" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text().strip()


@pytest.mark.gpu
def test_offloaded_activations_train_the_same_numbers_in_less_gpu_memory() -> None:
    from helpers import need_gpus

    need_gpus(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                         num_attention_heads=8)).cuda()  # fmt: skip
    ids = torch.randint(0, 1024, (4, 1024), device="cuda")
    labels = ids.clone()
    labels[:, :100] = IGNORE_INDEX
    results = {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with offloaded_activations(offload):
            loss = next_token_loss(model, {"input_ids": ids}, labels)
        loss.backward()
        torch.cuda.synchronize()
        results[offload] = (loss.detach(), [p.grad.clone() for p in model.parameters()], torch.cuda.max_memory_allocated() - before)
    torch.testing.assert_close(results[True][0], results[False][0])
    for got, want in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(got, want)
    assert results[True][2] < 0.6 * results[False][2], f"peak {results[True][2] / 2**20:.0f} MiB vs {results[False][2] / 2**20:.0f} MiB"
