"""What a resumable job's output was made from, and the check that refuses to mix two runs.

Every command that resumes (``generate``, ``judge``, ``score``; distill, separation and study phases too)
records a :class:`Fingerprint` of its inputs with its output and, on a rerun onto the same output, compares
the new run's fingerprint with the recorded one before reading or writing a row. Any difference is refused
with :class:`RunMismatchError` naming what differs, so a resumed output never mixes two runs.

A fingerprint is plain JSON::

    {"kind": "cmerl.fingerprint", "version": 1, "job": "score",
     "inputs": {"input": "sha256:9f2c..."},
     "settings": {"verifier": "smollm2-135m-instruct", "model": {"id": ..., "weights": ...}, ...}}

* ``inputs``: content hashes (:func:`sha256_file`, :func:`sha256_json`) of what the job reads: input files,
  the outputs being compared. ``None`` for an input that has no content to hash (a bundled set named by
  its source); compared like any value.
* ``settings``: everything else that changes the rows: model fingerprints (:func:`model_fingerprint`: what
  the weights are, not what they were called), sampling settings, options. Settings that only change speed
  (batch sizes) stay out.

Where it lives: a sidecar ``<output>.fingerprint.json`` (:func:`sidecar_path`; keeps the output's own
format intact, e.g. AlpacaEval ``model_outputs.json``), or inline in an output that has a header of its own
(verdicts files: ``header["fingerprint"]``). :func:`guard_output` is the whole protocol for a sidecar:

* output absent or empty: the sidecar is (re)written and the run starts afresh;
* output present and sidecar equal: resume;
* output present and sidecar different, missing or unreadable: :class:`RunMismatchError`.

The sidecar is written (atomically) before the first row, so a process killed at any point leaves either
no output or an output with its fingerprint beside it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmerl.io import write_json_atomic

KIND = "cmerl.fingerprint"
VERSION = 1
SIDECAR_SUFFIX = ".fingerprint.json"
_SHOWN = 60  # characters of a value shown in a difference


class RunMismatchError(ValueError):
    """An output belongs to another run (other inputs or settings): resuming onto it would mix runs."""


# --------------------------------------------------------------------------------------------- hashes
def sha256_file(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes (streamed; any size). Raises FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot fingerprint {p}: not a file")
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def canonical_json(obj: Any) -> str:
    """JSON text that is equal for equal data: sorted keys, no spaces, unicode kept. Non-finite floats
    raise ValueError (they have no JSON form)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_json(obj: Any) -> str:
    """``"sha256:<hex>"`` of :func:`canonical_json` of ``obj`` (for inputs that are data, not a file)."""
    return f"sha256:{hashlib.sha256(canonical_json(obj).encode('utf-8')).hexdigest()}"


# --------------------------------------------------------------------------------------------- models
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")


def model_fingerprint(name: str) -> dict[str, str | None]:
    """What a model name is, independently of how it was named: ``{"id", "weights"}``.

    * ``id``: the lower-cased Hugging Face hub id of a hub name or of a packaged model (its upstream
      repository), else ``None``;
    * ``weights``: a content hash of the weights: ``gguf:<sha256>`` of a packaged model's GGUF, of a
      ``.gguf`` file or of the GGUF a cmerl cache folder was converted from, ``files:<sha256>`` over the
      weight files (and ``adapter_config.json``) of any other local folder; ``None`` for a hub id (its
      weights are not here) or a packaged model that is not installed.

    Hashes are remembered in the cmerl cache by (path, size, mtime), so a large folder is read once.
    Raises what :func:`cmerl.models.resolve` raises for a name that cannot mean a model.
    """
    from cmerl.models import (  # deferred: torch, via cmerl.models (torch-free CLI start)
        PACKAGED_MODELS,
        ModelNotAvailableError,
        gguf_sha256,
        packaged_part_paths,
        resolve,
    )

    src = resolve(name)
    if src.kind == "packaged":
        spec = PACKAGED_MODELS[src.location]
        hub_id = getattr(spec, "hub_id", None)
        try:
            weights = f"gguf:{gguf_sha256(packaged_part_paths(src.location))}"
        except ModelNotAvailableError:
            weights = None
        return {"id": hub_id.lower() if hub_id else f"packaged:{src.location}", "weights": weights}
    if src.kind == "gguf":
        return {"id": None, "weights": f"gguf:{gguf_sha256([Path(src.location)])}"}
    if src.kind == "folder":
        return {"id": None, "weights": folder_weights(Path(src.location))}
    return {"id": src.location.lower(), "weights": None}


