"""The YAML configs that ship inside the package (torchtune-style recipes): ``demo``, ``gsm8k-cpu``,
``gpu-qwen2.5-1.5b``, the paper's runs under ``paper/`` and the study rows under ``study/``.

A config is named by its path below this folder without ``.yaml`` (``demo``, ``paper/quality1``). In a
source checkout the top-level ``configs/`` folder is a link to this one, so ``configs/demo.yaml`` and
``demo`` are the same file. ``cmerl configs`` lists them; ``cmerl configs NAME`` prints one.
"""

from __future__ import annotations

from pathlib import Path

#: Folder of the packaged configs.
CONFIG_ROOT = Path(__file__).resolve().parent


def packaged_configs(under: str = "") -> list[str]:
    """Names of the packaged configs (sorted), optionally only those in the subfolder ``under``."""
    root = CONFIG_ROOT / under if under else CONFIG_ROOT
    return sorted(p.relative_to(CONFIG_ROOT).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """The config file ``name_or_path`` means: an existing file as given, else the packaged config of that
    name (``demo``, ``paper/quality1``; a trailing ``.yaml`` and a leading ``configs/`` are accepted).

    Raises ``FileNotFoundError`` naming the argument and the packaged names when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    packaged = CONFIG_ROOT / f"{name}.yaml"
    if not path.is_absolute() and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config file not found: {name_or_path} (not a file, and not a packaged config; "
                            "`cmerl configs` lists those)")
