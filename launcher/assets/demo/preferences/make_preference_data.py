#!/usr/bin/env python3
"""Deterministic generator for the ftl preference (DPO) demo dataset.

This file is the source of truth for ``train.jsonl`` and ``eval.jsonl``
in this directory.  Every pair is hand-written below as a *fact*: one correct
answer in the house style of the SFT demo data (short, names the exact command
or key), several question phrasings, and two plausible-but-wrong answers, each
tagged with the kind of error it makes:

- ``wrong_key``:       a key, flag or subcommand that does not exist in ftl
- ``wrong_default``:   the right key with a wrong default value
- ``other_tool``:      another tool's command or workflow (accelerate, deepspeed, ...)
- ``wrong_behaviour``: a false claim about what ftl does
- ``vague``:           an unhelpful answer that names nothing concrete

Training pairs use the four ``train`` phrasings of each fact, alternating its two
wrong answers, shuffled with a fixed seed.  The held-out split has two parts: a
new phrasing of some training facts (with whichever of its two wrong answers
keeps the eval split's error kinds balanced), and ``HELD_OUT`` topics that
training never asks about.  Wrong answers are written to about the length of
the correct one, so length alone does not separate them.

Rows are conversational (TRL's preference format)::

    {"prompt": [{"role": "user", "content": Q}],
     "chosen": [{"role": "assistant", "content": GOOD}],
     "rejected": [{"role": "assistant", "content": BAD}]}

``--plain`` writes the same pairs as plain strings
(``{"prompt": Q, "chosen": GOOD, "rejected": BAD}``) to
``train_plain.jsonl`` and ``eval_plain.jsonl`` instead.

Run:  python make_preference_data.py [--plain] [--out DIR] [--samples] [--sft-eval JSONL]
It rewrites the files and fails if any check fails: schema, chosen != rejected,
no eval prompt equal to (or with a difflib ratio > 0.8 to) a training prompt,
held-out topics absent from training, mean lengths of chosen and rejected
within 15% of each other (and every pair's within 0.85-1.2).  ``--sft-eval``
also fails on a prompt that near-copies a question of a held-out SFT file.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import statistics
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20250101

KEY = "wrong_key"
DEFAULT = "wrong_default"
TOOL = "other_tool"
BEHAVIOUR = "wrong_behaviour"
VAGUE = "vague"
KINDS = (KEY, DEFAULT, TOOL, BEHAVIOUR, VAGUE)

Rejected = tuple[str, str]  # (kind, text)

# Each fact: (chosen answer, [4 training questions], [2 rejected answers], eval question or None)
FACTS: list[tuple[str, list[str], list[Rejected], str | None]] = [
    # ------------------------------------------------------------------ basics
    (
        "ftl is a launcher for fine-tuning LLMs on your own data: full fine-tuning sharded with DeepSpeed ZeRO "
        "or FSDP2, or LoRA/QLoRA, on one process, torchrun or SLURM, driven by Hydra configs.",
        [
            "What is ftl?",
            "What does the ftl tool do?",
            "Describe ftl in a sentence or two.",
            "What kind of software is ftl?",
        ],
        [
            (
                BEHAVIOUR,
                "ftl is a hosted fine-tuning service: you upload your dataset with `ftl train`, it trains on "
                "ftl's own cloud GPUs and sends back a Hugging Face model by email when the job is done.",
            ),
            (
                VAGUE,
                "ftl is a tool that helps with machine learning workflows in general. It can do many things "
                "around models and training, and how you use it depends a lot on what you want to achieve with it.",
            ),
        ],
        "A teammate mentioned ftl. What is it for?",
    ),
    (
        "`ftl train`, `ftl plan`, `ftl recipes`, `ftl preprocess`, `ftl eval`, `ftl export`, `ftl generate`, "
        "`ftl chat` and `ftl sweep`. Run `ftl --help` to see each with one line.",
        [
            "Which subcommands does the ftl CLI have?",
            "List the ftl commands.",
            "What can I run after typing ftl?",
            "What are all the ftl verbs?",
        ],
        [
            (
                KEY,
                "`ftl run`, `ftl dryrun`, `ftl list`, `ftl tokenize`, `ftl evaluate`, `ftl convert`, `ftl infer`, "
                "`ftl talk` and `ftl hpo`. Run `ftl help` to see each with one line.",
            ),
            (
                VAGUE,
                "ftl has a number of subcommands covering the usual steps of a fine-tuning workflow. Which ones "
                "you need depends on your project; the help output will tell you more about each.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl train recipe=demo`. Add `key=value` overrides on the same line, e.g. "
        "`ftl train recipe=demo train.lr=1e-4`.",
        [
            "How do I start training with ftl?",
            "What's the command to launch a fine-tuning run?",
            "How do I kick off a job with a recipe?",
            "What do I type to train the demo?",
        ],
        [
            (
                TOOL,
                "Run `accelerate launch train.py --config_file recipes/demo.yaml`. ftl only provides the configs; "
                "accelerate starts training.",
            ),
            (
                KEY,
                "Run `ftl train --recipe demo --lr 1e-4`. Every config value is passed as its own double-dash "
                "flag on the same line.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl plan` with the same overrides, e.g. `ftl plan recipe=demo`. It validates the config, prints the "
        "batch arithmetic, a memory estimate and the exact launch command, and launches nothing.",
        [
            "Is there a dry run in ftl?",
            "How do I check what a run would do before launching it?",
            "What does ftl plan do?",
            "How can I validate my overrides without training?",
        ],
        [
            (
                KEY,
                "Add `--dry-run` to the train command, e.g. `ftl train recipe=demo --dry-run`. It validates the "
                "config, prints a memory estimate and the exact launch command, and then starts nothing.",
            ),
            (
                BEHAVIOUR,
                "Run `ftl plan recipe=demo`. It runs ten real training steps on one GPU to measure memory "
                "and speed, then prints the launch command and deletes the temporary run directory it used for that.",
            ),
        ],
        None,
    ),
    (
        "Yes. `ftl plan` imports no torch, transformers, deepspeed or peft, so it takes about 0.3 s on a login "
        "node without a GPU. With `launch=slurm` it also prints the SLURM script.",
        [
            "Can I run ftl plan on a login node?",
            "Does ftl plan need a GPU?",
            "Does ftl plan import torch?",
            "Is ftl plan fast enough to use on the head node?",
        ],
        [
            (
                BEHAVIOUR,
                "No. `ftl plan` imports torch and DeepSpeed and initialises CUDA to measure memory, so run "
                "it inside an interactive GPU allocation (`salloc`), never on the login node itself.",
            ),
            (
                VAGUE,
                "It depends on your cluster's policies. Some sites allow light tools on login nodes and others "
                "don't, so check with your administrators first before running anything there.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl recipes` (`-v` adds each recipe's command). The shipped ones are demo, tiny, "
        "llama3-8b-full-zero3, llama3-70b-full-zero3-multinode, mistral-7b-lora and qwen2.5-7b-qlora.",
        [
            "How do I list the recipes?",
            "Which recipes ship with ftl?",
            "What experiment presets are available?",
            "Show me the names of the bundled recipes.",
        ],
        [
            (
                KEY,
                "Run `ftl list --recipes` (`--all` adds each recipe's command). The shipped ones are demo, tiny, "
                "llama3-8b-full-zero3, llama3-70b-full-zero3-multinode, mistral-7b-lora and qwen2.5-7b-qlora.",
            ),
            (
                BEHAVIOUR,
                "Recipes are not shipped with ftl; they are downloaded from the ftl recipe hub on first use, "
                "so run `ftl train recipe=NAME` online once and it is then saved to `~/.ftl/recipes`.",
            ),
        ],
        None,
    ),
    (
        "Use Hydra overrides after the subcommand: `group=option` (`strategy=fsdp`), `key=value` "
        "(`train.micro_batch_size=4`), `+key=value` to add a key and `~key` to drop one back to its default.",
        [
            "How do I override config values on the command line?",
            "What is the override syntax in ftl?",
            "How do I add a key that is not in the config?",
            "How do I reset a key to its default from the CLI?",
        ],
        [
            (
                KEY,
                "Use `--set key=value` once per change, e.g. `ftl train recipe=demo --set train.micro_batch_size=4 "
                "--set strategy=fsdp`; words without `--set` in front are ignored, and `--unset key` drops one.",
            ),
            (
                TOOL,
                "Edit a copy of the YAML and pass it with `--config_file`, as in `accelerate launch --config_file "
                "my.yaml`; ftl does not accept command-line overrides, so every change goes in a file.",
            ),
        ],
        "Explain how command-line overrides are written, including adding and removing keys.",
    ),
    (
        "ftl validates the whole config first and reports every problem at once, naming the field, the bad value "
        "and what is allowed (with did-you-mean hints), then exits 2 before anything is launched.",
        [
            "What happens if I mistype a config key?",
            "How does ftl report config errors?",
            "Does ftl show all config problems or just the first?",
            "What does ftl do with an invalid override?",
        ],
        [
            (
                BEHAVIOUR,
                "ftl stops at the first bad key with a Python traceback, after the processes have started; "
                "fix it and rerun to find the next one. Unknown keys are silently ignored and keep their defaults.",
            ),
            (
                VAGUE,
                "Configuration errors can happen for many reasons and are not always easy to track down. Read "
                "the output carefully, look at your YAML files and overrides, and try again until the problem goes "
                "away.",
            ),
        ],
        None,
    ),
    (
        "`0` success, `2` invalid input (config, data rows, paths; nothing was launched), `1` a failure during the "
        "run. Rerunning after a `1` resumes from the latest checkpoint.",
        [
            "What are ftl's exit codes?",
            "What does exit code 2 mean?",
            "ftl returned 1. What does that indicate?",
            "How do I tell a config error from a training crash by exit status?",
        ],
        [
            (
                BEHAVIOUR,
                "`0` success, `1` invalid input (config or data; nothing was launched), `2` a crash during "
                "training, such as an NCCL timeout or an out-of-memory on one of the GPUs.",
            ),
            (
                VAGUE,
                "Non-zero exit codes mean something failed somewhere. The exact number is not very important; "
                "look at the logs to understand what went wrong, fix it and try again.",
            ),
        ],
        "My script checks ftl's return code. Which values can it see?",
    ),
    # -------------------------------------------------------------- train.*
    (
        "Set `train.lr`, e.g. `ftl train recipe=demo train.lr=1e-4`. The base default is 2e-5; the demo recipe "
        "uses 1e-4.",
        [
            "How do I change the learning rate?",
            "What is the default learning rate?",
            "Which key sets the LR?",
            "How do I lower the learning rate for a run?",
        ],
        [
            (
                KEY,
                "Set `train.learning_rate`, e.g. `ftl train recipe=demo train.learning_rate=1e-4`. The base "
                "default is 2e-5 for all recipes.",
            ),
            (
                DEFAULT,
                "Set `train.lr`, e.g. `ftl train recipe=demo train.lr=1e-4`. The default is 1e-3 for every "
                "recipe, the demo included.",
            ),
        ],
        "I want a smaller optimizer step size. What do I override?",
    ),
    (
        "Set `train.schedule` to `cosine` (default), `linear` or `constant`, e.g. `train.schedule=linear`. The "
        "decay ends at `train.min_lr_ratio` × lr (default 0.1).",
        [
            "Which learning rate schedules are available?",
            "How do I switch to a linear decay?",
            "What is min_lr_ratio?",
            "What LR schedule does ftl use by default?",
        ],
        [
            (
                KEY,
                "Set `train.lr_scheduler_type` to `cosine`, `linear` or `constant`, e.g. "
                "`train.lr_scheduler_type=linear`, and `train.final_lr` for the floor it decays to.",
            ),
            (
                DEFAULT,
                "Set `train.schedule` to `cosine`, `linear` or `constant`. The default is `constant`, and "
                "cosine decays all the way to 0 unless you set `train.min_lr_ratio` yourself.",
            ),
        ],
        None,
    ),
    (
        "Set `train.warmup_steps`, e.g. `ftl train recipe=demo train.warmup_steps=100`. The default is 0; the "
        "demo recipe uses 8.",
        [
            "How do I set learning rate warmup?",
            "Where do I configure warmup steps?",
            "Is there warmup by default?",
            "How do I lengthen the warmup?",
        ],
        [
            (
                KEY,
                "Set `train.warmup_ratio`, e.g. `ftl train recipe=demo train.warmup_ratio=0.1`, the fraction "
                "of all steps spent warming up.",
            ),
            (
                DEFAULT,
                "Set `train.warmup_steps`, e.g. `train.warmup_steps=100`. The default is 500, so short runs "
                "spend most of their steps warming up.",
            ),
        ],
        None,
    ),
    (
        "Set `train.max_steps` (optimizer steps) or `train.epochs`. With the default `train.max_steps=-1` the run "
        "lasts `train.epochs` epochs (1 by default; the demo uses 3).",
        [
            "How do I set how long training runs?",
            "How do I train for a number of epochs?",
            "How do I stop after N steps?",
            "What does max_steps=-1 mean?",
        ],
        [
            (
                KEY,
                "Set `train.num_train_epochs` or `train.total_steps`, e.g. `train.total_steps=500`; the run stops "
                "at whichever limit comes first. Both default to unset, which trains one epoch.",
            ),
            (
                DEFAULT,
                "Set `train.max_steps` or `train.epochs`. `train.max_steps` defaults to 1000, so "
                "`train.epochs` is ignored unless you set `train.max_steps=0`; the demo runs 1000 steps.",
            ),
        ],
        None,
    ),
    (
        "Set `train.micro_batch_size`, the examples per rank in one forward pass, e.g. "
        "`train.micro_batch_size=4`. The default is 1.",
        [
            "How do I change the per-GPU batch size?",
            "What is micro_batch_size?",
            "Which key sets the batch per forward pass?",
            "How big is the per-device batch by default?",
        ],
        [
            (
                KEY,
                "Set `train.per_device_train_batch_size`, the examples per GPU in one forward pass, e.g. "
                "`train.per_device_train_batch_size=4`.",
            ),
            (
                DEFAULT,
                "Set `train.micro_batch_size`, the examples per rank in one forward pass, e.g. "
                "`train.micro_batch_size=4`. The default is 8.",
            ),
        ],
        None,
    ),
    (
        "Set `train.grad_accum`, e.g. `train.grad_accum=8`: gradients of 8 micro-batches are accumulated before "
        "each optimizer step. Under ddp, `no_sync` skips the all-reduce until the last one.",
        [
            "How do I use gradient accumulation?",
            "What does grad_accum do?",
            "How do I accumulate gradients over micro-batches?",
            "Which key sets the accumulation steps?",
        ],
        [
            (
                KEY,
                "Set `train.gradient_accumulation_steps`, e.g. `train.gradient_accumulation_steps=8`: gradients of "
                "8 micro-batches are accumulated before each optimizer step. The default is 1 step.",
            ),
            (
                BEHAVIOUR,
                "Set `train.grad_accum`, e.g. `train.grad_accum=8`. It takes 8 optimizer steps on each batch "
                "instead of one, so training converges faster but uses 8 times the GPU memory per step.",
            ),
        ],
        None,
    ),
    (
        "Global batch = `train.micro_batch_size` × `train.grad_accum` × data-parallel size (the world size), "
        "e.g. 4 × 8 × 16 GPUs = 512. `ftl plan` prints this arithmetic.",
        [
            "How is the global batch size computed?",
            "What effective batch do 4 per GPU, grad_accum 8 and 16 GPUs give?",
            "Does the number of GPUs change the batch size?",
            "What is the formula for the total batch per optimizer step?",
        ],
        [
            (
                BEHAVIOUR,
                "Global batch = `train.micro_batch_size` × `train.grad_accum`; the GPU count does not "
                "matter, since ftl splits each micro-batch across ranks. E.g. 4 × 8 = 32.",
            ),
            (
                KEY,
                "The global batch is what you set in `train.batch_size`; ftl derives `micro_batch_size` and "
                "`grad_accum` from it and the GPU count. `ftl plan` prints the split.",
            ),
        ],
        "Walk me through how ftl arrives at the number of examples per optimizer step.",
    ),
    (
        "Set `train.seq_len`, e.g. `train.seq_len=2048`. The default is 1024 (the demo uses 512); longer examples "
        "are clipped or dropped as `data.truncation` says.",
        [
            "How do I change the maximum sequence length?",
            "What is the default seq_len?",
            "How do I train on longer contexts?",
            "Where is the token length of training examples set?",
        ],
        [
            (
                KEY,
                "Set `data.max_seq_length`, e.g. `data.max_seq_length=2048`. The default is 1024 tokens; longer "
                "examples are always truncated from the left, keeping the end.",
            ),
            (
                DEFAULT,
                "Set `train.seq_len`, e.g. `train.seq_len=2048`. The default is the model's full context "
                "window (4096 for most models), so you rarely need to change it.",
            ),
        ],
        None,
    ),
    (
        "Set `train.precision`: `auto` (default: bf16 where the device has it), `bf16`, `fp16` or `fp32`, e.g. "
        "`train.precision=fp32` on a GPU without bf16.",
        [
            "How do I train in bf16?",
            "Which precisions does ftl support?",
            "What precision does ftl use by default?",
            "How do I force fp32?",
        ],
        [
            (
                DEFAULT,
                "Set `train.precision`: `fp32` (default), `bf16` or `fp16`. ftl never picks bf16 on its own, "
                "so pass `train.precision=bf16` on every run that should use it.",
            ),
            (
                KEY,
                "Set `train.bf16=true` or `train.fp16=true`; with neither set, ftl trains in fp32 on every device, "
                "e.g. `ftl train recipe=demo train.bf16=true`.",
            ),
        ],
        "We train on V100 cards, which have no bf16 support. What numeric format should I pick?",
    ),
    (
        "Set `train.grad_clip`, the max gradient norm, e.g. `train.grad_clip=0.5`. The default is 1.0; "
        "`train.grad_clip=0` disables clipping.",
        [
            "How do I set gradient clipping?",
            "Is gradient clipping on by default?",
            "How do I disable grad clipping?",
            "What does train.grad_clip do?",
        ],
        [
            (
                KEY,
                "Set `train.max_grad_norm`, the max gradient norm, e.g. `train.max_grad_norm=0.5`. Set it to "
                "`null` to disable clipping entirely.",
            ),
            (
                DEFAULT,
                "Set `train.grad_clip`, e.g. `train.grad_clip=0.5`. Clipping is off by default (0), so set it "
                "to 1.0 for the usual behaviour of most trainers.",
            ),
        ],
        None,
    ),
    (
        "Set `train.seed`, e.g. `train.seed=1234`; the default is 42. It is saved in the run's config.yaml, and "
        "checkpoints keep RNG states so a resume continues exactly.",
        [
            "How do I set the random seed?",
            "What seed does ftl use by default?",
            "How do I make a run reproducible?",
            "Is the seed recorded anywhere?",
        ],
        [
            (
                DEFAULT,
                "Set `train.seed`, e.g. `train.seed=1234`. The default is a fresh random seed per run, and it "
                "is not recorded anywhere, so note it yourself if you need to reproduce a run.",
            ),
            (
                KEY,
                "Export `PYTHONHASHSEED=1234` before `ftl train`; ftl takes its seed from that variable and "
                "nothing else, e.g. `PYTHONHASHSEED=1234 ftl train recipe=demo`. It isn't saved.",
            ),
        ],
        None,
    ),
    # ------------------------------------------------------------- strategy
    (
        "Pick one with `strategy=`: `single`, `ddp`, `zero1`, `zero2`, `zero3`, `zero3_offload` (DeepSpeed ZeRO) "
        "or `fsdp` (PyTorch FSDP2), e.g. `strategy=zero3`.",
        [
            "Which strategies does ftl support?",
            "What are the options for strategy=?",
            "How do I shard training across GPUs?",
            "List the distributed engines in ftl.",
        ],
        [
            (
                KEY,
                "Pick one with `strategy=`: `single`, `dp`, `deepspeed_stage_1`, `deepspeed_stage_2`, "
                "`deepspeed_stage_3`, `fsdp1` or `megatron`, e.g. `strategy=deepspeed_stage_3`.",
            ),
            (
                TOOL,
                "Strategies come from `accelerate config`: answer its questions (DeepSpeed or FSDP, stage, "
                "offload) and ftl reads the resulting default_config.yaml on launch.",
            ),
        ],
        "What parallelism and sharding choices does ftl give me?",
    ),
    (
        "`zero1` shards optimizer states, `zero2` also gradients, `zero3` also parameters; `zero3_offload` keeps "
        "params and optimizer in CPU memory. Higher stages save more GPU memory.",
        [
            "What is the difference between zero1, zero2 and zero3?",
            "Which ZeRO stage shards what?",
            "Explain the DeepSpeed stages in ftl.",
            "zero2 or zero3: what changes?",
        ],
        [
            (
                BEHAVIOUR,
                "`zero1` shards parameters, `zero2` adds gradients, `zero3` adds optimizer states; "
                "`zero3_offload` moves the activations to local disk. Higher stages are always faster, too.",
            ),
            (
                VAGUE,
                "The ZeRO stages are different levels of memory optimisation from DeepSpeed. Each one makes its "
                "own trade-offs, so try them all out and keep whichever suits your model best.",
            ),
        ],
        None,
    ),
    (
        "Use `strategy=zero3_offload`: ZeRO-3 with parameters and optimizer states in CPU memory "
        "(DeepSpeedCPUAdam). It fits larger models at the cost of speed.",
        [
            "How do I offload to CPU memory?",
            "What is zero3_offload?",
            "My model doesn't fit even with zero3. What next?",
            "How do I move optimizer states to host RAM?",
        ],
        [
            (
                KEY,
                "Use `strategy=zero3 strategy.cpu_offload=true`: ZeRO-3 with parameters and optimizer states "
                "in CPU memory. It fits larger models at the cost of speed.",
            ),
            (
                TOOL,
                "Run `deepspeed --num_gpus 8 train.py --deepspeed ds_offload.json` with `offload_optimizer` set "
                "in your JSON; ftl cannot offload to CPU memory by itself.",
            ),
        ],
        None,
    ),
    (
        "Use `strategy=fsdp`: PyTorch FSDP2 `fully_shard` per decoder layer. `strategy.hybrid_shard=true` shards "
        "within a node and replicates across nodes.",
        [
            "How do I use FSDP?",
            "Which FSDP version does ftl use?",
            "How do I shard without DeepSpeed?",
            "How do I shard within a node but replicate across nodes?",
        ],
        [
            (
                TOOL,
                "Run `accelerate launch --use_fsdp --fsdp_sharding_strategy FULL_SHARD train.py` instead; ftl's "
                "own strategies only cover the DeepSpeed ZeRO stages.",
            ),
            (
                KEY,
                "Use `strategy=fsdp strategy.sharding_strategy=HYBRID_SHARD` to shard within a node and replicate "
                "across nodes; the default is `FULL_SHARD` over all ranks.",
            ),
        ],
        None,
    ),
    (
        "ftl generates the DeepSpeed JSON from its own config and `ftl plan` prints it. Add keys with "
        "`strategy.extra`; one that contradicts a derived value is an error naming both.",
        [
            "Can I pass my own DeepSpeed config?",
            "How do I add DeepSpeed settings ftl doesn't expose?",
            "Where does the DeepSpeed JSON come from?",
            "What does strategy.extra do?",
        ],
        [
            (
                TOOL,
                "Write your own ds_config.json and pass `--deepspeed ds_config.json` as with the HF Trainer; ftl "
                "uses the file unchanged and ignores its own batch and precision settings.",
            ),
            (
                BEHAVIOUR,
                "Add keys with `strategy.extra`; when one contradicts a value ftl derived, the extra key "
                "silently wins without a warning, so double-check batch sizes and precision yourself.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl plan` with `launch.gpu_mem_gb` set to your GPU's memory (default 80): it estimates memory per "
        "GPU for every strategy and names the cheapest one or micro-batch that fits.",
        [
            "Will my job fit in GPU memory?",
            "How do I estimate memory before launching?",
            "Does ftl have a memory planner?",
            "Which strategy fits my model on 40 GB cards?",
        ],
        [
            (
                KEY,
                "Run `ftl plan` with `launch.gpu_memory=80` (in GB) set for your card: it estimates memory per GPU "
                "for every strategy and names the cheapest one or micro-batch that fits.",
            ),
            (
                BEHAVIOUR,
                "ftl can't predict memory before a run; launch a short job and watch `nvidia-smi`, then "
                "lower the batch until it fits. A job too big for its GPUs simply crashes with CUDA OOM.",
            ),
        ],
        "How can I find out ahead of time whether a model fits on my GPUs?",
    ),
    (
        "Lower `train.micro_batch_size` and raise `train.grad_accum` to keep the batch, or move to a sharding "
        "strategy: `strategy=zero3`, then `strategy=zero3_offload`. Check with `ftl plan` first.",
        [
            "I get CUDA out of memory. What do I do?",
            "How do I fix OOM errors?",
            "How do I reduce GPU memory use?",
            "Training crashes with out of memory. Any advice?",
        ],
        [
            (
                VAGUE,
                "Out-of-memory errors are common when training large models on limited hardware. Try making "
                "things smaller or using bigger GPUs, and keep adjusting the settings until the error disappears.",
            ),
            (
                BEHAVIOUR,
                "Raise `train.grad_accum`: accumulation keeps every micro-batch's activations in memory at "
                "once, so more steps spread the memory out over the step. Switch to `strategy=ddp` as well.",
            ),
        ],
        None,
    ),
    (
        "Under `fsdp` rank 0 reads the weights and the others build on the meta device (`strategy.load_on_rank0`); "
        "under `zero3` each rank loads its own partitions (`strategy.zero3_init`). Both default on.",
        [
            "How does ftl load a 70B model without running out of host RAM?",
            "What does strategy.load_on_rank0 do?",
            "What is strategy.zero3_init?",
            "Does every rank read the full checkpoint?",
        ],
        [
            (
                BEHAVIOUR,
                "Every rank loads the full fp32 model into host memory before sharding, so a 70B model needs "
                "280 GB per rank; add plenty of swap space or start fewer ranks per node than there are GPUs on it.",
            ),
            (
                DEFAULT,
                "Set `strategy.load_on_rank0=true` under fsdp or `strategy.zero3_init=true` under zero3; both "
                "are off by default, so unless you turn them on every rank reads a full fp32 copy of the model.",
            ),
        ],
        None,
    ),
    (
        "Yes. The loss is normalised by the label tokens of the whole step on all ranks, so N ranks with micro "
        "batch b match one process with N·b; a test checks all six engines to 1e-4.",
        [
            "Do ddp, zero3 and fsdp give the same loss?",
            "Will changing the GPU count change my training numbers?",
            "How is the loss normalised across ranks?",
            "Is one process with batch 8 the same as 4 ranks with batch 2?",
        ],
        [
            (
                BEHAVIOUR,
                "No. Each rank averages its own loss, so results shift with the GPU count and the engine; "
                "rescale `train.lr` by the world size whenever you change strategy or node count.",
            ),
            (
                VAGUE,
                "Results can vary a bit between setups because distributed training is complicated and many "
                "factors are involved. Usually it is close enough, but it's hard to say in general.",
            ),
        ],
        None,
    ),
    # ----------------------------------------------------------------- peft
    (
        "Use `peft=lora`, e.g. `ftl train recipe=demo peft=lora`. Defaults: r=16, alpha=32, dropout 0.05, on "
        "every linear layer but the head (`peft.target_modules=[all-linear]`).",
        [
            "How do I train with LoRA?",
            "What are the default LoRA settings?",
            "Which layers does LoRA adapt by default?",
            "How do I switch a recipe to adapters?",
        ],
        [
            (
                DEFAULT,
                "Use `peft=lora`, e.g. `ftl train recipe=demo peft=lora`. Defaults: r=8, alpha=16, dropout "
                "0.1, on the attention projections `q_proj` and `v_proj` only, like most trainers.",
            ),
            (
                KEY,
                "Use `peft.enabled=true peft.type=lora`, e.g. `ftl train recipe=demo peft.enabled=true "
                "peft.type=lora`. Defaults: r=16, alpha=32, dropout 0.05, on every linear layer.",
            ),
        ],
        "Which setting switches a full fine-tune to LoRA, and what rank and alpha does it use?",
    ),
    (
        "Override the `peft` keys: `peft.r`, `peft.alpha`, `peft.dropout`, `peft.target_modules` (e.g. "
        "`[q_proj,v_proj]`) and `peft.modules_to_save`, e.g. `peft=lora peft.r=32 peft.alpha=64`.",
        [
            "How do I change the LoRA rank?",
            "How do I restrict LoRA to the attention projections?",
            "Which LoRA hyperparameters can I set?",
            "How do I set the LoRA alpha?",
        ],
        [
            (
                KEY,
                "Override `peft.rank`, `peft.lora_alpha`, `peft.lora_dropout` and `peft.targets` (e.g. "
                "`[q_proj,v_proj]`), e.g. `peft=lora peft.rank=32 peft.lora_alpha=64`. The base stays frozen.",
            ),
            (
                BEHAVIOUR,
                "LoRA settings are fixed at r=16, alpha=32 and dropout 0.05 in ftl; to change them, edit the "
                "peft library's defaults in your Python environment, or train with `peft=none` instead.",
            ),
        ],
        None,
    ),
    (
        "Use `peft=qlora`, e.g. `ftl train recipe=qwen2.5-7b-qlora`: LoRA adapters on a 4-bit NF4 base. It needs "
        "bitsandbytes: `pip install 'ftl[qlora]'`.",
        [
            "How do I use QLoRA?",
            "How do I fine-tune with a 4-bit base model?",
            "What do I need to install for QLoRA?",
            "Which recipe uses QLoRA?",
        ],
        [
            (
                TOOL,
                "Quantise the model first with llama.cpp's `llama-quantize` to Q4_K_M, then point `model.path` at "
                "the resulting GGUF file and train with `peft=lora`.",
            ),
            (
                DEFAULT,
                "Use `peft=qlora`, e.g. `ftl train recipe=qwen2.5-7b-qlora`: LoRA adapters on an 8-bit base "
                "(int8 by default). It needs no extra packages to install.",
            ),
        ],
        "Memory is tight: can the frozen base be loaded in 4-bit while only the adapters learn?",
    ),
    (
        "Yes. Adapters are added before the engine wraps the model, so `peft=lora` trains under single, ddp, "
        "zero1-3 and fsdp alike, e.g. `peft=lora strategy=fsdp`.",
        [
            "Can I combine LoRA with FSDP?",
            "Does LoRA work with ZeRO-3?",
            "Which strategies support peft=lora?",
            "Can I shard a LoRA run?",
        ],
        [
            (
                BEHAVIOUR,
                "No. LoRA only works with `strategy=single` or `strategy=ddp`; ZeRO-3 and FSDP shard the "
                "base weights, so ftl refuses `peft=lora` with them and exits 2.",
            ),
            (
                VAGUE,
                "LoRA and sharding can sometimes be combined, but it depends on many details of the model, the "
                "engine and the versions installed, so it may or may not work for you.",
            ),
        ],
        "Is LoRA limited to a single GPU in ftl, or can it use the sharding engines?",
    ),
    # --------------------------------------------------------------- launch
    (
        "Set `launch.nproc_per_node`, e.g. `ftl train recipe=demo strategy=zero3 launch.nproc_per_node=8`; ftl "
        "starts `torchrun --standalone` with 8 ranks.",
        [
            "How do I use all 8 GPUs on one machine?",
            "How do I run multi-GPU on a single node?",
            "What is launch.nproc_per_node?",
            "How do I start several ranks locally?",
        ],
        [
            (
                TOOL,
                "Run `accelerate launch --num_processes 8 -m launcher.train recipe=demo`; ftl itself always "
                "starts a single process per machine, whatever the strategy.",
            ),
            (
                KEY,
                "Set `launch.gpus`, e.g. `ftl train recipe=demo strategy=zero3 launch.gpus=8` or "
                "`launch.gpus=[0,1,2,3]`; ftl starts one rank per GPU, on this machine.",
            ),
        ],
        None,
    ),
    (
        "Use `launch=torchrun` with `launch.nnodes`, `launch.node_rank` and `launch.rdzv_endpoint` on every node, "
        "e.g. `launch.nnodes=2 launch.node_rank=0 launch.rdzv_endpoint=node0:29500`.",
        [
            "How do I train across several nodes without SLURM?",
            "How does launch=torchrun work for multiple machines?",
            "What do I set on each node for a multi-node run?",
            "How do I set the rendezvous endpoint?",
        ],
        [
            (
                TOOL,
                "Write a hostfile listing each node and its slots, and run `deepspeed --hostfile hosts.txt "
                "--num_gpus 8 train.py` on the first node; ftl's launcher only handles the GPUs of one machine.",
            ),
            (
                KEY,
                "Use `launch=torchrun` with `launch.num_nodes`, `launch.rank` and `launch.master_addr` set on "
                "every node, e.g. `launch.num_nodes=2 launch.rank=0 launch.master_addr=node0 launch.port=29500`.",
            ),
        ],
        "Without SLURM, what do I run on each of two machines so they train as one job?",
    ),
    (
        "Set `launch.max_restarts`, e.g. `launch=torchrun launch.max_restarts=3` (default 0). Restarted workers "
        "resume from the latest complete checkpoint.",
        [
            "How do I make torchrun restart failed workers?",
            "What does launch.max_restarts do?",
            "Can training recover on its own after a worker crash?",
            "Are elastic restarts supported?",
        ],
        [
            (
                DEFAULT,
                "Set `launch.max_restarts`, e.g. `launch=torchrun launch.max_restarts=3`. The default is "
                "unlimited, so lower it if a bug keeps crashing the workers.",
            ),
            (
                BEHAVIOUR,
                "Set `launch.max_restarts=3`. Restarted workers begin again at step 0 with fresh weights, "
                "since checkpoints are only read by `ftl export`, never by training.",
            ),
        ],
        "A rank crashed halfway through a torchrun job. Can ftl relaunch the workers automatically?",
    ),
    (
        "Yes: `torchrun --nproc_per_node=8 -m launcher.train recipe=X a.b=1`. Every rank composes the same "
        "config from the same overrides.",
        [
            "Can I start ftl with my own torchrun command?",
            "What is the per-rank entry point?",
            "How do I call launcher.train directly?",
            "Can I bypass ftl's launcher?",
        ],
        [
            (
                TOOL,
                "No, use `python -m torch.distributed.launch --nproc_per_node=8 train.py --recipe X`; plain "
                "torchrun can't start ftl's entry point.",
            ),
            (
                BEHAVIOUR,
                "Yes, but only rank 0 reads the overrides; repeat them in `FTL_OVERRIDES` or the other "
                "ranks train with the recipe's defaults.",
            ),
        ],
        None,
    ),
    (
        "Use `launch=slurm`. ftl renders `RUN_DIR/job.sbatch`, submits it with `sbatch` and prints the job id; "
        "set `launch.nodes` and `launch.gpus_per_node`.",
        [
            "How do I run on SLURM?",
            "Does ftl support SLURM clusters?",
            "How do I submit a training job to SLURM?",
            "What does launch=slurm do?",
        ],
        [
            (
                TOOL,
                "Write your own sbatch script that calls `srun accelerate launch train.py` on each node; ftl has "
                "no SLURM support and only runs on the machine you call it from.",
            ),
            (
                BEHAVIOUR,
                "Use `launch=slurm`. ftl opens an `salloc` session and trains in your terminal, so keep the "
                "shell (or a tmux session) open until the job is done.",
            ),
        ],
        "Our cluster is managed by Slurm. How do I send training there?",
    ),
    (
        "Set `launch.partition`, `launch.account` and `launch.time` (default `04:00:00`), e.g. `launch=slurm "
        "launch.partition=gpu launch.account=proj launch.time=24:00:00`.",
        [
            "How do I set the SLURM partition and account?",
            "What is the default SLURM time limit?",
            "How do I request a 24-hour job?",
            "Which keys map to sbatch's partition, account and time?",
        ],
        [
            (
                DEFAULT,
                "Set `launch.partition`, `launch.account` and `launch.time`, e.g. `launch.partition=gpu`. "
                "`launch.time` defaults to the partition's maximum, so you rarely set it.",
            ),
            (
                KEY,
                "Set `launch.sbatch_partition`, `launch.sbatch_account` and `launch.walltime`, e.g. `launch=slurm "
                "launch.sbatch_partition=gpu launch.walltime=24:00:00`; all are required.",
            ),
        ],
        None,
    ),
    (
        "Put them in `launch.setup`, shell lines the job runs before training, e.g. "
        "`\"launch.setup=['module load cuda/12.4','source .venv/bin/activate']\"`. `launch.env` sets variables.",
        [
            "How do I add module loads to the SLURM job?",
            "How do I activate my environment inside the job?",
            "What is launch.setup?",
            "How do I set environment variables for the SLURM job?",
        ],
        [
            (
                BEHAVIOUR,
                "ftl copies your login shell's environment into the job, so run `module load` and activate "
                "your venv before `ftl train` and it carries over; there is no setting for it in the config.",
            ),
            (
                KEY,
                "Put them in `launch.modules` and `launch.pre_commands`, e.g. `launch.modules=[cuda/12.4]`; ftl "
                "prefixes each module entry with `module load` and runs the commands after it.",
            ),
        ],
        None,
    ),
    (
        "SLURM sends USR1 120 s before the end (`launch.signal`); the trainer checkpoints and exits, and the job "
        "requeues itself up to `launch.max_requeues` (3) times, resuming in the same W&B run.",
        [
            "What happens when my SLURM job is preempted?",
            "Does ftl requeue jobs that hit the time limit?",
            "How many times will a job requeue?",
            "What is launch.signal for?",
        ],
        [
            (
                BEHAVIOUR,
                "A preempted job is lost; SLURM kills it without any warning and ftl can't react to it. "
                "Resubmit by hand with `checkpoint.resume=never` so the new job skips the partial checkpoint.",
            ),
            (
                DEFAULT,
                "SLURM sends USR1 shortly before the time limit; the trainer checkpoints and the job requeues "
                "itself with no limit, since `launch.max_requeues` defaults to unlimited (-1) unless you set it.",
            ),
        ],
        "Our partition preempts long jobs. What happens to a run that gets evicted?",
    ),
    (
        "Yes: `sbatch --nodes=2 slurm/train.sbatch recipe=X key=val`. For job arrays use "
        "`run.name='X-${oc.env:SLURM_ARRAY_TASK_ID}'` so each task keeps its own run.",
        [
            "Can I submit ftl with plain sbatch?",
            "How do I run ftl in a SLURM job array?",
            "Is there a ready sbatch script in the repo?",
            "How do I keep array tasks in separate run dirs?",
        ],
        [
            (
                TOOL,
                "Use `submitit` or `sbatch --wrap 'deepspeed train.py'` instead; ftl's sbatch scripts are all "
                "generated at runtime, so the repo has none you could call directly.",
            ),
            (
                VAGUE,
                "Plain sbatch can work in many setups, but it needs some manual scripting that depends heavily "
                "on your cluster's configuration, its modules and its policies.",
            ),
        ],
        None,
    ),
    # ------------------------------------------------------- run dir, resume
    (
        "`config.yaml` (resolved config), `launch.sh` (exact command), `metrics.jsonl`, `checkpoints/step-N/`, "
        "`eval.json`, `wandb/` with `wandb_run_id`, and `loss_curve.png` at the end.",
        [
            "What is in a run directory?",
            "What files does ftl write for a run?",
            "Where is the exact launch command saved?",
            "Is the resolved config saved with the run?",
        ],
        [
            (
                BEHAVIOUR,
                "Only `checkpoints/` and a `train.log`; the resolved config and the launch command are not "
                "saved anywhere, so keep your own notes and shell history if you want to reproduce a run.",
            ),
            (
                VAGUE,
                "The run directory contains the various outputs of training, such as files, logs and other "
                "artefacts. Take a look inside it after a run finishes to see what was written there.",
            ),
        ],
        "List the artefacts a finished run leaves on disk.",
    ),
    (
        "`run.dir` defaults to `runs/<run.name>`, and `run.name` to the recipe's name, e.g. "
        "`ftl train recipe=demo run.name=lr-test` writes to `runs/lr-test`.",
        [
            "Where are runs saved?",
            "How do I name a run?",
            "How do I change the output directory?",
            "What is the default run.dir?",
        ],
        [
            (
                DEFAULT,
                "`run.dir` defaults to `outputs/<date>/<time>` as in plain Hydra, a new folder per launch, so "
                "every command starts a fresh run; set `run.name` only for W&B.",
            ),
            (
                KEY,
                "Set `run.output_dir` and `run.run_name`, e.g. `ftl train recipe=demo run.run_name=lr-test` writes "
                "to `output/lr-test` next to the recipe file you used.",
            ),
        ],
        "By default where does ftl put a run's outputs, and how do I choose another folder?",
    ),
    (
        "It resumes: the default run dir is stable and `checkpoint.resume=auto` continues from the latest complete "
        "checkpoint. Use a new `run.name` or `checkpoint.resume=never` for a fresh run.",
        [
            "What happens if I run the same train command twice?",
            "How do I start a fresh run instead of resuming?",
            "Does ftl overwrite my previous run?",
            "How do I resume an interrupted run?",
        ],
        [
            (
                BEHAVIOUR,
                "It starts over and overwrites the previous run directory, checkpoints included. Pass "
                "`checkpoint.resume=auto` explicitly on the command line if you want it to continue from the last "
                "checkpoint.",
            ),
            (
                KEY,
                "It resumes from the latest checkpoint. For a fresh run pass `checkpoint.overwrite=true` or the "
                "`--fresh` flag, which wipes the old run directory, checkpoints included, before training.",
            ),
        ],
        None,
    ),
    (
        "Model, optimizer, LR schedule, RNG states and the position in the data: a resumed run continues at the "
        "exact next pack, as if it had never stopped.",
        [
            "What does a resume restore?",
            "Is the optimizer state kept on resume?",
            "Does a resumed run repeat data?",
            "Is resuming exact?",
        ],
        [
            (
                BEHAVIOUR,
                "Only the model weights; the optimizer states and LR schedule restart from scratch, and the "
                "data starts again from the first example of the epoch.",
            ),
            (
                VAGUE,
                "Resuming restores the important parts of the training state. There may be small differences "
                "from an uninterrupted run, depending on the setup.",
            ),
        ],
        None,
    ),
    (
        "Set `checkpoint.every_steps`, e.g. `checkpoint.every_steps=200`. The default 0 saves only at the end "
        "(`checkpoint.save_final=true`); the demo saves every 50 steps.",
        [
            "How often does ftl save checkpoints?",
            "How do I checkpoint every 200 steps?",
            "What is checkpoint.every_steps?",
            "Does ftl checkpoint during training by default?",
        ],
        [
            (
                KEY,
                "Set `checkpoint.save_steps`, e.g. `checkpoint.save_steps=200`. The default 0 saves only once, at "
                "the end of training; the demo recipe saves a checkpoint every 50 steps.",
            ),
            (
                DEFAULT,
                "Set `checkpoint.every_steps`, e.g. `checkpoint.every_steps=200`. The default is every 500 "
                "steps, plus one at the end of training; the demo recipe just uses the default.",
            ),
        ],
        None,
    ),
    (
        "Set `checkpoint.keep`, e.g. `checkpoint.keep=3`: only the newest 3 complete checkpoints are kept and "
        "older ones deleted. The default is 2 (the demo keeps 1).",
        [
            "How do I limit the number of checkpoints kept?",
            "Checkpoints are filling my disk. What do I do?",
            "What is checkpoint.keep?",
            "How many checkpoints does ftl keep by default?",
        ],
        [
            (
                DEFAULT,
                "Set `checkpoint.keep`, e.g. `checkpoint.keep=3`. By default every checkpoint is kept forever, "
                "so old ones pile up on disk until you delete them by hand.",
            ),
            (
                KEY,
                "Set `checkpoint.save_total_limit`, e.g. `checkpoint.save_total_limit=3`: only the newest 3 "
                "checkpoints are kept and older ones deleted. By default all are kept.",
            ),
        ],
        "My disk keeps filling up with step-N folders. How do I prune them automatically?",
    ),
    (
        "Checkpoints are atomic: written to a temp dir, marked complete, then renamed to `checkpoints/step-N/`. A "
        "resume skips an incomplete one and uses the latest complete checkpoint.",
        [
            "The node died while saving. Is my checkpoint broken?",
            "Are checkpoints atomic?",
            "What if the last checkpoint is half-written?",
            "Does resume use a partial checkpoint?",
        ],
        [
            (
                BEHAVIOUR,
                "Checkpoints are written in place into `checkpoints/step-N/`, so a crash mid-save leaves a "
                "corrupt one; delete that folder by hand before rerunning or the resume will fail.",
            ),
            (
                TOOL,
                "Run DeepSpeed's `zero_to_fp32.py` on the damaged checkpoint folder to repair it, then pass the "
                "repaired folder with `checkpoint.resume=PATH` on the next run of the same job.",
            ),
        ],
        None,
    ),
    (
        "Yes. `single`/`ddp` checkpoints load on any number of replicas, `fsdp` DCP shards reshard, and ZeRO "
        "stages 1-3 go through DeepSpeed's universal checkpoint, converted on first use.",
        [
            "Can I resume on a different number of GPUs?",
            "Can a zero3 checkpoint resume on 4 GPUs instead of 8?",
            "Does an FSDP resume reshard?",
            "Is the checkpoint tied to the world size?",
        ],
        [
            (
                BEHAVIOUR,
                "No. Every checkpoint is tied to the world size it was written with; resuming on another GPU "
                "count fails with a shape error, so export it and start a new run from the export.",
            ),
            (
                TOOL,
                "Only after converting it yourself with DeepSpeed's `ds_to_universal.py` script and restarting "
                "under `deepspeed --universal-checkpoint`; ftl itself can't reshard any checkpoint.",
            ),
        ],
        "I trained on 16 GPUs but only have 8 now. Can I continue from the checkpoint?",
    ),
    # ----------------------------------------------------------------- W&B
    (
        "`wandb.mode=auto` (default): online when an API key is configured, else offline, with files in "
        "`RUN_DIR/wandb/`. Other values: `online`, `offline`, `disabled`.",
        [
            "What is the default W&B mode?",
            "Do I need a W&B account to use ftl?",
            "What happens with wandb if I have no API key?",
            "Which wandb modes are there?",
        ],
        [
            (
                DEFAULT,
                "`wandb.mode=online` (default): ftl asks you to log in at startup and won't train without an "
                "API key. Other values: `offline` and `disabled`, set per run.",
            ),
            (
                BEHAVIOUR,
                "ftl uploads runs to its own public W&B project by default with a shared key, so you need no "
                "account of your own; set `wandb.mode=offline` to keep them private.",
            ),
        ],
        "I never set up Weights & Biases credentials. Will logging still work, and where?",
    ),
    (
        "Set `wandb.mode=disabled`, e.g. `ftl train recipe=demo wandb.mode=disabled`. Metrics still go to "
        "`metrics.jsonl` in the run directory.",
        [
            "How do I turn off W&B?",
            "How do I disable wandb?",
            "Can I train without any W&B files?",
            "Which override switches off Weights & Biases?",
        ],
        [
            (
                KEY,
                "Set `wandb.enabled=false`, e.g. `ftl train recipe=demo wandb.enabled=false`. Metrics still go "
                "to `metrics.jsonl` in the run directory.",
            ),
            (
                TOOL,
                "Export `WANDB_DISABLED=true` before training, as with the HF Trainer's `report_to`; ftl has no "
                "setting of its own for turning W&B off.",
            ),
        ],
        None,
    ),
    (
        "Only rank 0 logs to W&B, so a 16-GPU or multi-node run is one W&B run; a requeued SLURM job continues "
        "that run through `wandb_run_id`.",
        [
            "Which rank logs to W&B?",
            "Will I get one W&B run per GPU?",
            "Why is there only one W&B run for my 16-GPU job?",
            "Does a requeued job create a new W&B run?",
        ],
        [
            (
                BEHAVIOUR,
                "Every rank logs its own W&B run, grouped by job id, so a 16-GPU job shows 16 runs in the "
                "project; filter on `rank=0` in the W&B UI.",
            ),
            (
                VAGUE,
                "It depends on how the W&B integration is set up on your cluster. Sometimes you see one run "
                "and sometimes several, so check in the UI.",
            ),
        ],
        None,
    ),
    (
        "No. The W&B API key is only read from the environment; it never appears in the run directory, "
        "config.yaml, logs or printed commands.",
        [
            "Is my W&B API key stored in the run directory?",
            "Is it safe to share a run folder?",
            "Does ftl save my wandb key in config.yaml?",
            "Where does ftl read the W&B key from?",
        ],
        [
            (
                BEHAVIOUR,
                "Yes. ftl writes the API key into `config.yaml` so other ranks and requeued jobs can log "
                "in; remove it before sharing the run directory.",
            ),
            (
                KEY,
                "No, as long as you pass it as `wandb.api_key=...` on the command line; ftl strips that key from "
                "config.yaml before saving the run directory.",
            ),
        ],
        None,
    ),
    (
        "Run `wandb sync RUN_DIR/wandb/offline-run-*` once you have network and an API key; offline runs keep "
        "their files in the run directory.",
        [
            "How do I upload an offline W&B run?",
            "How do I sync wandb files later?",
            "I trained offline. How do I get the run into W&B?",
            "Where are offline W&B files kept?",
        ],
        [
            (
                KEY,
                "Run `ftl sync RUN_DIR` once you have network and a key; it finds the offline W&B files and "
                "uploads them under the same run id, then deletes them.",
            ),
            (
                BEHAVIOUR,
                "Offline runs can't be uploaded later; W&B's offline mode writes only a local summary, so "
                "rerun with `wandb.mode=online` to see curves.",
            ),
        ],
        "My cluster has no internet. How do I get the logged curves into W&B afterwards?",
    ),
    # ---------------------------------------------------------------- data
    (
        "Use `data.format=chat` rows: one JSON object per line with `messages`, a list of turns with `role` and "
        "`content`. They go through the tokenizer's chat template.",
        [
            "What data format does ftl expect for chat?",
            "How should a chat training file look?",
            "Which keys does a chat row need?",
            "Does ftl apply the chat template?",
        ],
        [
            (
                KEY,
                "Use `data.format=chat` rows: one JSON object per line with `dialog`, a list of turns with "
                "`speaker` and `text`. They go through the tokenizer's chat template.",
            ),
            (
                BEHAVIOUR,
                "ftl only reads plain-text files, one training example per line; it does no chat templating "
                "at all, so render the roles and turns into the text yourself first.",
            ),
        ],
        None,
    ),
    (
        "Set `data.format=instruction` for rows with `instruction`, `input` and `output`: instruction and input "
        "become the user turn, output the assistant turn. Without a chat template `alpaca` is used.",
        [
            "Can ftl read Alpaca-style data?",
            "How do I train on instruction/input/output rows?",
            "What does data.format=instruction do?",
            "How are instruction rows rendered?",
        ],
        [
            (
                KEY,
                "Set `data.format=alpaca` for rows with `prompt`, `context` and `response`: prompt and context "
                "become the user turn, the response the assistant turn. The `chatml` template is always used.",
            ),
            (
                BEHAVIOUR,
                "Alpaca rows aren't supported by any `data.format`; convert them to chat rows with a script "
                "of your own first. ftl would otherwise train on the instruction text too, as it has no loss masking.",
            ),
        ],
        None,
    ),
    (
        "Set `data.train_files` and `data.eval_files`: JSONL, JSON lists, Parquet, CSV or folders of them, e.g. "
        "`ftl train data=chat_files 'data.train_files=[/data/train.jsonl]'`.",
        [
            "How do I use my own dataset?",
            "Which file types can ftl read?",
            "How do I point ftl at my training files?",
            "Can ftl read Parquet or CSV?",
        ],
        [
            (
                KEY,
                "Set `data.train_path` and `data.validation_path`; only JSONL files are accepted (convert Parquet "
                "or CSV first), e.g. `ftl train data.train_path=/data/train.jsonl`. Folders are not.",
            ),
            (
                TOOL,
                "Upload your data with `huggingface-cli upload` to a private dataset and set "
                "`data.dataset_name=ORG/NAME`; ftl only reads training data from the hub, never local files.",
            ),
        ],
        None,
    ),
    (
        "Use `data.sources`, a list of `{path, format, weight, split}`: `weight` is passes per epoch (2 repeats a "
        "source, 0.5 takes a fixed seeded half) and `split` is `train` or `eval`.",
        [
            "How do I mix several datasets?",
            "What does weight mean in data.sources?",
            "How do I upsample one source?",
            "How do I combine chat and instruction data?",
        ],
        [
            (
                BEHAVIOUR,
                "Use `data.sources` with `weight` as a sampling probability: weights are normalised to sum "
                "to 1, and each batch draws its source at random by them, so epochs no longer have a fixed length.",
            ),
            (
                KEY,
                "Use `data.mixture`, a list of `{file, ratio}` whose ratios must sum to exactly 1.0, e.g. "
                "`'data.mixture=[{file: a.jsonl, ratio: 0.7}, {file: b.jsonl, ratio: 0.3}]'`; weights don't exist.",
            ),
        ],
        None,
    ),
    (
        "Set `data.eval_fraction`, e.g. `data.eval_fraction=0.05`: a seeded held-out split carved from the "
        "training data when there are no eval files (`data=chat_files` uses 0.05; at most 0.5).",
        [
            "I have no eval file. Can ftl hold out part of the data?",
            "What does data.eval_fraction do?",
            "How do I carve a validation split?",
            "Is part of my training data held out by default?",
        ],
        [
            (
                DEFAULT,
                "Set `data.eval_fraction`, e.g. `data.eval_fraction=0.05`. The default is 0.2 for every data "
                "config, so a fifth of your training data is held out even when you also give eval files.",
            ),
            (
                KEY,
                "Set `data.validation_split_percentage=5`: 5% of the training rows become the eval set, drawn at "
                "random again on every run, so the eval numbers of two runs are never comparable.",
            ),
        ],
        None,
    ),
    (
        "`data.assistant_only_loss=true` (default): labels are -100 everywhere but the assistant turns and the "
        "end-of-turn token after each, so prompts aren't trained.",
        [
            "Does ftl train on the user turns?",
            "What is assistant_only_loss?",
            "How are prompt tokens masked?",
            "Are system messages part of the loss?",
        ],
        [
            (
                DEFAULT,
                "`data.assistant_only_loss` defaults to false: every token, system and user turns included, is "
                "trained on unless you set `data.assistant_only_loss=true` yourself.",
            ),
            (
                KEY,
                "Set `data.train_on_inputs=false` to mask the prompt tokens with -100; by default ftl trains on "
                "the user, system and assistant tokens alike, in every format.",
            ),
        ],
        None,
    ),
    (
        "Examples longer than `train.seq_len` are clipped (`data.truncation=clip`, default) or left out "
        "(`data.truncation=drop`); both are counted, and `ftl preprocess` reports them.",
        [
            "What happens to examples longer than seq_len?",
            "How do I drop overly long examples?",
            "Does ftl truncate long conversations?",
            "What is data.truncation?",
        ],
        [
            (
                BEHAVIOUR,
                "Examples longer than `train.seq_len` are split into several `seq_len` chunks, each trained "
                "as its own example, so nothing is ever clipped or dropped and no data is lost.",
            ),
            (
                DEFAULT,
                "Examples longer than `train.seq_len` are dropped by default (`data.truncation=drop`) and "
                "counted; set `data.truncation=clip` to keep their beginning instead of losing them.",
            ),
        ],
        None,
    ),
    (
        "ftl stops with exit 2, naming the file and row (missing field, empty conversation, unknown role, invalid "
        "JSON or UTF-8). `data.on_error=skip` skips and counts such rows.",
        [
            "What happens if my data has a malformed row?",
            "How do I skip bad rows?",
            "What does data.on_error do?",
            "ftl stopped on a broken JSONL line. Can I ignore it?",
        ],
        [
            (
                DEFAULT,
                "Bad rows are skipped silently by default (`data.on_error=skip`) and are not counted anywhere; "
                "set `data.on_error=raise` to make ftl stop at the first one with exit 2.",
            ),
            (
                BEHAVIOUR,
                "ftl repairs bad rows as it reads them: missing roles become `user`, invalid UTF-8 is "
                "replaced, and empty conversations get a placeholder turn, so training never stops on data.",
            ),
        ],
        "One line of my dataset isn't valid JSON. What will ftl do?",
    ),
    (
        "Set `data.packing=true` (default false; the demo turns it on): examples are packed into `train.seq_len` "
        "sequences, position ids restart per example and attention never crosses examples.",
        [
            "How do I enable sequence packing?",
            "Does packing let examples attend to each other?",
            "What does data.packing do?",
            "Is packing on by default?",
        ],
        [
            (
                BEHAVIOUR,
                "Set `data.packing=true` (default true): examples are concatenated into `train.seq_len` "
                "sequences and attend to each other, which slightly changes the loss but saves a lot of padding.",
            ),
            (
                KEY,
                "Set `data.group_by_length=true` (it is off by default): examples are packed into `train.seq_len` "
                "sequences, position ids restart per example and attention never crosses examples.",
            ),
        ],
        None,
    ),
    (
        "Tokenized data is cached as Arrow under `$FTL_CACHE/data/<key>` (`~/.cache/ftl` by default), keyed by "
        "file contents, tokenizer, templates, seq_len and packing; any change rebuilds it.",
        [
            "Does ftl cache tokenized data?",
            "Where is the data cache?",
            "What is FTL_CACHE?",
            "When is the tokenized cache rebuilt?",
        ],
        [
            (
                BEHAVIOUR,
                "ftl tokenizes the data again at the start of every run and keeps nothing on disk; the cache "
                "setting only affects where the model weights are downloaded to, not the data itself.",
            ),
            (
                DEFAULT,
                "Tokenized data is cached as Arrow under `/tmp/ftl-cache` by default, keyed by the file name "
                "only, so after editing a file you must rename it or delete the cache to force a rebuild.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl preprocess` with your training overrides, e.g. `ftl preprocess recipe=tiny data.packing=true`: "
        "it builds the data cache alone and prints examples, packs, tokens and packing efficiency.",
        [
            "What does ftl preprocess do?",
            "How do I tokenize data ahead of training?",
            "How do I see packing efficiency?",
            "Can I build the data cache without training?",
        ],
        [
            (
                KEY,
                "Run `ftl tokenize --dataset PATH --out DIR` before training, then pass `data.tokenized_dir=DIR` "
                "to `ftl train` so it reads the prepared shards instead of tokenizing again; it prints token counts.",
            ),
            (
                BEHAVIOUR,
                "Run `ftl preprocess recipe=tiny`: it writes a cleaned, deduplicated copy of your dataset to "
                "`data/clean/`, but training still tokenizes everything from scratch at the start of each run.",
            ),
        ],
        None,
    ),
    # ------------------------------------------------ eval, export, generate
    (
        "Run `ftl eval runs/demo --baseline`: held-out perplexity, BLEU and ROUGE-1/2/L for the fine-tuned model "
        "and its base side by side, saved to `eval.json`.",
        [
            "How do I evaluate my fine-tuned model?",
            "What metrics does ftl eval compute?",
            "How do I compare the base and fine-tuned models?",
            "What does --baseline do?",
        ],
        [
            (
                TOOL,
                "Run `lm_eval --model hf --model_args pretrained=runs/demo --tasks hellaswag` from "
                "lm-evaluation-harness; ftl has no evaluation command of its own.",
            ),
            (
                BEHAVIOUR,
                "Run `ftl eval runs/demo --baseline`: it scores the training set again, since ftl keeps no "
                "held-out split, and prints next-token accuracy only, base and fine-tuned.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl export runs/demo`. It consolidates any engine's checkpoint on CPU, with no GPU or process group, "
        "into a `save_pretrained` directory that plain transformers loads.",
        [
            "How do I export a checkpoint?",
            "How do I get a Hugging Face model out of my run?",
            "Does export need GPUs?",
            "How do I convert ZeRO-3 shards to safetensors?",
        ],
        [
            (
                TOOL,
                "Run DeepSpeed's `zero_to_fp32.py` in the checkpoint folder, then load the state dict and call "
                "`save_pretrained()` yourself; ftl has no export command of its own for this.",
            ),
            (
                BEHAVIOUR,
                "Run `ftl export runs/demo` on as many GPUs as training used, e.g. under `torchrun`; it "
                "needs the original process group to gather the shards, so it won't run on a CPU-only machine.",
            ),
        ],
        "My ZeRO-3 shards are useless to AutoModel.from_pretrained. How do I get a normal model folder?",
    ),
    (
        "`ftl export RUN --out DIR --max-shard-size 2GB --dtype bf16`: the output defaults to `RUN/export/step-N`, "
        "the shard size to 2GB and the dtype to `auto` (as trained).",
        [
            "Where does ftl export write by default?",
            "How do I change the safetensors shard size?",
            "How do I export in bf16?",
            "What options does ftl export take?",
        ],
        [
            (
                DEFAULT,
                "`ftl export RUN --out DIR --max-shard-size 2GB --dtype bf16`: the output defaults to "
                "`./exported` in the current folder, the shard size to 10GB and the dtype to fp32.",
            ),
            (
                KEY,
                "`ftl export RUN --output-dir DIR --shard-size 2GB --torch-dtype bf16`; without `--shard-size` it "
                "writes a single unsharded safetensors file into the run directory.",
            ),
        ],
        None,
    ),
    (
        "Run `ftl export runs/demo merge_lora=true` (or `--merge-lora`): the adapter is merged into the base "
        "weights and a plain Hugging Face directory is written.",
        [
            "How do I merge LoRA adapters into the base model?",
            "What does merge_lora do?",
            "How do I export a LoRA run as a full model?",
            "Can ftl export merge a QLoRA adapter?",
        ],
        [
            (
                TOOL,
                "Load the adapter with `PeftModel.from_pretrained` in your own script and call "
                "`merge_and_unload()`, then `save_pretrained()`; `ftl export` can't merge adapters.",
            ),
            (
                KEY,
                "Run `ftl export runs/demo --merge-adapters` (or set `peft.merge=true`): the adapter is merged "
                "into the base weights and a plain HF directory is written.",
            ),
        ],
        "I need a single model folder with the LoRA deltas folded into the weights. Which command?",
    ),
    (
        "Run `ftl generate runs/demo 'How do I resume a run?'`: it applies the chat template and streams the "
        "reply, greedy by default; `--temperature`, `--top-p`, `--max-new-tokens` (256) change it.",
        [
            "How do I generate text with my model?",
            "What does ftl generate do?",
            "Is generation greedy by default?",
            "How do I try my fine-tuned model on one prompt?",
        ],
        [
            (
                DEFAULT,
                "Run `ftl generate runs/demo 'How do I resume a run?'`: it applies the chat template and "
                "samples with temperature 0.7 and top-p 0.9 by default, stopping after 64 new tokens of output.",
            ),
            (
                TOOL,
                "Start a server with `vllm serve runs/demo` and query its OpenAI-style endpoint with curl; ftl "
                "can train and export a model, but it has no command of its own that generates text from it.",
            ),
        ],
        None,
    ),
    # ---------------------------------------------------------------- sweeps
    (
        "Use Hydra's multirun: `ftl train -m recipe=tiny train.lr=1e-3,3e-3` starts one run per value (every "
        "combination for several keys) and ends with a table.",
        [
            "How do I try several learning rates in one command?",
            "What does ftl train -m do?",
            "How do I run a grid of values?",
            "Can I sweep a parameter without W&B?",
        ],
        [
            (
                TOOL,
                "Write a bash loop around `accelerate launch train.py --learning_rate $lr`, one value per "
                "iteration, and compare the logs; ftl only starts one run per command.",
            ),
            (
                KEY,
                "Use `ftl train --grid recipe=tiny 'train.lr=[1e-3,3e-3]'`; values in square brackets are expanded "
                "into one run each, and a table is printed at the end.",
            ),
        ],
        None,
    ),
    (
        "`ftl sweep create lr` writes the W&B sweep config (and creates the sweep with an API key); "
        "`ftl sweep agent ENTITY/PROJECT/ID count=4` then runs 4 trials, locally or as SLURM jobs.",
        [
            "How do I run a W&B sweep with ftl?",
            "What does ftl sweep agent do?",
            "How do I create a sweep?",
            "Can sweep trials run as SLURM jobs?",
        ],
        [
            (
                TOOL,
                "Run `wandb sweep sweep.yaml` and then `wandb agent ID`, with `program: train.py` and "
                "`--learning_rate` style arguments in the spec; ftl has no integration with W&B sweeps at all.",
            ),
            (
                BEHAVIOUR,
                "`ftl sweep create lr` starts every trial of the sweep at once on the current node, one per "
                "GPU; there is no agent and no SLURM support, and results are only printed to the terminal.",
            ),
        ],
        None,
    ),
    # ------------------------------------------------------- demo and tests
    (
        "Run `make demo`: it creates `.venv`, installs, evaluates SmolLM2-135M-Instruct on held-out questions, "
        "fine-tunes it on ftl's support Q&A and prints a before/after table.",
        [
            "How do I run the demo?",
            "What does make demo do?",
            "How can I try ftl quickly?",
            "Does the demo need a GPU or network?",
        ],
        [
            (
                BEHAVIOUR,
                "Run `make demo`: it downloads Llama 3 8B from the Hugging Face Hub and fine-tunes it with "
                "LoRA, so you need network access, a hub token and a GPU with at least 24 GB.",
            ),
            (
                TOOL,
                "Run `pip install ftl` and then `ftl demo`; that subcommand downloads a sample dataset and a "
                "small model from the Hugging Face Hub and trains on them for a few minutes.",
            ),
        ],
        "I'd like a short, self-contained run that shows ftl doing its job. What should I type?",
    ),
    (
        "Run `make test`: the whole suite on CPU, starting nothing on the network. `make test-fast` leaves out the "
        "slow SmolLM2 tests; `gpu`-marked tests skip visibly without a GPU.",
        [
            "How do I run the tests?",
            "Do the tests need a GPU?",
            "How do I skip the slow tests?",
            "What does make test do?",
        ],
        [
            (
                BEHAVIOUR,
                "Run `make test`: it needs at least two CUDA GPUs and network access, since the tests "
                "download models from the hub and start NCCL process groups; without them it fails.",
            ),
            (
                TOOL,
                "Run `tox -e py312` or `python setup.py test` from the repository root; there is no make target "
                "for the test suite, and no way to leave out the slow or the GPU-only tests.",
            ),
        ],
        None,
    ),
    (
        "Use the `model` group: `smollm2-135m`, `tiny-llama`, `llama3-8b`, `llama3-70b`, `mistral-7b` or "
        "`qwen2.5-7b`, e.g. `ftl train recipe=mistral-7b-lora model=qwen2.5-7b`.",
        [
            "How do I change the base model?",
            "Which models are configured?",
            "What options does the model group have?",
            "How do I train Qwen instead of Mistral?",
        ],
        [
            (
                KEY,
                "Pass `--model_name_or_path ORG/NAME`, e.g. `ftl train recipe=mistral-7b-lora --model_name_or_path "
                "Qwen/Qwen2.5-7B`; any hub id works and is downloaded on first use.",
            ),
            (
                BEHAVIOUR,
                "The model is fixed by the recipe and cannot be overridden from the command line; copy the "
                "recipe file into `recipes/` and edit its model line to try a different one.",
            ),
        ],
        None,
    ),
]

# Topics the training split never asks about: (chosen, eval question, rejected).
HELD_OUT: list[tuple[str, str, Rejected]] = [
    (
        "Run `ftl train --cfg job recipe=demo`. It prints the composed config, as Hydra's `--cfg job` does, and "
        "exits without training.",
        "How can I see the fully merged config of a recipe without starting training?",
        (
            BEHAVIOUR,
            "Run `ftl train --cfg job recipe=demo`. It prints the composed config and then trains with "
            "it, so press Ctrl-C if you only wanted to look.",
        ),
    ),
    (
        "They are the same command: `ftl` is the console script and `python -m launcher` runs the same CLI, e.g. "
        "`python -m launcher train recipe=demo`.",
        "Is `python -m launcher` any different from the ftl command?",
        (
            BEHAVIOUR,
            "`python -m launcher` is the old single-GPU entry point; it ignores `launch=` and `strategy=` "
            "and always trains in one process, unlike `ftl`.",
        ),
    ),
    (
        "Set `train.global_batch_size`, e.g. `train.global_batch_size=512`. ftl checks it equals micro × accum × "
        "data-parallel size and, if not, tells you which `grad_accum` gives it.",
        "Can I state the total batch I intend and have ftl verify it?",
        (
            BEHAVIOUR,
            "Set `train.global_batch_size=512` and ftl silently changes `train.micro_batch_size` to match "
            "it, even if the new micro batch no longer fits in GPU memory; nothing is printed.",
        ),
    ),
    (
        "Set `strategy.activation_checkpointing=true`, e.g. `ftl train recipe=demo "
        "strategy.activation_checkpointing=true`. `zero3_offload` turns it on by default.",
        "How do I trade compute for activation memory by recomputing in the backward pass?",
        (
            KEY,
            "Set `train.gradient_checkpointing=true`, e.g. `ftl train recipe=demo "
            "train.gradient_checkpointing=true`. It is off for every strategy, offload included.",
        ),
    ),
    (
        "Set `launch.local_addr=ADDR` on each node so peers reach it by address, and `launch.socket_ifname=IFACE` "
        "to choose the network interface for gloo and NCCL.",
        "My nodes can't resolve each other's hostnames, only IPs. How do I configure that?",
        (
            KEY,
            "Set `launch.hostname=ADDR` on each node and export `MASTER_IFACE=IFACE` before starting; ftl hands "
            "both to NCCL as the bind address and network interface.",
        ),
    ),
    (
        "Set `launch.dist_timeout_s`, the process-group timeout; the default is 600 s, so a dead rank never hangs "
        "the others for long.",
        "How long do healthy ranks wait on a collective if a peer has died, and can I change it?",
        (
            DEFAULT,
            "Set `launch.dist_timeout_s`; the default is 0, no timeout, so a dead rank leaves the others "
            "waiting until the job's time limit.",
        ),
    ),
    (
        "Each node logs to `RUN_DIR/logs/node-N.log`; the job script is `RUN_DIR/job.sbatch`, and the launch "
        "command and metrics sit in the same run directory.",
        "Where do the per-node logs of a multi-node Slurm job end up?",
        (
            BEHAVIOUR,
            "ftl discards node output; only rank 0's lines reach `slurm-<jobid>.out` in your home directory, "
            "and what the other nodes print is lost when the job ends.",
        ),
    ),
    (
        "Set `launch.preprocess_job=true`: `ftl preprocess` runs first as a one-node CPU job filling the data "
        "cache, and training is submitted with `--dependency=afterok` on it.",
        "Can I tokenise the dataset in a separate CPU job so GPU ranks don't wait for it?",
        (
            KEY,
            "Set `launch.prepare_data_first=true`: ftl tokenizes the data on the login node before submitting, "
            "then starts the training job once that has finished successfully.",
        ),
    ),
    (
        "`metrics.jsonl` in the run directory has one line per step: loss, lr, grad norm, real (non-pad) tokens/s "
        "and peak memory; `loss_curve.png` is drawn at the end.",
        "Without W&B, where can I read the per-step loss and throughput?",
        (
            VAGUE,
            "Training produces various metrics that are stored somewhere in the outputs. The exact place "
            "depends on your logging setup, so look around the run folder.",
        ),
    ),
    (
        "Use `data.format=completion`: rows with raw text in `data.text_field` (default `text`), and every token "
        "is trained, with no chat template.",
        "How do I continue pretraining on raw documents rather than conversations?",
        (
            DEFAULT,
            "Use `data.format=completion`: rows with raw text in `data.text_field` (default `content`), and "
            "every token is trained, with no chat template.",
        ),
    ),
    (
        "Yes. ShareGPT rows, `conversations` with `from` (`human`, `gpt`, `system`) and `value`, are read as chat "
        "with no conversion: use `data.format=chat`.",
        "I have data with conversations/from/value fields. Does ftl read it as is?",
        (
            BEHAVIOUR,
            "Not directly. ShareGPT rows must first be converted to `messages` rows with a script of your "
            "own, or ftl stops with an unknown-field error and exit 2.",
        ),
    ),
    (
        "Use `path: hub:ORG/NAME` in `data.sources`; ftl loads it with `datasets.load_dataset`, with `hub_args` "
        "for `split`, `name` and `revision`. It needs network access.",
        "Can I point ftl at a dataset on the Hugging Face Hub instead of local files?",
        (
            KEY,
            "Set `data.hf_dataset=ORG/NAME` and `data.hf_split=train`; ftl fetches it with `huggingface-cli "
            "download` on first use and keeps it under `~/.cache/huggingface`.",
        ),
    ),
    (
        "Run `ftl export runs/demo` without `merge_lora`: the adapter is written with the tokenizer, and "
        "`adapter_config.json`'s `base_model_name_or_path` names the base model.",
        "I only want to ship the adapter weights, not a merged model. How?",
        (
            VAGUE,
            "Adapters can be exported in a few different ways depending on your needs and tools. Pick whichever "
            "approach best matches how you plan to use and share the model later on.",
        ),
    ),
    (
        "Run `ftl chat runs/demo`: one user turn per line of stdin, with the conversation kept between turns; "
        "type `/reset` to clear it and `/exit` to quit.",
        "Can I have a multi-turn conversation with my fine-tuned model from the terminal?",
        (
            KEY,
            "Run `ftl generate runs/demo --interactive`; each line you type is a user turn, `:clear` resets the "
            "conversation and `:quit` leaves the session.",
        ),
    ),
    (
        "Yes: `ftl sweep agent --offline lr count=4` (W&B's search engine, no server) or `ftl sweep optuna lr "
        "count=8` (Optuna TPE, best parameters in `optimization_results.yaml`).",
        "Our cluster is air-gapped. Can I still run a hyperparameter search?",
        (
            TOOL,
            "Use `ftl train -m hydra/sweeper=optuna` with the hydra-optuna-sweeper plugin installed; Hydra's "
            "plugin does the search, as ftl has no offline sweep command of its own.",
        ),
    ),
]


def build() -> tuple[list[dict], list[dict]]:
    """Pairs as records {prompt, chosen, rejected, kind}, train shuffled with SEED."""
    train: list[dict] = []
    eval_: list[dict] = []
    for chosen, eval_q, (kind, bad) in HELD_OUT:
        eval_.append({"prompt": eval_q, "chosen": chosen, "rejected": bad, "kind": kind, "held_out_topic": True})
    eval_kinds = Counter(r["kind"] for r in eval_)
    for chosen, questions, rejected, eval_q in FACTS:
        assert len(questions) == 4, questions
        assert len(rejected) == 2 and rejected[0][0] != rejected[1][0], rejected
        for j, q in enumerate(questions):
            kind, bad = rejected[j % 2]
            train.append({"prompt": q, "chosen": chosen, "rejected": bad, "kind": kind})
        if eval_q is not None:
            # the wrong answer whose kind the eval split has fewest of so far (first on a tie)
            kind, bad = min(rejected, key=lambda kb: eval_kinds[kb[0]])
            eval_kinds[kind] += 1
            eval_.append({"prompt": eval_q, "chosen": chosen, "rejected": bad, "kind": kind, "held_out_topic": False})
    random.Random(SEED).shuffle(train)
    random.Random(SEED + 1).shuffle(eval_)
    return train, eval_


def conversational(rec: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": rec["prompt"]}],
        "chosen": [{"role": "assistant", "content": rec["chosen"]}],
        "rejected": [{"role": "assistant", "content": rec["rejected"]}],
    }


def plain(rec: dict) -> dict:
    return {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}


def validate_row(row: dict, is_plain: bool) -> None:
    assert set(row) == {"prompt", "chosen", "rejected"}, row
    if is_plain:
        for k in ("prompt", "chosen", "rejected"):
            assert isinstance(row[k], str) and row[k].strip(), row
        assert row["chosen"] != row["rejected"], row
        return
    for k, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        msgs = row[k]
        assert isinstance(msgs, list) and len(msgs) == 1, row
        m = msgs[0]
        assert set(m) == {"role", "content"} and m["role"] == role, row
        assert isinstance(m["content"], str) and m["content"].strip(), row
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"], row


def check(train: list[dict], eval_: list[dict], threshold: float = 0.8) -> dict:
    stats: dict = {}
    for name, recs in (("train", train), ("eval", eval_)):
        prompts = [r["prompt"] for r in recs]
        assert len(set(prompts)) == len(prompts), f"duplicate prompt in {name}"
        for r in recs:
            assert r["chosen"].strip().casefold() != r["rejected"].strip().casefold(), r
            assert r["kind"] in KINDS, r
        c = statistics.mean(len(r["chosen"]) for r in recs)
        j = statistics.mean(len(r["rejected"]) for r in recs)
        assert abs(j / c - 1) <= 0.15, (name, c, j)
        ratios = [len(r["rejected"]) / len(r["chosen"]) for r in recs]
        assert 0.85 <= min(ratios) and max(ratios) <= 1.2, (name, min(ratios), max(ratios))
        longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in recs) / len(recs)
        stats[name] = {
            "n": len(recs),
            "chosen_len": c,
            "rejected_len": j,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "chosen_longer": longer,
            "kinds": Counter(r["kind"] for r in recs),
        }
    # No chosen or rejected text is used as a chosen answer for the other side.
    assert not {r["chosen"] for r in train} & {r["rejected"] for r in train}
    # Eval prompts: none equal to, none too similar to, a training prompt.
    train_qs = [r["prompt"] for r in train]
    worst = 0.0
    for r in eval_:
        for tq in train_qs:
            assert r["prompt"] != tq, r["prompt"]
            ratio = difflib.SequenceMatcher(None, r["prompt"].lower(), tq.lower()).ratio()
            assert ratio <= threshold, (r["prompt"], tq, ratio)
            worst = max(worst, ratio)
    # Held-out topics: their correct answer is never taught in training.
    train_chosen = {r["chosen"] for r in train}
    held = [r for r in eval_ if r["held_out_topic"]]
    assert all(r["chosen"] not in train_chosen for r in held)
    stats["max_eval_train_prompt_ratio"] = worst
    stats["eval_held_out_topics"] = len(held)
    return stats


def check_against_sft_eval(recs: list[dict], path: Path, threshold: float = 0.8) -> float:
    """No preference prompt equals, or is a near-copy of, a held-out question of an SFT chat set."""
    sft_qs = [
        m["content"]
        for line in path.open(encoding="utf-8")
        for m in json.loads(line)["messages"]
        if m["role"] == "user"
    ]
    worst = 0.0
    for r in recs:
        for q in sft_qs:
            ratio = difflib.SequenceMatcher(None, r["prompt"].lower(), q.lower()).ratio()
            assert ratio <= threshold, (r["prompt"], q, ratio)
            worst = max(worst, ratio)
    return worst


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def reread(path: Path, is_plain: bool) -> int:
    n = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            validate_row(json.loads(line), is_plain)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--plain",
        action="store_true",
        help="write plain-string rows to {train,eval}_plain.jsonl instead of conversational ones",
    )
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this script's folder)")
    ap.add_argument("--samples", action="store_true", help="print one eval pair per error kind")
    ap.add_argument(
        "--sft-eval",
        type=Path,
        metavar="JSONL",
        help="a held-out SFT chat file (e.g. the demo's eval.jsonl): fail if any preference prompt, "
        "train or eval, is a near-copy of one of its questions",
    )
    args = ap.parse_args()

    train, eval_ = build()
    stats = check(train, eval_)
    if args.sft_eval is not None:
        worst = check_against_sft_eval(train + eval_, args.sft_eval)
        print(f"max prompt difflib ratio against {args.sft_eval.name}: {worst:.3f}")
    fmt = plain if args.plain else conversational
    suffix = "_plain" if args.plain else ""
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("eval", eval_)):
        path = args.out / f"{name}{suffix}.jsonl"
        rows = [fmt(r) for r in recs]
        for row in rows:
            validate_row(row, args.plain)
        write(path, rows)
        assert reread(path, args.plain) == len(rows)
        s = stats[name]
        kinds = ", ".join(f"{k}={s['kinds'][k]}" for k in KINDS)
        print(
            f"{path.name}: {s['n']} pairs | mean chars chosen={s['chosen_len']:.0f} "
            f"rejected={s['rejected_len']:.0f} (ratio {s['rejected_len'] / s['chosen_len']:.3f}; "
            f"per pair {s['ratio_min']:.2f}-{s['ratio_max']:.2f}; chosen longer in {s['chosen_longer']:.0%}) | {kinds}"
        )
    print(
        f"eval: {stats['eval_held_out_topics']} held-out-topic pairs, "
        f"{stats['eval']['n'] - stats['eval_held_out_topics']} new phrasings of trained facts; "
        f"max eval/train prompt difflib ratio {stats['max_eval_train_prompt_ratio']:.3f}"
    )
    if args.samples:
        seen = set()
        for r in eval_ + train:
            if r["kind"] not in seen:
                seen.add(r["kind"])
                print(f"[{r['kind']}] " + json.dumps(fmt(r), ensure_ascii=False))


if __name__ == "__main__":
    main()