def folder_weights(folder: Path) -> str | None:
    """The ``weights`` part of :func:`model_fingerprint` for a local folder (``None`` when it holds no
    weight file). A cmerl cache folder answers with the GGUF it was converted from."""
    from cmerl.models import gguf_sha256  # deferred: torch, via cmerl.models (torch-free CLI start)

    meta = folder / "cmerl_cache.json"
    if meta.is_file():
        try:
            sha = json.loads(meta.read_text(encoding="utf-8")).get("gguf_sha256")
        except (OSError, ValueError):
            sha = None
        if isinstance(sha, str) and len(sha) == 64:
            return f"gguf:{sha}"
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES
                                                                  or p.name == "adapter_config.json"))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        return None
    parts = [(p.name, p.stat().st_size, gguf_sha256([p])) for p in files]
    return f"files:{hashlib.sha256(canonical_json(parts).encode()).hexdigest()}"


def _strip_identity(name: str) -> str:
    """A model name from a name or an identity string (``packaged:``/``folder:``/``gguf:``/``hub:``)."""
    kind, sep, rest = name.partition(":")
    return rest if sep and kind in ("packaged", "folder", "gguf", "hub") and rest else name


def same_model(a: str, b: str) -> bool:
    """True when two model names (or :func:`cmerl.models.model_identity` strings) mean the same model: the
    same resolved source, the same hub id (a packaged model's upstream id included), or the same weights
    (hashed only when a local folder or ``.gguf`` file is involved). Names that cannot be resolved compare
    as text."""
    # deferred: torch, via cmerl.models (torch-free CLI start)
    from cmerl.models import ModelNotAvailableError, resolve

    a, b = _strip_identity(a), _strip_identity(b)
    try:
        sa, sb = resolve(a), resolve(b)
    except (FileNotFoundError, ModelNotAvailableError, ValueError):
        return a.strip().lower() == b.strip().lower()
    if sa.identity == sb.identity:
        return True
    if sa.kind == sb.kind == "packaged":
        return False  # distinct packaged models are distinct weights
    try:
        fa, fb = model_fingerprint(a), model_fingerprint(b)
    except (OSError, ModelNotAvailableError, ValueError):
        return False
    if fa["id"] and fa["id"] == fb["id"]:
        return True
    if "folder" in (sa.kind, sb.kind) or "gguf" in (sa.kind, sb.kind):
        return fa["weights"] is not None and fa["weights"] == fb["weights"]
    return False


