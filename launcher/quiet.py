"""Messages other libraries print that are not the user's business, silenced at their source.

Each filter names the library that emits the message (its logger, or the module a warning is
attributed to) and the message itself, so the same library's other warnings, and every other
library's, still reach the user. :func:`install` runs first thing in every ftl process (the
command line, each training rank, each eval rank); it imports none of these libraries.
"""

from __future__ import annotations

import builtins
import logging
import sys
import warnings

# (logger name, message prefix, why it is noise)
LOG_MESSAGES = (
    # DeepSpeed probes for an accelerator when imported (accelerate imports it inside transformers'
    # save_pretrained, even in single-process runs and `ftl export`); on CPU it then works on CPU.
    ("DeepSpeed", "Setting accelerator to CPU"),
    # bitsandbytes (imported by peft in every LoRA run) looks for the optional `kernels` package,
    # which would fetch code from a hub, and falls back to its own CPU kernel.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)

# (warning category name, module regex, message regex): a library warning about its own internals
# or a dependency's deprecated name, which ftl's users cannot act on.
WARNINGS = (
    # peft asks transformers for `is_gradient_checkpointing`, which transformers deprecated.
    ("FutureWarning", r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
    # peft looks for the base model's config where it was loaded from; a QLoRA base built from
    # model.source=random is loaded from a private temporary directory (model/loading.py) gone by then.
    ("UserWarning", r"peft\.utils\.save_and_load", r"Could not find a config file in \S*ftl-random-"),
    # torch.distributed.checkpoint, told to save in one process (fsdp on one rank), says it assumes
    # so; an async save says it from its writer thread, outside any catch_warnings of the caller.
    ("UserWarning", r"torch\.distributed\.checkpoint\.utils", r"torch\.distributed is disabled, unavailable"),
)

# A sweep's Bayesian search (the `sweeps` package fits a Gaussian process with scikit-learn): with a
# handful of trials the fit often stops early, which says nothing about the sweep.
SKLEARN_MODULES = r"sklearn\.(gaussian_process|linear_model|utils)"


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to judge
            return True
        return not message.startswith(self.prefixes)


_installed = False


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in LOG_MESSAGES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        # getLogger now returns the object the library's own getLogger will return at import.
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    for category, module, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category), module=module)
    # ConvergenceWarning is sklearn's own class: matched by the module that raises it, without importing sklearn.
    warnings.filterwarnings("ignore", message=r".*(converge|optimal value found|lbfgs)", module=SKLEARN_MODULES)
    if not _isatty(sys.stderr):
        _plain_hf_progress()
    _installed = True


def _plain_hf_progress() -> None:
    """transformers' and huggingface_hub's tqdm bars redraw with carriage returns, which a log file
    keeps as one long garbled line; ftl reports those phases itself."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow huggingface_hub's switch


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False
