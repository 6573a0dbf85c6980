"""Whether W&B can go online: an API key in the environment or from `wandb login`. Imports nothing
heavy (sweep commands and `ftl eval` ask before deciding how to run)."""

from __future__ import annotations

import netrc
import os
from typing import Optional
from urllib.parse import urlparse


def wandb_api_key_configured(environ: Optional[dict[str, str]] = None) -> bool:
    """WANDB_API_KEY, or a netrc entry for the W&B host (what `wandb login` writes)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(mode: str, environ: Optional[dict[str, str]] = None) -> str:
    if mode == "auto":
        return "online" if wandb_api_key_configured(environ) else "offline"
    return mode
