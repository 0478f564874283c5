"""Session fixtures of the reward-service tests; load with ``pytest_plugins = ["_server_fixtures"]``.

* ``tiny_verifier_dir``: an HF folder holding a tiny random llama (seed 1) with the real SmolLM2 tokenizer;
* ``tiny_local``: the in-process :class:`~cmerl.scoring.Verifier` over that folder (fp32), the reference
  every remote score is compared with;
* ``tiny_server``: one shared ``cmerl serve`` process over it (batching on, no API key, one torch thread).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _server_helpers import ServerProcess, save_tiny_verifier, tiny_args


@pytest.fixture(scope="session")
def tiny_verifier_dir(tmp_path_factory) -> Path:
    return save_tiny_verifier(tmp_path_factory.mktemp("tiny-verifier"))


@pytest.fixture(scope="session")
def tiny_local(tiny_verifier_dir):
    from cmerl.scoring import Verifier

    return Verifier.from_pretrained(str(tiny_verifier_dir), dtype="float32")


@pytest.fixture(scope="session")
def tiny_server(tiny_verifier_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-logs") / "tiny_server.log"
    server = ServerProcess(tiny_args(tiny_verifier_dir), log=log).start()
    yield server
    server.stop()
