"""What every loader of prompts knows about a source's name, below :mod:`cmerl.data` and :mod:`cmerl.problems`.

* :data:`BUNDLED`, the bundled prompt sets, and :data:`FILE_SUFFIXES`, the prompt file types (the loading
  itself is :mod:`cmerl.data`'s);
* :func:`parse_prompt_spec`: a set name or file, optionally sliced (``alpaca_eval:50``, ``f.jsonl[10:20]``);
* :func:`hub_unreachable_message`: why a Hugging Face dataset id cannot load here, so that a loader fails
  at once instead of after ``datasets``' connection retries.

Light on purpose (standard library only at import): ``cmerl.data`` and ``cmerl.problems`` both import it,
and the command line reads it before any model loads.
"""

from __future__ import annotations

import re
from pathlib import Path

#: bundled name -> (file inside ``cmerl/data``, prompt column)
BUNDLED: dict[str, tuple[str, str]] = {
    "ultrafeedback": ("ultrafeedback_1000.jsonl", "prompt"),
    "alpaca_eval": ("alpaca_eval_805.jsonl", "instruction"),
}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def parse_prompt_spec(spec: str) -> tuple[str, int | None, int | None]:
    """``"alpaca_eval:50"`` → ``("alpaca_eval", None, 50)``; ``"f.jsonl[10:20]"`` → ``("f.jsonl", 10, 20)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"prompt set must be a non-empty string (got {spec!r})")
    spec = spec.strip()
    m = re.fullmatch(r"(.+?)\[(\d*):(\d*)\]", spec)
    if m:
        return m.group(1), int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None
    m = re.fullmatch(r"(.+?):(\d+)", spec)
    if m and not Path(spec).exists():
        return m.group(1), None, int(m.group(2))
    return spec, None, None


def hub_unreachable_message(source: str) -> str | None:
    """The error message for a hub dataset id ``source`` when the Hugging Face hub is unreachable; None when
    it can load: a local dataset folder, ``datasets``' offline mode (``HF_DATASETS_OFFLINE=1``: a copy cached
    earlier is used, as datasets does) or a reachable hub."""
    from datasets import config as datasets_config  # deferred: datasets (slow import, hub datasets only)

    from cmerl.models import hub_reachable  # deferred: torch, via cmerl.models (torch-free CLI start)

    if Path(source).expanduser().is_dir() or datasets_config.HF_HUB_OFFLINE or hub_reachable():
        return None
    return (f"could not load Hugging Face dataset {source!r}: the Hugging Face hub is unreachable from here. Use a "
            f"bundled name ({', '.join(BUNDLED)}) or a local {'/'.join(FILE_SUFFIXES)} file, or set "
            "HF_DATASETS_OFFLINE=1 to load a copy cached earlier.")
