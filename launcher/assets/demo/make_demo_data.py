#!/usr/bin/env python3
"""Deterministic generator for the ftl demo support-Q&A dataset.

This file is the source of truth for ``train.jsonl``, ``eval.jsonl`` and
``eval_paraphrase.jsonl`` in this directory.  Every training conversation is
hand-written below as a *fact*: one canonical answer in the house style (short,
names the exact command or override) plus several question paraphrases.

* ``train.jsonl``: the ``train`` paraphrases of every fact in FACTS.
* ``eval.jsonl`` (the demo's held-out set): HELD_OUT, questions about other
  facts, whose answers training never shows: it measures generalisation.
* ``eval_paraphrase.jsonl``: the ``eval`` paraphrase of some facts, a new
  phrasing of a question whose answer training teaches word for word: it
  measures recall of what was taught.

Run:  python launcher/assets/demo/make_demo_data.py
It rewrites the three files and fails if any held-out question is equal to, or
has a difflib ratio > 0.8 with, any training question, or if any eval.jsonl
answer appears in training.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

SYSTEM = "You are the ftl support assistant. Answer briefly and name the exact command or override."

# Each fact: (answer, [training questions], a held-out paraphrase (eval_paraphrase.jsonl) or None)
FACTS: list[tuple[str, list[str], str | None]] = [
    # ------------------------------------------------------------------ basics
    (
        "ftl is a launcher for fine-tuning LLMs. It runs full fine-tuning sharded over GPUs and nodes "
        "with DeepSpeed ZeRO, FSDP2 or DDP, or parameter-efficient LoRA/QLoRA, all driven by Hydra configs.",
        [
            "What is ftl?",
            "Can you explain what the ftl tool does?",
            "What is ftl used for?",
            "Give me a one-line summary of ftl.",
        ],
        "I just heard about ftl from a colleague. What exactly is it?",
    ),
    (
        "After installing, use the console script `ftl`. Its subcommands are `ftl train`, `ftl plan`, "
        "`ftl recipes`, `ftl export`, `ftl eval`, `ftl generate`, `ftl preprocess` and `ftl sweep`.",
        [
            "Which subcommands does ftl have?",
            "List all the ftl commands.",
            "What commands can I run with the ftl CLI?",
            "How do I call ftl from the shell and what subcommands exist?",
        ],
        None,
    ),
    (
        "Run `ftl train recipe=demo`. Any config value can be changed on the same line with Hydra "
        "overrides, for example `ftl train recipe=demo train.lr=1e-4`.",
        [
            "How do I start a training run?",
            "What is the command to launch fine-tuning with ftl?",
            "How do I kick off a training job?",
            "What do I type to train a model with ftl?",
        ],
        None,
    ),
    (
        "`ftl plan` validates the config, prints the batch arithmetic and the exact launch command, "
        "and launches nothing. Use it like `ftl plan recipe=demo` before `ftl train`.",
        [
            "What does ftl plan do?",
            "Is there a dry run mode in ftl?",
            "How can I check my config without starting training?",
            "How do I validate a config before launching?",
        ],
        "Can I preview what ftl would launch without actually running anything?",
    ),
    (
        "Yes. `ftl plan` does not import torch, so it is fast on login nodes. Run "
        "`ftl plan recipe=llama3-70b-full-zero3-multinode launch=slurm` there before submitting.",
        [
            "Is ftl plan safe to run on a login node?",
            "Does ftl plan need a GPU or torch?",
            "Why is ftl plan so fast?",
            "Can I run ftl plan on the cluster head node?",
        ],
        "Will ftl plan import PyTorch or be slow on the login host?",
    ),
    (
        "Run `ftl recipes`. It lists the bundled recipes: demo, tiny, llama3-8b-full-zero3, "
        "llama3-70b-full-zero3-multinode, mistral-7b-lora and qwen2.5-7b-qlora.",
        [
            "How do I list the available recipes?",
            "Which recipes ship with ftl?",
            "What recipes can I choose from?",
            "Show me the recipe names.",
        ],
        "Where can I see every preset recipe that comes with the launcher?",
    ),
    (
        "A recipe is a ready-made Hydra config that picks the model, data, strategy, peft and launch "
        "groups plus training settings. Select one with `recipe=NAME`, e.g. `ftl train recipe=mistral-7b-lora`.",
        [
            "What is a recipe in ftl?",
            "What does recipe= mean?",
            "How do recipes work?",
            "What does a recipe contain?",
        ],
        None,
    ),
    (
        "Pass Hydra overrides after the subcommand as `key=value`, for example "
        "`ftl train recipe=demo train.lr=1e-4 strategy=zero3`. Run `ftl plan` with the same overrides to check them.",
        [
            "How do I override config values from the command line?",
            "How do I change a setting without editing YAML?",
            "What is the override syntax?",
            "Can I tweak a recipe on the command line?",
        ],
        "What's the syntax for changing a single config field when I launch?",
    ),
    (
        "The config groups are `model`, `data`, `strategy`, `peft` and `launch`. The plain sections are "
        "`train`, `checkpoint`, `eval`, `wandb` and `run`.",
        [
            "What config groups does ftl have?",
            "How is the ftl config organised?",
            "Which Hydra groups and sections exist?",
            "What are the top-level parts of the config?",
        ],
        None,
    ),
    # -------------------------------------------------------------- train.*
    (
        "Set `train.lr`, for example `ftl train recipe=demo train.lr=1e-4`.",
        [
            "How do I change the learning rate?",
            "Where is the learning rate set?",
            "How can I lower the LR?",
            "What is the override for learning rate?",
        ],
        "I want a smaller step size for the optimizer. Which key do I set?",
    ),
    (
        "Set `train.warmup_steps`, for example `ftl train recipe=demo train.warmup_steps=100`.",
        [
            "How do I configure learning rate warmup?",
            "Where do I set warmup steps?",
            "How do I make the warmup longer?",
            "What is the warmup override?",
        ],
        None,
    ),
    (
        "Set `train.max_steps`, for example `ftl train recipe=demo train.max_steps=500`.",
        [
            "How do I set the number of training steps?",
            "How long does training run and how do I change it?",
            "How do I make training stop earlier?",
            "What controls the total step count?",
        ],
        "My run is too long. How do I cut the total number of optimizer steps?",
    ),
    (
        "Set `train.micro_batch_size`, the per-GPU batch for one forward pass, e.g. "
        "`ftl train recipe=demo train.micro_batch_size=4`.",
        [
            "How do I change the per-GPU batch size?",
            "What is micro_batch_size?",
            "How do I set the batch size per device?",
            "Which setting is the batch per forward pass?",
        ],
        None,
    ),
    (
        "Set `train.grad_accum`, e.g. `ftl train recipe=demo train.grad_accum=8`. Gradients from that many "
        "micro-batches are summed before each optimizer step.",
        [
            "How do I use gradient accumulation?",
            "What does grad_accum do?",
            "How can I accumulate gradients over several micro-batches?",
            "Where is gradient accumulation configured?",
        ],
        None,
    ),
    (
        "Global batch = `train.micro_batch_size` × `train.grad_accum` × data-parallel world size. "
        "`ftl plan` prints this arithmetic for your config.",
        [
            "How is the global batch size computed?",
            "What is the formula for global batch size?",
            "How does ftl calculate the effective batch?",
            "What determines the total batch per optimizer step?",
        ],
        "How do micro batch, accumulation and GPU count combine into the real batch size?",
    ),
    (
        "Global batch = micro_batch_size × grad_accum × data-parallel world size, so 4 × 8 × 16 = 512. "
        "Confirm it with `ftl plan`.",
        [
            "With micro_batch_size=4, grad_accum=8 on 16 GPUs, what is the global batch?",
            "What global batch do I get from 4 per GPU, 8 accumulation steps and 16 GPUs?",
            "16 data-parallel ranks, micro batch 4, grad_accum 8: effective batch?",
            "Calculate the global batch for 2 nodes of 8 GPUs, micro batch 4 and accumulation 8.",
        ],
        None,
    ),
    (
        "Raise `train.grad_accum` by the same factor you lose in GPUs, e.g. from 16 to 8 GPUs use "
        "`train.grad_accum=16` instead of 8. Check the result with `ftl plan`.",
        [
            "How do I keep the same global batch on fewer GPUs?",
            "I have half the GPUs now. How do I keep the batch size?",
            "How do I preserve the effective batch when scaling down?",
            "Fewer GPUs available, same global batch: what do I change?",
        ],
        "Moving from 16 to 8 GPUs, how do I avoid shrinking the total batch?",
    ),
    (
        "Set `train.seq_len`, e.g. `ftl train recipe=demo train.seq_len=2048`. Longer sequences need more memory.",
        [
            "How do I change the maximum sequence length?",
            "Where is the context length for training set?",
            "How do I train on longer sequences?",
            "What is the seq_len setting?",
        ],
        None,
    ),
    (
        "Set `train.precision` to `bf16` or `fp32`, e.g. `ftl train recipe=demo train.precision=bf16`. "
        "Use `fp32` on GPUs without bf16 support.",
        [
            "How do I train in bf16?",
            "Which precisions does ftl support?",
            "How do I switch to fp32?",
            "Where is mixed precision configured?",
        ],
        "My old GPU has no bfloat16. What precision setting should I use?",
    ),
    (
        "Set `train.grad_clip`, e.g. `ftl train recipe=demo train.grad_clip=1.0`, to clip the gradient norm.",
        [
            "How do I enable gradient clipping?",
            "Where is the gradient norm clip set?",
            "What does grad_clip do?",
            "How do I change the clipping threshold?",
        ],
        None,
    ),
    (
        "Set `train.seed`, e.g. `ftl train recipe=demo train.seed=1234`. The seed is saved in the run's config.yaml.",
        [
            "How do I set the random seed?",
            "How do I make runs reproducible?",
            "Where is the seed configured?",
            "Can I change the seed for a run?",
        ],
        None,
    ),
    # ------------------------------------------------------------- strategy
    (
        "Pick one with `strategy=`: `zero1`, `zero2`, `zero3`, `zero3_offload` (DeepSpeed ZeRO), `fsdp` "
        "(PyTorch FSDP2), `ddp` or `single`. Example: `ftl train recipe=demo strategy=zero3`.",
        [
            "Which strategies does ftl support?",
            "What distributed strategies are available?",
            "What are the options for strategy=?",
            "How can I shard training across GPUs?",
        ],
        "What sharding and parallelism choices does ftl offer?",
    ),
    (
        "Use `strategy=zero3`, e.g. `ftl train recipe=demo strategy=zero3`. ZeRO-3 shards parameters, "
        "gradients and optimizer states across GPUs.",
        [
            "How do I use DeepSpeed ZeRO-3?",
            "How do I switch to ZeRO stage 3?",
            "What override enables zero3?",
            "How do I shard the model parameters with DeepSpeed?",
        ],
        None,
    ),
    (
        "ZeRO-1 (`strategy=zero1`) shards optimizer states, ZeRO-2 (`strategy=zero2`) also shards gradients, "
        "and ZeRO-3 (`strategy=zero3`) also shards parameters. Higher stages save more memory.",
        [
            "What is the difference between ZeRO stages 1, 2 and 3?",
            "zero1 vs zero2 vs zero3?",
            "Which ZeRO stage shards what?",
            "Explain the DeepSpeed ZeRO stages in ftl.",
        ],
        "How do the three DeepSpeed ZeRO levels differ in what they split?",
    ),
    (
        "Use `strategy=zero3_offload`. It is ZeRO-3 with parameters and optimizer states offloaded to CPU "
        "memory, which fits larger models at the cost of speed.",
        [
            "What is zero3_offload?",
            "How do I offload to CPU memory?",
            "My model does not fit even with zero3. What now?",
            "How do I enable DeepSpeed CPU offload?",
        ],
        "Can ftl push optimizer state into host RAM to save GPU memory?",
    ),
    (
        "Use `strategy=fsdp`, e.g. `ftl train recipe=demo strategy=fsdp`. It uses PyTorch FSDP2 to shard "
        "the model without DeepSpeed.",
        [
            "How do I use FSDP?",
            "Does ftl support PyTorch FSDP?",
            "Which FSDP version does ftl use?",
            "How do I train without DeepSpeed but still shard?",
        ],
        "I prefer native PyTorch sharding over DeepSpeed. What strategy should I pick?",
    ),
    (
        "Use `strategy=ddp`. Every GPU holds a full copy of the model and only data is split, so it suits "
        "small models and LoRA runs.",
        [
            "How do I use plain data parallel?",
            "What does strategy=ddp do?",
            "When should I use DDP?",
            "How do I replicate the model on every GPU?",
        ],
        None,
    ),
    (
        "Use `strategy=single` with `launch=local`, e.g. `ftl train recipe=demo strategy=single`. It runs "
        "one process on one device.",
        [
            "How do I train on a single GPU?",
            "What does strategy=single mean?",
            "How do I run without any distribution?",
            "How do I run on just one device?",
        ],
        "I only have one graphics card. What strategy do I use?",
    ),
    (
        "Lower `train.micro_batch_size` and raise `train.grad_accum`, or move to a sharding strategy: "
        "`strategy=zero3`, then `strategy=zero3_offload`. Check the plan with `ftl plan` first.",
        [
            "I get CUDA out of memory. What should I do?",
            "How do I fix OOM errors?",
            "Training runs out of GPU memory. Any tips?",
            "How can I reduce GPU memory usage?",
        ],
        "My job crashes with an out-of-memory error on the GPU. How do I fix it?",
    ),
    # ----------------------------------------------------------------- peft
    (
        "The `peft` group has three options: `peft=none` (full fine-tuning), `peft=lora` and `peft=qlora`.",
        [
            "What are the peft options?",
            "Does ftl support parameter-efficient fine-tuning?",
            "What values can peft take?",
            "How do I choose between full fine-tuning and adapters?",
        ],
        None,
    ),
    (
        "Use `peft=lora`, e.g. `ftl train recipe=demo peft=lora`, or start from `recipe=mistral-7b-lora`. "
        "Only the low-rank adapters are trained.",
        [
            "How do I train with LoRA?",
            "How do I enable LoRA adapters?",
            "What is the override for LoRA?",
            "Can I fine-tune with LoRA instead of full weights?",
        ],
        "I want to train low-rank adapters only. What do I set?",
    ),
    (
        "Use `peft=qlora`, e.g. `ftl train recipe=qwen2.5-7b-qlora`. QLoRA trains LoRA adapters on top of a "
        "4-bit quantized base model to save memory.",
        [
            "How do I use QLoRA?",
            "What is the difference between lora and qlora?",
            "How do I fine-tune with a 4-bit base model?",
            "Which recipe uses QLoRA?",
        ],
        "Can I train adapters while the base weights are quantized to 4 bits?",
    ),
    (
        "Use `peft=none`, which is full fine-tuning of all weights. Combine it with a sharding strategy such "
        "as `strategy=zero3`, as in `recipe=llama3-8b-full-zero3`.",
        [
            "How do I do full fine-tuning?",
            "How do I turn LoRA off?",
            "What does peft=none mean?",
            "How do I update all model weights?",
        ],
        None,
    ),
    # -------------------------------------------------------------- recipes
    (
        "`recipe=demo` fine-tunes the embedded SmolLM2-135M-Instruct on the bundled ftl support Q&A dataset. "
        "Run it with `make demo` or `ftl train recipe=demo`.",
        [
            "What does the demo recipe do?",
            "What is recipe=demo?",
            "Which model does the demo use?",
            "What data does the demo train on?",
        ],
        None,
    ),
    (
        "Run `make demo`. It fine-tunes the embedded SmolLM2-135M-Instruct on this support dataset without "
        "network access and shows held-out perplexity and ROUGE-L improving.",
        [
            "What does make demo do?",
            "How do I try ftl quickly?",
            "Does the demo need internet access?",
            "How do I run the demo?",
        ],
        "What's the quickest way to see ftl working end to end?",
    ),
    (
        "Run `make test`. It runs the test suite, which uses tiny randomly initialised models like "
        "`recipe=tiny`, so it is fast and needs no network.",
        [
            "How do I run the tests?",
            "What does make test do?",
            "How do I check my ftl install works?",
            "Is there a test suite?",
        ],
        None,
    ),
    (
        "`recipe=tiny` trains a tiny randomly initialised model for smoke tests. Use `ftl train recipe=tiny` "
        "to check a setup in seconds.",
        [
            "What is the tiny recipe for?",
            "Is there a recipe for smoke testing?",
            "What does recipe=tiny train?",
            "How do I do a very fast sanity run?",
        ],
        "Which preset should I use for a quick smoke test of my cluster setup?",
    ),
    (
        "Use `recipe=llama3-8b-full-zero3`. It does full fine-tuning of Llama 3 8B with `strategy=zero3` "
        "and `peft=none`: `ftl train recipe=llama3-8b-full-zero3`.",
        [
            "How do I fully fine-tune Llama 3 8B?",
            "Which recipe is for Llama 3 8B?",
            "What does llama3-8b-full-zero3 do?",
            "Is there a recipe for full Llama 8B training?",
        ],
        None,
    ),
    (
        "Use `recipe=llama3-70b-full-zero3-multinode` with `launch=slurm` or `launch=torchrun`. It is full "
        "fine-tuning of Llama 3 70B with ZeRO-3 across several nodes.",
        [
            "How do I train Llama 3 70B?",
            "Which recipe is for multi-node 70B training?",
            "What does llama3-70b-full-zero3-multinode do?",
            "Can ftl fine-tune a 70B model?",
        ],
        "Which recipe handles the 70-billion-parameter Llama across many machines?",
    ),
    (
        "Use `recipe=mistral-7b-lora`: `ftl train recipe=mistral-7b-lora`. It trains LoRA adapters "
        "(`peft=lora`) on Mistral 7B.",
        [
            "How do I fine-tune Mistral 7B?",
            "Is there a LoRA recipe?",
            "What does mistral-7b-lora do?",
            "Which recipe trains Mistral with adapters?",
        ],
        None,
    ),
    (
        "Use `recipe=qwen2.5-7b-qlora`: `ftl train recipe=qwen2.5-7b-qlora`. It trains QLoRA adapters "
        "(`peft=qlora`) on Qwen2.5 7B.",
        [
            "How do I fine-tune Qwen2.5 7B?",
            "What does qwen2.5-7b-qlora do?",
            "Is there a Qwen recipe?",
            "Which recipe uses Qwen with 4-bit adapters?",
        ],
        "Which bundled preset targets Qwen 2.5 at 7B parameters?",
    ),
    (
        "Pick a model with the `model` group and a dataset with the `data` group, e.g. "
        "`ftl train recipe=mistral-7b-lora model=NAME data=NAME`. Run `ftl plan` to check the composed config.",
        [
            "How do I change the model?",
            "How do I use my own dataset?",
            "Where do I pick the base model and data?",
            "How do I swap the dataset in a recipe?",
        ],
        None,
    ),
    (
        "Use chat-format JSONL: one JSON object per line with a `messages` list of `role`/`content` turns. "
        "Run `ftl preprocess` to tokenize it ahead of training.",
        [
            "What data format does ftl expect?",
            "How should my training file look?",
            "Which format is the dataset in?",
            "Does ftl take chat-formatted data?",
        ],
        None,
    ),
    # ----------------------------------------------------------- subcommands
    (
        "Run `ftl preprocess` with the same `data=` and `model=` as training. It tokenizes and packs the "
        "dataset ahead of time so `ftl train` starts faster.",
        [
            "What does ftl preprocess do?",
            "How do I tokenize my data before training?",
            "Can I prepare the dataset ahead of time?",
            "When should I use ftl preprocess?",
        ],
        None,
    ),
    (
        "Run `ftl export`. It consolidates the sharded checkpoints into a Hugging Face directory with "
        "safetensors weights that loads with transformers.",
        [
            "How do I export a checkpoint?",
            "What does ftl export do?",
            "How do I get a Hugging Face model out of my run?",
            "How do I convert DeepSpeed checkpoints to safetensors?",
        ],
        "How do I turn my sharded training checkpoint into a model I can load with transformers?",
    ),
    (
        "Run `ftl export merge_lora=true`. It merges the LoRA adapters into the base weights and writes a "
        "Hugging Face directory with safetensors.",
        [
            "How do I merge LoRA adapters into the base model?",
            "What does merge_lora do?",
            "How do I export a LoRA run as a full model?",
            "Can ftl export merge adapters?",
        ],
        "After LoRA training, how do I bake the adapters into standalone weights?",
    ),
    (
        "Run `ftl eval`. It reports perplexity, BLEU and ROUGE on the held-out set and writes the results "
        "to eval.json in the run directory.",
        [
            "How do I evaluate a model?",
            "What metrics does ftl eval compute?",
            "What does ftl eval do?",
            "How do I get perplexity for my checkpoint?",
        ],
        "Which command scores my fine-tuned model on held-out data?",
    ),
    (
        "Run `ftl generate` to sample text from a trained checkpoint or exported model, e.g. to check "
        "answers by hand after `ftl train`.",
        [
            "How do I generate text with my model?",
            "What does ftl generate do?",
            "How do I try out my fine-tuned model?",
            "How can I sample outputs from a checkpoint?",
        ],
        None,
    ),
    (
        "Run `ftl sweep`. It launches a series of runs over lists of override values, for example several "
        "`train.lr` values, each in its own run directory.",
        [
            "How do I run a hyperparameter sweep?",
            "What does ftl sweep do?",
            "How do I try several learning rates?",
            "Can ftl launch a grid of runs?",
        ],
        "Is there a built-in way to search over hyperparameters?",
    ),
    # --------------------------------------------------------------- launch
    (
        "`launch=local` runs one process on this machine, or uses torchrun standalone when "
        "`launch.nproc_per_node` is greater than 1.",
        [
            "What does launch=local do?",
            "How do I run on my own machine?",
            "What is the default launcher?",
            "How do I run ftl without a scheduler?",
        ],
        None,
    ),
    (
        "Use `launch=local launch.nproc_per_node=8`. With more than one process ftl starts torchrun "
        "standalone on this machine.",
        [
            "How do I use all 8 GPUs on one machine?",
            "How do I train on several GPUs of a single node?",
            "What is nproc_per_node?",
            "How do I run multi-GPU on one box?",
        ],
        "My workstation has 8 GPUs. How do I make the run use all of them?",
    ),
    (
        "Use `launch=torchrun` and set `launch.nnodes`, `launch.node_rank` and `launch.rdzv_endpoint` "
        "on every node, e.g. `launch.nnodes=2 launch.node_rank=0 launch.rdzv_endpoint=host0:29500`.",
        [
            "How do I run on multiple nodes without SLURM?",
            "How does launch=torchrun work?",
            "What options does the torchrun launcher take?",
            "How do I set up multi-node training by hand?",
        ],
        "I have two servers and no scheduler. How do I train across both?",
    ),
    (
        "Set `launch.rdzv_endpoint` to `host:port` of one node, the same on all nodes, e.g. "
        "`launch=torchrun launch.rdzv_endpoint=node0:29500`.",
        [
            "What is rdzv_endpoint?",
            "How do nodes find each other with torchrun?",
            "Where do I set the rendezvous address?",
            "What should rdzv_endpoint be?",
        ],
        None,
    ),
    (
        "Set `launch.max_restarts`, e.g. `launch=torchrun launch.max_restarts=3`. torchrun restarts failed "
        "workers and training resumes from the latest checkpoint.",
        [
            "How do I make torchrun restart failed workers?",
            "What does max_restarts do?",
            "Can training recover automatically from a worker crash?",
            "How many times will torchrun retry?",
        ],
        "If a worker dies, can the job restart itself? Which option?",
    ),
    (
        "Use `launch=slurm`. ftl renders job.sbatch into the run directory and submits it with sbatch; "
        "set `launch.nodes` and `launch.gpus_per_node`.",
        [
            "How do I run on SLURM?",
            "Does ftl support SLURM clusters?",
            "How do I submit a job to a SLURM cluster?",
            "What does launch=slurm do?",
        ],
        "Our cluster uses the Slurm scheduler. How do I submit training to it?",
    ),
    (
        "Set `launch.nodes` and `launch.gpus_per_node`, e.g. `ftl train recipe=llama3-70b-full-zero3-multinode "
        "launch=slurm launch.nodes=4 launch.gpus_per_node=8`.",
        [
            "How do I choose the number of SLURM nodes?",
            "How many GPUs per node does the SLURM job use?",
            "How do I request 4 nodes with 8 GPUs each?",
            "Where do I set node count for slurm?",
        ],
        "How do I tell the Slurm launcher how many machines and GPUs to grab?",
    ),
    (
        "Set `launch.partition`, `launch.account` and `launch.time`, e.g. `launch=slurm launch.partition=gpu "
        "launch.account=myproj launch.time=24:00:00`.",
        [
            "How do I set the SLURM partition?",
            "Where do I put my SLURM account?",
            "How do I set the job time limit?",
            "Which options map to sbatch partition, account and time?",
        ],
        None,
    ),
    (
        "ftl writes job.sbatch into the run directory. Check it with `ftl plan launch=slurm`, which prints "
        "the launch command without submitting.",
        [
            "Where is the sbatch script?",
            "Can I see the generated job.sbatch?",
            "Where does ftl write the SLURM batch file?",
            "How can I inspect the SLURM script before submitting?",
        ],
        None,
    ),
    (
        "Preemption is handled: SLURM sends SIGUSR1, ftl saves a checkpoint and requeues the job, and it "
        "resumes with `checkpoint.resume=auto` under the same W&B run id.",
        [
            "What happens when my SLURM job is preempted?",
            "Does ftl handle preemption?",
            "How does ftl react to SIGUSR1?",
            "Will a preempted job continue automatically?",
        ],
        "The scheduler kicks my job off before it ends. Do I lose progress?",
    ),
    (
        "Yes. A requeued job keeps the same W&B run id, so the curves continue in one run after preemption.",
        [
            "Does a requeued job get a new W&B run?",
            "After preemption, is the W&B run the same?",
            "Will my wandb curves be split after a requeue?",
            "Does resuming keep the W&B run id?",
        ],
        None,
    ),
    # ------------------------------------------------------------- run dir
    (
        "The run directory holds config.yaml, the launch command, logs, metrics.jsonl, checkpoints, "
        "eval.json, W&B files and loss_curve.png.",
        [
            "What is in the run directory?",
            "What files does a run produce?",
            "What does ftl write to disk during a run?",
            "Which outputs does a training run leave behind?",
        ],
        "After training finishes, what will I find in the run folder?",
    ),
    (
        "Runs go under `runs/` by default. Set `run.dir` to choose the directory and `run.name` to name the "
        "run, e.g. `ftl train recipe=demo run.name=lr-test`.",
        [
            "Where are runs saved?",
            "How do I name a run?",
            "How do I change the output directory?",
            "What is run.dir?",
        ],
        "Where does ftl put outputs by default, and can I pick a different folder?",
    ),
    (
        "config.yaml in the run directory is the fully resolved config. Pass the same overrides again, or "
        "copy the saved launch command, to reproduce the run.",
        [
            "How do I see the exact config a run used?",
            "What is config.yaml in the run dir?",
            "How do I reproduce an old run?",
            "Is the resolved config saved?",
        ],
        None,
    ),
    (
        "The exact launch command is saved in the run directory, and `ftl plan` prints it before you launch.",
        [
            "Where can I find the launch command?",
            "How do I see the torchrun command ftl uses?",
            "Does ftl show the command it runs?",
            "Is the launch command recorded?",
        ],
        None,
    ),
    (
        "Training metrics are appended to metrics.jsonl in the run directory, one JSON object per line, and "
        "plotted in loss_curve.png.",
        [
            "Where are the training metrics?",
            "What is metrics.jsonl?",
            "How do I read the loss values without W&B?",
            "Where is the loss logged locally?",
        ],
        None,
    ),
    # ----------------------------------------------------------- checkpoint
    (
        "Set `checkpoint.every_steps`, e.g. `ftl train recipe=demo checkpoint.every_steps=200`.",
        [
            "How often does ftl save checkpoints?",
            "How do I change the checkpoint interval?",
            "What is checkpoint.every_steps?",
            "How do I checkpoint more often?",
        ],
        "Which key sets how frequently checkpoints get written?",
    ),
    (
        "Set `checkpoint.keep`, e.g. `checkpoint.keep=3`, to keep only the newest checkpoints and delete older ones.",
        [
            "How do I limit the number of checkpoints kept?",
            "Checkpoints are filling my disk. What can I do?",
            "What is checkpoint.keep?",
            "How do I delete old checkpoints automatically?",
        ],
        None,
    ),
    (
        "With `checkpoint.resume=auto` ftl continues from the latest complete checkpoint in the run "
        "directory. Rerunning the same command resumes.",
        [
            "How do I resume training?",
            "What does checkpoint.resume=auto do?",
            "How do I continue a run that stopped?",
            "Can ftl pick up where it left off?",
        ],
        "My training was interrupted. How do I continue it?",
    ),
    (
        "Rerun the same command. With `checkpoint.resume=auto` it resumes from the latest complete "
        "checkpoint; an incomplete checkpoint from the crash is skipped.",
        [
            "My job crashed mid-save. Will resume break?",
            "What if the last checkpoint is incomplete?",
            "Does resume use a half-written checkpoint?",
            "The node died while checkpointing. What now?",
        ],
        None,
    ),
    # ---------------------------------------------------------------- wandb
    (
        "W&B runs offline by default when no API key is set. Files stay in the run directory and can be synced later.",
        [
            "Does ftl log to Weights & Biases?",
            "What is the default W&B mode?",
            "Do I need a W&B account?",
            "What happens with wandb if I have no API key?",
        ],
        "Without a wandb key configured, where do my logs go?",
    ),
    (
        "Set `wandb.mode=online`, e.g. `ftl train recipe=demo wandb.mode=online`, with your W&B API key in "
        "the environment.",
        [
            "How do I log to W&B online?",
            "How do I stream metrics to the W&B website?",
            "How do I turn on online wandb logging?",
            "My runs are offline. How do I make them online?",
        ],
        None,
    ),
    (
        "Set `wandb.mode=disabled`, e.g. `ftl train recipe=demo wandb.mode=disabled`.",
        [
            "How do I turn off W&B?",
            "How do I disable wandb?",
            "Can I run without any W&B logging?",
            "What are the wandb modes?",
        ],
        "I don't want any Weights & Biases files at all. How do I switch it off?",
    ),
    (
        "Only rank 0 logs to W&B, so a multi-GPU or multi-node run appears as a single W&B run.",
        [
            "Why is there only one W&B run for 16 GPUs?",
            "Which rank logs to wandb?",
            "Do all processes log to W&B?",
            "Will I get one W&B run per GPU?",
        ],
        None,
    ),
    (
        "No. The W&B API key is never written to the run directory, config.yaml or logs; it is only read from "
        "the environment.",
        [
            "Is my W&B API key stored in the run directory?",
            "Does ftl save my wandb key?",
            "Is it safe to share a run directory?",
            "Where does ftl keep the W&B API key?",
        ],
        "Could my wandb secret leak if I send someone my run folder?",
    ),
    # ----------------------------------------------------------- exit codes
    (
        "Exit code 2 means invalid input. The error names the field and its allowed values; fix the override "
        "and check it with `ftl plan`.",
        [
            "What does exit code 2 mean?",
            "ftl exited with status 2. Why?",
            "Why did ftl return 2?",
            "What is exit status 2 from ftl?",
        ],
        "My command stopped immediately with return code 2. What went wrong?",
    ),
    (
        "Exit code 1 means a failure during the run. Check the logs in the run directory; rerunning the same "
        "command resumes from the latest checkpoint.",
        [
            "What does exit code 1 mean?",
            "ftl exited with status 1. What happened?",
            "Why did ftl return 1?",
            "What is exit status 1?",
        ],
        None,
    ),
    (
        "An unknown strategy is invalid input, so ftl exits with code 2 and names the field `strategy` and "
        "its allowed values: zero1, zero2, zero3, zero3_offload, fsdp, ddp, single.",
        [
            "I passed strategy=zero4 and got an error. Why?",
            "What happens if I give an unknown strategy?",
            "Why does ftl reject my strategy value?",
            "What if I mistype a strategy name?",
        ],
        None,
    ),
    (
        "`peft` accepts only `none`, `lora` or `qlora`. Any other value is invalid input: ftl exits with "
        "code 2 and lists the allowed values.",
        [
            "I set peft=dora and it failed. Why?",
            "What happens with an unsupported peft value?",
            "Why is peft=adapter rejected?",
            "Which peft values will be accepted?",
        ],
        None,
    ),
]


# Held-out facts: each a question and an answer that training never shows (same house style, other facts).
# eval.jsonl measures how the model answers questions about what it was not taught.
HELD_OUT: list[tuple[str, str]] = [
    (
        "How do I make training stop once the eval loss stops improving?",
        "Set `train.early_stopping.patience=N` with `eval.every_steps=M`, e.g. `eval.every_steps=50 "
        "train.early_stopping.patience=3`. The run stops after N evals in a row without a lower eval loss.",
    ),
    (
        "What counts as an improvement for early stopping?",
        "An eval loss lower than the best so far by more than `train.early_stopping.min_delta`, e.g. "
        "`train.early_stopping.min_delta=0.01`. The default, 0, counts any decrease.",
    ),
    (
        "After early stopping, which weights does ftl export give me?",
        "The best eval's checkpoint: with early stopping on, `ftl export RUN_DIR` exports that step and says "
        "which. Pass `--latest` for the last checkpoint, or `--best` on any run that kept its best.",
    ),
    (
        "How can I evaluate during training instead of only at the end?",
        "Set `eval.every_steps`, e.g. `ftl train recipe=demo eval.every_steps=100`. Each result goes into "
        "eval.json as `step_N`; 0, the default, evaluates only after training.",
    ),
    (
        "Can I get the base model's scores before fine-tuning starts?",
        "Set `eval.before_training=true`. ftl evaluates the starting model first and prints a before/after "
        "table when training ends.",
    ),
    (
        "How do I skip the evaluation at the end of training?",
        "Set `eval.after_training=false`, e.g. `ftl train recipe=demo eval.after_training=false`.",
    ),
    (
        "My eval set is huge. How do I evaluate on only part of it?",
        "Set `eval.max_batches`, e.g. `eval.max_batches=20`, to evaluate on at most that many batches of "
        "`eval.batch_size` sequences.",
    ),
    (
        "How do I turn off the ROUGE and BLEU scores to save time?",
        "Set `eval.generate=false`. Evaluation then reports loss and perplexity only and generates no answers.",
    ),
    (
        "The generated eval answers are cut off. How do I allow longer ones?",
        "Raise `eval.max_new_tokens`, e.g. `eval.max_new_tokens=256`. The default is 64 tokens.",
    ),
    (
        "How many held-out questions does ftl answer for ROUGE and BLEU?",
        "`eval.num_generate` of them, 16 by default; e.g. `eval.num_generate=64` scores more answers and takes longer.",
    ),
    (
        "How do I see more generated answers next to their references?",
        "Set `eval.show_samples`, e.g. `eval.show_samples=5`. `ftl eval` and the before/after table print that "
        "many answers beside their references.",
    ),
    (
        "Evaluation runs out of memory. What can I change?",
        "Lower `eval.batch_size`, e.g. `eval.batch_size=1`. It sets the sequences per evaluation batch on each rank.",
    ),
    (
        "How do I add weight decay?",
        "Set `train.weight_decay`, e.g. `ftl train recipe=demo train.weight_decay=0.1`. It is AdamW's decoupled "
        "decay, applied to matrices only.",
    ),
    (
        "Which Adam beta values does ftl use, and can I set them?",
        "Set `train.betas`, e.g. `train.betas=[0.9,0.999]`. The default is [0.9, 0.95].",
    ),
    (
        "Can I use a linear learning rate decay instead of cosine?",
        "Yes: `train.schedule=linear`. The choices are `cosine` (the default), `linear` and `constant`.",
    ),
    (
        "How low does the learning rate go at the end of the run?",
        "To `train.min_lr_ratio` × `train.lr`, 0.1 × lr by default; e.g. `train.min_lr_ratio=0` decays it to zero.",
    ),
    (
        "How do I train for three passes over my data?",
        "Set `train.epochs=3` and leave `train.max_steps=-1`. A fraction such as `train.epochs=0.5` stops partway.",
    ),
    (
        "The console prints a line every step. How do I log less often?",
        "Set `train.log_every`, e.g. `train.log_every=20`, for a log line (and W&B point) every 20 optimizer steps.",
    ),
    (
        "Does ftl use torch.compile?",
        "On CUDA it compiles each decoder layer by default (not under ZeRO-3 or QLoRA); on CPU it does not. "
        "Set `train.compile=false` or `train.compile=true` to choose.",
    ),
    (
        "How do I force training onto the CPU?",
        "Set `train.device=cpu`. The default, `auto`, uses CUDA when torch sees a GPU.",
    ),
    (
        "How do I stop ftl from saving a checkpoint when training ends?",
        "Set `checkpoint.save_final=false`. Checkpoints are then only written every `checkpoint.every_steps`.",
    ),
    (
        "I want to start the run over instead of resuming. How?",
        "Set `checkpoint.resume=never`. The earlier run's checkpoints, metrics and eval results are moved into "
        "RUN_DIR/earlier-<time>/, not deleted.",
    ),
    (
        "How do I continue from one specific checkpoint?",
        "Pass its directory, e.g. `checkpoint.resume=runs/demo/checkpoints/step-200`.",
    ),
    (
        "How do I pack several short examples into one sequence?",
        "Set `data.packing=true`. Examples are packed into `train.seq_len` sequences and attention never "
        "crosses from one example into another.",
    ),
    (
        "How can I train on just the first 1000 rows as a quick test?",
        "Set `data.max_train_examples=1000`. ftl then trains on the first 1000 training rows only.",
    ),
    (
        "How do I keep my examples in file order?",
        "Set `data.shuffle=false`. By default the examples are shuffled each epoch, seeded by `train.seed`.",
    ),
    (
        "What happens to examples longer than the sequence length?",
        "`data.truncation=clip`, the default, cuts them to `train.seq_len`; `data.truncation=drop` leaves them out.",
    ),
    (
        "I have no separate eval file. Can ftl hold some rows out for me?",
        "Set `data.eval_fraction`, e.g. `data.eval_fraction=0.05`, to hold out 5% of the training rows, chosen by "
        "`train.seed`.",
    ),
    (
        "How do I point ftl at my own held-out file?",
        "Set `data.eval_files`, e.g. `data.eval_files=[my_eval.jsonl]`, in the same format as the training data.",
    ),
    (
        "Can I skip bad rows instead of stopping on them?",
        "Set `data.on_error=skip`. A row that does not parse is left out and counted; the default, `raise`, stops "
        "and names the file and row.",
    ),
    (
        "Can the loss include the user's turns too?",
        "Set `data.assistant_only_loss=false` to train on every token. By default only the assistant turns are trained on.",
    ),
    (
        "How do I use a different chat template from the tokenizer's?",
        "Set `data.chat_template`, either a Jinja template or a named one such as `data.chat_template=chatml`.",
    ),
    (
        "Where does ftl keep tokenized data between runs?",
        "Under $FTL_CACHE/data/<key>. Set `data.cache=false` to tokenize again in every run.",
    ),
    (
        "How do I log to a different W&B project?",
        "Set `wandb.project`, e.g. `ftl train recipe=demo wandb.project=support-bot`. The default project is `ftl`.",
    ),
    (
        "How do I log my runs to my team's W&B account?",
        "Set `wandb.entity` to the team, e.g. `wandb.entity=my-team`. Without it the API key's default entity is used.",
    ),
    (
        "How can I see related runs together in W&B?",
        "Give them the same `wandb.group`, e.g. `wandb.group=lr-search`, and add labels with `wandb.tags=[baseline]`.",
    ),
    (
        "How do I export smaller safetensors files?",
        "Pass `--max-shard-size`, e.g. `ftl export RUN_DIR --max-shard-size 500MB`. The default is 2GB.",
    ),
    (
        "Can I export the weights in bf16?",
        "Yes: `ftl export RUN_DIR --dtype bf16`. The choices are auto (as trained), fp32, bf16 and fp16.",
    ),
    (
        "How do I talk to my fine-tuned model interactively?",
        "Run `ftl chat RUN_DIR`. It reads one user turn per line of stdin and answers with the run, a checkpoint or an export.",
    ),
    (
        "A rank died and the others hang. How long until ftl gives up?",
        "`launch.dist_timeout_s` seconds, 600 by default; e.g. `launch.dist_timeout_s=300` fails a hung step sooner.",
    ),
]


def _find(fragment: str) -> int:
    hits = [i for i, (a, _, _) in enumerate(FACTS) if fragment in a]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


def _held_out_rows(pairs: list[tuple[str, str]]) -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(pairs):
        msgs = [{"role": "system", "content": SYSTEM}] if i % 10 == 5 else []
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": msgs})
    return rows


def build() -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out with new answers, held-out paraphrases of taught facts)."""
    train: list[dict] = []
    paraphrases: list[tuple[str, str]] = []
    n = 0
    for answer, questions, eval_q in FACTS:
        assert len(questions) == 4, questions
        assert len(answer.split()) <= 60, answer
        for q in questions:
            msgs = []
            if n % 10 == 3:
                msgs.append({"role": "system", "content": SYSTEM})
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
            train.append({"messages": msgs})
            n += 1
        if eval_q is not None:
            paraphrases.append((eval_q, answer))

    # A few two-exchange conversations reusing facts above: (answer fragment,
    # first question, answer fragment, follow-up question).
    multi = [
        (
            "validates the config, prints the batch",
            "How do I check my config without starting training?",
            "Run `ftl train recipe=demo`. Any config",
            "Looks good. How do I actually start the run?",
        ),
        (
            "Use `peft=lora`, e.g.",
            "How do I train with LoRA?",
            "Run `ftl export merge_lora=true`",
            "And afterwards, how do I merge the adapters into the base model?",
        ),
        (
            "Use `launch=slurm`. ftl renders",
            "How do I run on SLURM?",
            "Preemption is handled",
            "What if the job gets preempted?",
        ),
        (
            "Set `train.lr`, for example",
            "How do I change the learning rate?",
            "Run `ftl sweep`.",
            "Can I try several learning rates automatically?",
        ),
        (
            "Global batch = `train.micro_batch_size`",
            "How is the global batch size computed?",
            "Raise `train.grad_accum` by",
            "So how do I keep it the same if I get fewer GPUs?",
        ),
        (
            "With `checkpoint.resume=auto` ftl continues",
            "How do I resume training?",
            "Set `checkpoint.keep`",
            "And how do I stop old checkpoints from using all my disk?",
        ),
        (
            "W&B runs offline by default",
            "What is the default W&B mode?",
            "Set `wandb.mode=online`",
            "How do I switch it to online then?",
        ),
        (
            "Run `ftl export`. It consolidates",
            "How do I export a checkpoint?",
            "Run `ftl generate` to sample",
            "How can I then sample some outputs from it?",
        ),
    ]
    for fa_frag, qa, fb_frag, qb in multi:
        train.append(
            {
                "messages": [
                    {"role": "user", "content": qa},
                    {"role": "assistant", "content": FACTS[_find(fa_frag)][0]},
                    {"role": "user", "content": qb},
                    {"role": "assistant", "content": FACTS[_find(fb_frag)][0]},
                ]
            }
        )
    return train, _held_out_rows(HELD_OUT), _held_out_rows(paraphrases)


