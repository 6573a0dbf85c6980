"""The scale section (launcher/plan/scale.py): the formulas against the published figures they must
reproduce, the 405B recipe planned at 32 and 128 nodes, the waste budget's refusal,
checkpoint.every_steps=auto fixed once by the launcher, `ftl plan --json`, and the checkpoint bytes
of a 70B job against real ZeRO-3 and FSDP checkpoints scaled by parameter count."""

from __future__ import annotations

import json
import math
import re

import pytest
from helpers import TINY, ftl, step_dir

from launcher.config.errors import ConfigErrors
from launcher.plan.memory import checkpoint_bytes, param_counts
from launcher.plan.report import layout_for, workload_of
from launcher.plan.scale import (
    checkpoint_waste,
    intervals_within,
    mtbf_s,
    scale_lines,
    scale_plan,
    young_daly_s,
)
from launcher.session import load_config, prepare_run

R405 = "recipe=llama3-405b-full-zero3-multinode"
HOUR = 3600.0


# --------------------------------------------------------------------------------------------
# the formulas, by hand


def test_mtbf_of_a_job_from_failures_per_node_day() -> None:
    # 5 failures per 1,000 node-days (Meta's research clusters) over 128 nodes: 1000 / (5 × 128) days.
    assert mtbf_s(5.0, 128) == pytest.approx(1000 / (5 * 128) * 86400)
    assert mtbf_s(5.0, 128) / HOUR == pytest.approx(37.5)
    # Llama 3: 419 interruptions in 54 days on 16,384 GPUs (2,048 nodes) -> about 0.49 a day for 1,024 GPUs.
    rate = 419 / (54 * 2048) * 1000
    assert 86400 / mtbf_s(rate, 1024 // 8) == pytest.approx(419 / 54 / 16)
    assert 86400 / mtbf_s(rate, 128) == pytest.approx(0.49, abs=0.006)  # 0.485


@pytest.mark.parametrize("save_s,minutes,waste", [(60.0, 31, 0.065), (1.0, 4, 0.008)])
def test_young_daly_reproduces_the_published_intervals(save_s: float, minutes: int, waste: float) -> None:
    mtbf = 7.9 * HOUR  # RSC, 1,024-GPU jobs
    tau = young_daly_s(save_s, mtbf)
    assert tau == pytest.approx(math.sqrt(2 * save_s * mtbf))
    assert round(tau / 60) == minutes
    assert round(checkpoint_waste(tau, save_s, mtbf), 3) == waste
    # At the optimum both terms are equal, and any other interval loses more.
    assert save_s / tau == pytest.approx(tau / (2 * mtbf))
    assert (
        checkpoint_waste(0.8 * tau, save_s, mtbf)
        > checkpoint_waste(tau, save_s, mtbf)
        < checkpoint_waste(1.2 * tau, save_s, mtbf)
    )


def test_the_intervals_within_a_budget_are_where_the_waste_meets_it() -> None:
    lo, hi = intervals_within(0.10, 60.0, 7.9 * HOUR)
    assert lo < young_daly_s(60.0, 7.9 * HOUR) < hi
    assert checkpoint_waste(lo, 60.0, 7.9 * HOUR) == pytest.approx(0.10)
    assert checkpoint_waste(hi, 60.0, 7.9 * HOUR) == pytest.approx(0.10)
    assert intervals_within(0.05, 60.0, 7.9 * HOUR) is None  # a 60 s save: even the optimum loses 6.5%


# --------------------------------------------------------------------------------------------
# the 405B recipe


def test_405b_model_is_llama_3_1_405b() -> None:
    cfg = load_config([R405]).cfg
    a = cfg.model.arch
    assert (a.num_layers, a.hidden_size, a.intermediate_size, a.num_heads, a.num_kv_heads, a.vocab_size) == (
        126,
        16384,
        53248,
        128,
        8,
        128256,
    )
    assert a.rope_theta == 500000.0 and not a.tie_embeddings
    assert param_counts(a).total == 405_853_388_800  # Meta's model card: 405B (405.85B with untied embeddings)


def plan_at(*overrides: str):
    cfg = load_config([R405, *overrides]).cfg
    plan = scale_plan(cfg)
    assert plan is not None
    return cfg, plan


def test_405b_at_128_nodes_by_hand() -> None:
    cfg, p = plan_at("launch.nodes=128")
    n = param_counts(cfg.model.arch).total
    assert p.gpus == 1024 and p.min_global_batch == 1024 and p.tokens_per_step == 1024 * 8192  # one 8k pack per rank
    assert p.checkpoint_bytes == 12 * n  # ZeRO-3: fp32 master + two Adam moments, no gathered module
    assert p.checkpoint_bytes / 1e12 == pytest.approx(
        4.87, abs=0.01
    ) and p.checkpoint_bytes_per_gpu / 1e9 == pytest.approx(4.76, abs=0.01)
    assert p.export_bytes / 1e9 == pytest.approx(812, abs=1)  # bf16
    assert p.save_s == pytest.approx(12 * n / 100e9)  # launch.io_gb_per_s=100: about 49 s
    assert p.mtbf_s / HOUR == pytest.approx(37.5)
    assert p.optimal_interval_s == pytest.approx(math.sqrt(2 * p.save_s * p.mtbf_s))
    pc = param_counts(cfg.model.arch)
    matmul = pc.total - pc.embed - pc.final_norm - pc.layers_other
    assert p.step_s == pytest.approx(6 * matmul * p.tokens_per_step / (0.35 * 989e12 * 1024))
    assert p.compute_s == pytest.approx(1000 * p.step_s)
    assert p.every_steps == "auto"  # as composed; the launcher fixes it (test_auto_is_resolved_once...)
    assert p.waste == pytest.approx(checkpoint_waste(p.optimal_every_steps * p.step_s, p.save_s, p.mtbf_s))
    assert p.wall_s == pytest.approx(p.compute_s * (1 + p.waste + (600 + p.save_s) / p.mtbf_s))
    assert p.gpu_hours == pytest.approx(p.wall_s * 1024 / HOUR) and p.cost == pytest.approx(2.0 * p.gpu_hours)
    assert p.interruptions == pytest.approx(p.wall_s / p.mtbf_s)


def test_lora_charges_4_flops_per_frozen_weight() -> None:
    _, full = plan_at("launch.nodes=128")
    _, lora = plan_at("launch.nodes=128", "peft=lora")
    assert lora.flops_per_token < full.flops_per_token * 4 / 6 * 1.01
    assert lora.flops_per_token > full.flops_per_token * 4 / 6


def test_plan_prints_the_scale_section_at_128_nodes(tmp_path) -> None:
    out = ftl("plan", R405, "launch.nodes=128", f"run.dir={tmp_path / 'run'}").stdout
    _, p = plan_at("launch.nodes=128")
    section = out[out.index("--- scale: 128 nodes × 8 H100 = 1024 GPUs") :]
    assert "MTBF 37.5 h for 128 node(s)" in section
    assert f"Young/Daly      every {p.optimal_every_steps} steps (60 min): 2.7% lost" in section
    assert f"every_steps={p.optimal_every_steps}" in section and "within checkpoint.max_waste=0.05" in section
    assert f"GPU-hours       {p.gpu_hours:,.0f}; cost {p.cost:,.0f} at 2 per GPU-hour" in section
    assert "4.87 TB resumable state (4.76 GB per GPU); saved in 49 s at 100 GB/s" in section
    assert "812 GB Hugging Face directory" in section
    assert "#SBATCH --nodes=128" in out


def test_an_interval_far_too_long_is_refused_with_one_that_fits(tmp_path) -> None:
    _, p = plan_at("launch.nodes=128")
    out = ftl(
        "plan", R405, "launch.nodes=128", "checkpoint.every_steps=900", f"run.dir={tmp_path / 'run'}", check=False
    )
    assert out.returncode == 2, out.stderr
    assert "checkpoint.every_steps: every 900 steps" in out.stderr and "over checkpoint.max_waste=0.05" in out.stderr
    assert f"use checkpoint.every_steps={p.optimal_every_steps} (Young/Daly, 2.7%)" in out.stderr
    lo, hi = p.fitting_steps
    assert f"any interval from {lo} to {hi} steps fits" in out.stderr
    assert (
        checkpoint_waste(hi * p.step_s, p.save_s, p.mtbf_s)
        <= 0.05
        < checkpoint_waste((hi + 1) * p.step_s, p.save_s, p.mtbf_s)
    )
    load_config([R405, "launch.nodes=128", f"checkpoint.every_steps={hi}"])  # the longest that fits is accepted


def test_no_interval_fits_slow_storage() -> None:
    with pytest.raises(ConfigErrors) as e:
        load_config([R405, "launch.nodes=128", "launch.io_gb_per_s=2"])  # a 41-minute save every 37.5 h: 19% at best
    (err,) = e.value.errors
    assert (
        err.path == "checkpoint.every_steps"
        and "no interval fits" in err.message
        and "launch.cluster.checkpoint_gb_per_s" in err.message
    )


def test_saving_often_is_shown_not_refused() -> None:
    cfg, p = plan_at("launch.nodes=128", "checkpoint.every_steps=1")
    assert p.waste > 0.5 and p.over_budget and not p.refused  # a 49 s save after each 57 s step


def test_a_bad_every_steps_word_and_an_unknown_gpu_are_named() -> None:
    with pytest.raises(ConfigErrors) as e:
        load_config([R405, "checkpoint.every_steps=often", "launch.cluster.gpu=V100"])
    text = str(e.value)
    assert "checkpoint.every_steps: got 'often'; expected an integer or auto" in text
    assert "launch.cluster.gpu: got 'V100'" in text and "H100" in text


# --------------------------------------------------------------------------------------------
# every_steps=auto


def test_auto_is_resolved_once_into_the_config_the_ranks_read(tmp_path) -> None:
    from launcher.config.validate import load_run_config
    from launcher.rundir.write import write_run_dir

    run = prepare_run([R405, f"run.dir={tmp_path / 'run'}"])
    _, p = plan_at()
    assert run.cfg.checkpoint.every_steps == run.raw["checkpoint"]["every_steps"] == p.optimal_every_steps
    assert any("checkpoint.every_steps=auto: every" in n for n in run.notes)
    write_run_dir(run.raw, run.plan, run.config_path, ["plan"])
    assert load_run_config(run.config_path).checkpoint.every_steps == p.optimal_every_steps


def test_auto_needs_a_gpu_job() -> None:
    with pytest.raises(ConfigErrors, match="checkpoint.every_steps: auto sizes the interval from a GPU job"):
        load_config([*TINY, "train.device=cpu", "checkpoint.every_steps=auto"])


# --------------------------------------------------------------------------------------------
# --json


def test_plan_json_holds_the_same_figures_as_the_text(tmp_path) -> None:
    args = [R405, "launch.nodes=128", f"run.dir={tmp_path / 'run'}"]
    doc = json.loads(ftl("plan", "--json", *args).stdout)
    text = ftl("plan", *args).stdout
    s = doc["scale"]
    assert s["nodes"] == 128 and s["gpus"] == 1024 == doc["layout"]["world_size"]
    assert f"MTBF {s['mtbf_s'] / HOUR:.1f} h" in text
    assert f"every {s['optimal_every_steps']} steps" in text and f"{s['optimal_waste']:.1%} lost" in text
    assert f"GPU-hours       {s['gpu_hours']:,.0f}; cost {s['cost']:,.0f}" in text
    assert f"{s['interruptions']:.1f} interruptions" in text
    m = doc["memory"]
    assert m["chosen"]["label"] == doc["layout"]["strategy"] == "zero3" and m["fits"]
    total = re.search(r"^  total +(\S+) GiB", text, re.M)
    assert total and float(total[1]) == pytest.approx(m["chosen"]["total"] / 2**30, rel=5e-3)
    assert [r["label"] for r in m["rows"]] == re.findall(
        r"^  (\S+(?: r=16 · \S+)?) +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+  (?:yes|no)", text, re.M
    )
    assert doc["summary"]["batch"] in text and doc["command"][0] in text


def test_plan_json_of_a_cpu_job_has_no_scale(tmp_path) -> None:
    doc = json.loads(ftl("plan", "--json", *TINY, "train.device=cpu", f"run.dir={tmp_path / 'run'}").stdout)
    assert doc["scale"] is None and doc["memory"]["on_gpu"] is False


# --------------------------------------------------------------------------------------------
# a 70B job's checkpoint against real checkpoints, scaled by parameter count


def written_bytes(tmp_path, strategy: str, hidden: int) -> tuple[int, int]:
    """(bytes on disk, parameters) of a one-step checkpoint of a 2-layer model ``hidden`` wide."""
    run = tmp_path / f"{strategy}-{hidden}"
    size = [f"model.arch.hidden_size={hidden}", f"model.arch.intermediate_size={2 * hidden}"]
    ftl(
        "train",
        *TINY,
        *size,
        f"strategy={strategy}",
        "train.max_steps=1",
        "checkpoint.every_steps=0",
        "eval.after_training=false",
        f"run.dir={run}",
    )
    on_disk = sum(f.stat().st_size for f in step_dir(run, 1).rglob("*") if f.is_file())
    return on_disk, param_counts(load_config([*TINY, *size]).cfg.model.arch).total


@pytest.mark.parametrize("strategy", ["zero3", "fsdp"])
def test_70b_checkpoint_bytes_match_a_real_checkpoint_scaled_by_parameters(strategy: str, tmp_path) -> None:
    """Two widths of the same 2-layer model: the difference in bytes over the difference in
    parameters is the checkpoint's bytes per parameter, free of the files every checkpoint has
    (RNG states, JSON, DeepSpeed's scripts, DCP's per-tensor metadata)."""
    small, n_small = written_bytes(tmp_path, strategy, 64)
    big, n_big = written_bytes(tmp_path, strategy, 256)
    per_param = (big - small) / (n_big - n_small)
    cfg = load_config(["recipe=llama3-70b-full-zero3-multinode", f"strategy={strategy}"]).cfg
    planned = checkpoint_bytes(workload_of(cfg, "bf16"), layout_for(cfg))
    measured = per_param * param_counts(cfg.model.arch).total
    assert planned == pytest.approx(measured, rel=0.05), (planned / 1e9, measured / 1e9, per_param)


def test_an_async_save_blocks_for_the_copy_to_host_memory_and_is_written_within_the_interval() -> None:
    """checkpoint.async_save on fsdp: training waits while each GPU stages its shard at
    launch.cluster.staging_gb_per_s; the write goes on in the background, so no interval is
    shorter than it. ZeRO-3 (DeepSpeed) saves synchronously whatever the switch says."""
    cfg, sync = plan_at("launch.nodes=128", "strategy=fsdp", "checkpoint.async_save=false")
    _, staged = plan_at("launch.nodes=128", "strategy=fsdp")
    _, zero3 = plan_at("launch.nodes=128")
    assert not sync.async_save and sync.save_s == sync.write_s == pytest.approx(sync.checkpoint_bytes / 100e9)
    assert staged.async_save and staged.write_s == pytest.approx(sync.write_s)
    assert staged.save_s == pytest.approx(staged.checkpoint_bytes_per_gpu / 10e9)  # 10 GB/s per GPU, in parallel
    assert staged.save_s < sync.save_s / 5
    assert staged.optimal_interval_s == pytest.approx(max(math.sqrt(2 * staged.save_s * staged.mtbf_s), staged.write_s))
    assert staged.optimal_waste < sync.optimal_waste
    assert not zero3.async_save and zero3.save_s == zero3.write_s
    text = "\n".join(scale_lines(staged, cfg))
    assert "training waits 0.48 s while it is copied to host memory at 10 GB/s per GPU" in text, text
