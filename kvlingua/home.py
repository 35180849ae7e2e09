"""Where kvlingua keeps downloaded data, tokenizers and pre-trained pools."""
from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    """``$KVLINGUA_HOME`` if set, else ``~/.cache/kvlingua`` (created on demand by writers)."""
    env = os.environ.get("KVLINGUA_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "kvlingua"