# --------------------------------------------------------------------------------------------- fingerprints
@dataclass(frozen=True)
class Fingerprint:
    """The inputs (content hashes) and settings of one job's run; see the module docstring."""

    job: str
    inputs: Mapping[str, str | None] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": KIND, "version": VERSION, "job": self.job, "inputs": dict(self.inputs),
                "settings": json.loads(canonical_json(dict(self.settings)))}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "fingerprint") -> Fingerprint:
        """Parse :meth:`to_dict`'s output; raises RunMismatchError naming ``where`` when it is not one."""
        if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("job"), str):
            raise RunMismatchError(f"{where} is not a cmerl fingerprint")
        if data.get("version") != VERSION:
            raise RunMismatchError(f"{where} has fingerprint version {data.get('version')!r}; this cmerl writes "
                                   f"version {VERSION}")
        inputs, settings = data.get("inputs", {}), data.get("settings", {})
        if not isinstance(inputs, dict) or not isinstance(settings, dict):
            raise RunMismatchError(f"{where}: 'inputs' and 'settings' must be objects")
        return cls(data["job"], inputs, settings)

    def differences(self, recorded: Fingerprint) -> list[str]:
        """What differs from a ``recorded`` fingerprint, one readable phrase each (empty when equal):
        ``"input 'b': sha256:3f1a… -> sha256:9c0e…"``, ``"setting 'temperature': 0.0 -> 0.7"``."""
        out = []
        if self.job != recorded.job:
            out.append(f"job: {recorded.job!r} -> {self.job!r}")
        new_inputs, old_inputs = dict(self.inputs), dict(recorded.inputs)
        for key in sorted(set(new_inputs) | set(old_inputs)):
            if new_inputs.get(key) != old_inputs.get(key):
                out.append(f"input {key!r}: {_short(old_inputs.get(key), key in old_inputs)} -> "
                           f"{_short(new_inputs.get(key), key in new_inputs)}")
        new_s, old_s = _flatten(json.loads(canonical_json(dict(self.settings)))), _flatten(dict(recorded.settings))
        for key in sorted(set(new_s) | set(old_s)):
            if new_s.get(key, _ABSENT) != old_s.get(key, _ABSENT):
                out.append(f"setting {key!r}: {_show(old_s.get(key, _ABSENT))} -> {_show(new_s.get(key, _ABSENT))}")
        return out

    def check(self, recorded: Any, *, where: str) -> None:
        """Raise RunMismatchError when ``recorded`` (a fingerprint dict, or ``None`` when the output has
        none) is not this run's, naming ``where`` and every difference."""
        if recorded is None:
            raise RunMismatchError(f"{where} exists but records no fingerprint of the run that made it (written "
                                   "by another tool or an older cmerl): resuming could mix runs; delete it or "
                                   "choose another output")
        diffs = self.differences(Fingerprint.from_dict(recorded, where=f"the fingerprint of {where}"))
        if diffs:
            raise RunMismatchError(f"{where} belongs to another run ({'; '.join(diffs)}); delete it or choose "
                                   "another output to start afresh")


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


def _short(digest: str | None, present: bool) -> str:
    if not present:
        return "(absent)"
    if digest is None:
        return "None"
    kind, _, hexdigest = digest.partition(":")
    return f"{kind}:{hexdigest[:12]}…" if hexdigest else digest


# --------------------------------------------------------------------------------------------- sidecars
def sidecar_path(output: str | Path) -> Path:
    """``<output>.fingerprint.json`` beside ``output``."""
    out = Path(output)
    return out.with_name(out.name + SIDECAR_SUFFIX)


def read_sidecar(output: str | Path) -> dict | None:
    """The recorded fingerprint dict of ``output`` (``None`` when there is no sidecar). A sidecar that is
    not JSON raises RunMismatchError naming it."""
    side = sidecar_path(output)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunMismatchError(f"{side} is unreadable ({exc}); delete it and {Path(output).name} to start "
                               "afresh") from None


def write_sidecar(output: str | Path, fingerprint: Fingerprint) -> Path:
    """Write ``fingerprint`` to the sidecar of ``output`` atomically; returns the sidecar's path."""
    side = sidecar_path(output)
    write_json_atomic(side, fingerprint.to_dict())
    return side


def guard_output(output: str | Path, fingerprint: Fingerprint, *, has_rows: bool | None = None) -> bool:
    """The resume protocol of a job whose output has a sidecar (see module docstring). Call it before
    reading or writing any row.

    ``has_rows``: whether the output holds rows of an earlier run (default: the output file exists and is
    not empty; pass it when the rows live in another file, e.g. a partial file beside a ``.json``).
    Returns True when resuming (the recorded fingerprint equals this run's), False when starting afresh
    (the sidecar has just been written). Raises RunMismatchError when the rows belong to another run.
    """
    out = Path(output)
    if has_rows is None:
        has_rows = out.is_file() and out.stat().st_size > 0
    if not has_rows:
        write_sidecar(out, fingerprint)
        return False
    fingerprint.check(read_sidecar(out), where=str(out))
    return True


def remove_sidecar(output: str | Path) -> None:
    """Delete the sidecar of ``output`` (when a job deletes or replaces its output)."""
    sidecar_path(output).unlink(missing_ok=True)
