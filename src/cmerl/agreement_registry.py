"""How far each judge setup agrees with GPT-4 Turbo, as measured: the packaged judges' numbers and this
machine's registry of judge-checks (``$CMERL_CACHE/judge_checks.json``), both keyed by
:func:`cmerl.judging.judge_key` (judge, settings, decision rule, prompt), so a judge run with other
settings never inherits a number.

Writers: ``cmerl judge-check`` (:func:`cmerl.checks.remember_agreement`, the easy GPT-4 Turbo vs
gemma-2b-it sample) and ``cmerl judge-check --pairs`` (:func:`cmerl.calibration.remember_pairs_agreement`,
under ``pairs.<file>``). Reader: every win-rate report (:func:`lookup_agreement`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cmerl.io import write_json_atomic
from cmerl.judging import judge_key
from cmerl.models import cache_dir

#: Agreement of the packaged judges with GPT-4 Turbo, measured with the default prompt, settings and
#: decision rule by ``cmerl judge-check`` (see benchmarks/RESULTS.md, "Evaluation"). Keyed by
#: :func:`cmerl.judging.judge_key`, so a judge run with other settings does not inherit the number.
PACKAGED_AGREEMENT: dict[str, dict] = {
    key: {"judge": judge, "agreement": agr, "ci_low": lo, "ci_high": hi, "n": 80, "consistency": cons,
          "length_baseline": 0.725, "measured": "2026-11-24", "source": "packaged judge-check, benchmarks/RESULTS.md"}
    for key, judge, agr, lo, hi, cons in [
        ("47167bee90e4f6d6", "qwen2.5-coder-1.5b-instruct", 0.66875, 0.575, 0.7625, 0.6125),
        ("2c0361a3e91f886d", "qwen2.5-coder-0.5b-instruct", 0.53125, 0.45, 0.60625, 0.05),
        ("9831ada898a259e8", "smollm2-135m-instruct", 0.5375, 0.475, 0.6, 0.05),
        ("d2c59df7f6b547b5", "gemma-3-270m", 0.48125, 0.4125, 0.55, 0.0),
    ]
}
PHI2, FUSECHAT = "phi-2-sft__vs__phi-2", "FuseChat-Llama-3.2-1B-Instruct__vs__gemma-2b-it"
#: (pairs file, agreement, CI low, CI high, n, length-only baseline, position-only baseline) per judge setup
_PAIRS_MEASURED: dict[tuple[str, str], list[tuple[str, float, float, float, int, float, float]]] = {
    # the best packaged judge, default setup: ``cmerl judge-check --pairs phi2`` / ``fusechat --max-pair-chars
    # 4000 --limit 40``, |margin| >= 0.3 (benchmarks/RESULTS.md)
    ("47167bee90e4f6d6", "packaged judge-check --pairs"): [
        (PHI2, 0.6153846153846154, 0.47435897435897434, 0.7564102564102564, 39, 0.6666666666666666, 0.358974358974359),
        (FUSECHAT, 0.825, 0.725, 0.9125, 40, 0.95, 0.475)],
    # the same judge in reference-guided mode (``--judge-mode reference``), on the same pairs (session 5)
    ("dc3568a647984d90", "packaged judge-check --pairs --judge-mode reference"): [
        (PHI2, 0.6923076923076923, 0.5512820512820513, 0.8205128205128205, 39, 0.6666666666666666, 0.358974358974359),
        (FUSECHAT, 0.875, 0.775, 0.9625, 40, 0.95, 0.475)],
}
for (_key, _source), _rows in _PAIRS_MEASURED.items():
    PACKAGED_AGREEMENT.setdefault(_key, {"judge": "qwen2.5-coder-1.5b-instruct"})["pairs"] = {
        f: {"judge": "qwen2.5-coder-1.5b-instruct", "pairs_file": f, "min_margin": 0.3, "agreement": agr,
            "ci_low": lo, "ci_high": hi, "n": n, "length_baseline": length, "position_baseline": position,
            "measured": "2026-12-02", "source": f"{_source}, benchmarks/RESULTS.md"}
        for f, agr, lo, hi, n, length, position in _rows}

def registry_path() -> Path:
    """This machine's registry of measured agreements: ``$CMERL_CACHE/judge_checks.json``."""
    return cache_dir() / "judge_checks.json"


def update_registry(key: str, update: Callable[[dict], None]) -> None:
    """Apply ``update`` to the registry entry of judge key ``key`` (an empty dict when new) and write the
    registry back atomically. An unreadable or invalid registry file counts as empty."""
    path = registry_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    update(data.setdefault(key, {}))
    write_json_atomic(path, data)


def lookup_agreement(header: dict | None) -> dict | None:
    """The measured agreement of the judge setup in a verdicts header: from this machine's judge-checks,
    else from :data:`PACKAGED_AGREEMENT`; ``None`` when never measured."""
    if not header:
        return None
    key = judge_key(header)
    path = registry_path()
    data = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            data = {}
    packaged, local = PACKAGED_AGREEMENT.get(key) or {}, data.get(key) or {}
    if not packaged and not local:
        return None
    if "agreement" in local:  # this machine's easy-pair check replaces the packaged one; pairs merge by file
        merged = {**local, "pairs": {**packaged.get("pairs", {}), **local.get("pairs", {})}}
    else:
        merged = {**packaged, "pairs": {**packaged.get("pairs", {}), **local.get("pairs", {})}}
    return merged
