"""Agreement of an ensemble of judges on system-vs-system pairs, from the members' judge-check verdicts.

Each member must have been run with ``cmerl judge-check --pairs FILE`` (same selection flags) into
``ROOT/<judge>/<file-alias>/verdicts.jsonl``; the ensemble (mean log-odds per order,
:class:`cmerl.judge_modes.EnsembleJudge`) is replayed from those files (:class:`~cmerl.judge_modes.ReplayJudge`),
so nothing is judged again and the result is keyed like the live ensemble ``ensemble:A+B+...``.

    python benchmarks/judge_ensemble.py ROOT phi2 --min-margin 0.3 gemma-3-270m smollm2-135m-instruct ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cmerl.calibration import load_margin_pairs, pairs_check
from cmerl.judge_modes import EnsembleJudge, ReplayJudge


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("pairs")
    ap.add_argument("judges", nargs="+")
    ap.add_argument("--min-margin", type=float, default=0.3)
    ap.add_argument("--max-pair-chars", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    a = ap.parse_args()
    selected, _ = load_margin_pairs(a.pairs, min_margin=a.min_margin, n=a.n, max_pair_chars=a.max_pair_chars)
    pairs = [s.pair for s in selected]
    members = [ReplayJudge(a.root / j / a.pairs / "verdicts.jsonl", pairs) for j in a.judges]
    ensemble = EnsembleJudge(members, name="ensemble:" + "+".join(a.judges))
    out = a.root / ("ensemble_" + "+".join(a.judges)) / a.pairs / "verdicts.jsonl"
    result = pairs_check(ensemble, a.pairs, output=out, min_margin=a.min_margin, n=a.n,
                         max_pair_chars=a.max_pair_chars)
    print(result.summary())


if __name__ == "__main__":
    main()
