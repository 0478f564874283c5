"""Write two tiny random models with real tokenizers as HF folders, for trying multi-process wiring fast.

    .venv/bin/python examples/accelerate/make_tiny_models.py runs/tiny-models

creates runs/tiny-models/policy (llama, SmolLM2 tokenizer) and runs/tiny-models/verifier (qwen2,
Qwen2.5 tokenizer). They produce gibberish; they only exercise the plumbing.
"""

import sys
from pathlib import Path

from cmerl.models import load_tokenizer
from cmerl.testing import tiny_for_tokenizer


def main(out: Path) -> None:
    for name, tok_name, arch, seed in (("policy", "smollm2-135m-instruct", "llama", 0),
                                       ("verifier", "qwen2.5-coder-0.5b-instruct", "qwen2", 1)):
        tok = load_tokenizer(tok_name)
        model = tiny_for_tokenizer(tok, arch=arch, seed=seed)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        print(f"wrote {out / name}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-models"))