def check_new_answers(train: list[dict], eval_: list[dict]) -> None:
    taught = {m["content"] for ex in train for m in ex["messages"] if m["role"] == "assistant"}
    for ex in eval_:
        for m in ex["messages"]:
            assert m["role"] != "assistant" or m["content"] not in taught, m["content"]
            assert len(m["content"].split()) <= 60, m["content"]


def check_overlap(train: list[dict], eval_: list[dict], threshold: float = 0.8) -> float:
    train_qs = [m["content"] for ex in train for m in ex["messages"] if m["role"] == "user"]
    worst = 0.0
    for ex in eval_:
        for m in ex["messages"]:
            if m["role"] != "user":
                continue
            for tq in train_qs:
                r = difflib.SequenceMatcher(None, m["content"].lower(), tq.lower()).ratio()
                assert m["content"] != tq, m["content"]
                assert r <= threshold, (m["content"], tq, r)
                worst = max(worst, r)
    return worst


def write(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, eval_, paraphrases = build()
    check_new_answers(train, eval_)
    worst = max(check_overlap(train, eval_), check_overlap(train, paraphrases))
    write(HERE / "train.jsonl", train)
    write(HERE / "eval.jsonl", eval_)
    write(HERE / "eval_paraphrase.jsonl", paraphrases)
    print(
        f"train={len(train)} eval={len(eval_)} eval_paraphrase={len(paraphrases)} "
        f"max_eval_train_question_ratio={worst:.3f}"
    )


if __name__ == "__main__":
    main()
