"""Where kvlingua keeps downloaded data, tokenizers and pre-trained pools."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def data_home() -> Path:
    """``$KVLINGUA_HOME`` if set, else ``~/.cache/kvlingua`` (created on demand by writers)."""
    env = os.environ.get("KVLINGUA_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "kvlingua"


def swap_in(new: Path, root: Path) -> None:
    """Make the finished directory ``new`` (a sibling of ``root``) the directory ``root``, replacing what was
    there: a reader sees the old directory or the new one, never a half-written one."""
    if root.exists():
        old = root.parent / f".old-{os.getpid()}-{root.name}"
        os.replace(root, old)
        shutil.rmtree(old)
    os.replace(new, root)
