"""Write an OpenRLHF prompt file (JSONL) from a cmerl prompt set: ``{"prompt": ..., "label": ...}`` rows.

    python examples/openrlhf/make_dataset.py ultrafeedback runs/openrlhf-data/prompts.jsonl

``label`` repeats the raw user prompt, so with ``--data.apply_chat_template`` (prompts chat-templated for the
actor) the reward service can still render the *verifier's* template around the raw prompt
(``cmerl serve --prompt-mode label`` and ``--data.label_key label``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cmerl.data import read_prompts
from cmerl.io import write_records


def main(source: str, out: Path) -> None:
    rows = []
    for p in read_prompts(source):
        text = p if isinstance(p, str) else next(m["content"] for m in reversed(p) if m["role"] == "user")
        rows.append({"prompt": text, "label": text})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_records(out, rows)
    print(f"wrote {out} ({len(rows)} prompts)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ultrafeedback",
         Path(sys.argv[2] if len(sys.argv) > 2 else "runs/openrlhf-data/prompts.jsonl"))
