"""One flag vocabulary across the ``cmerl`` commands (cmerl.cli.app): the same concept has the same spelling
and short flag everywhere, old spellings work but are hidden, and shared option groups read the same."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cmerl.cli import app

OLD_SPELLINGS = {"--data": "--input", "--n": "--limit", "--json": "--output"}  # --json FILE; a bare --json prints JSON


def _commands() -> dict[str, object]:
    """Every leaf command of the app by its full name ("judge", "study run", ...)."""
    found: dict[str, object] = {}

    def walk(cmd, prefix: str) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, f"{prefix} {name}".strip())
        else:
            found[prefix] = cmd

    walk(get_command(app), "")
    return found


def _options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option"]


def test_a_long_flag_has_the_same_short_flag_in_every_command():
    shorts: dict[str, dict[str, tuple[str, ...]]] = defaultdict(dict)
    for name, cmd in _commands().items():
        for opt in _options(cmd):
            longs = [o for o in opt.opts if o.startswith("--")]
            short = tuple(sorted(o for o in opt.opts if not o.startswith("--")))
            for flag in longs:
                shorts[flag][name] = short
    assert len(shorts) > 40  # the walk found the commands' options
    mixed = {flag: by_cmd for flag, by_cmd in shorts.items() if len(set(by_cmd.values())) > 1}
    assert not mixed, f"one long flag, different short flags: {mixed}"


def test_old_spellings_are_hidden_and_the_new_ones_shown():
    shown = {name: {o for opt in _options(cmd) if not opt.hidden and not (opt.is_flag and opt.opts == ["--json"])
                    for o in opt.opts} for name, cmd in _commands().items()}
    for name, flags in shown.items():
        assert not flags & OLD_SPELLINGS.keys(), f"cmerl {name} shows an old spelling: {flags & OLD_SPELLINGS.keys()}"
    assert {"--input", "--limit", "--output"} <= shown["reward-check"]
    assert {"--input", "--limit", "--output-dir"} <= shown["judge-check"]
    assert "--output" in shown["winrate"]
    hidden = {o for opt in _options(_commands()["reward-check"]) if opt.hidden for o in opt.opts}
    assert hidden == {"--data", "--n"}


def test_shared_option_groups_read_the_same_everywhere():
    cmds = _commands()
    judge_cmds = [n for n, c in cmds.items() if any("--judge-mode" in o.opts for o in _options(c))]
    assert set(judge_cmds) == {"judge", "judge-check", "eval"}

    def judge_group(name: str) -> dict[str, str | None]:
        # --judge itself differs on purpose: judge/eval take several (a panel), judge-check measures one
        return {o.opts[0]: o.help for o in _options(cmds[name]) if o.opts[0].startswith("--judge-")}

    first = judge_group(judge_cmds[0])
    assert {"--judge-url", "--judge-api", "--judge-dtype", "--judge-mode"} <= first.keys()
    for name in judge_cmds[1:]:
        assert judge_group(name) == first, f"cmerl {name}'s judge options differ from cmerl {judge_cmds[0]}'s"
    # every dtype flag is the one dtype option: default auto, the same rule in its help
    dtype_flags = [(n, o) for n, c in cmds.items() for o in _options(c) if o.opts[0].endswith("dtype")]
    assert len(dtype_flags) >= 8
    for name, opt in dtype_flags:
        assert opt.default == "auto" and "auto (bfloat16 where the CPU/GPU runs it natively" in opt.help, name
        assert opt.opts[0] == "--dtype" or opt.opts[0].removesuffix("-dtype").removeprefix("--") in (
            "judge", "verifier"), f"cmerl {name}: {opt.opts[0]} is not --dtype or --<role>-dtype"


def test_old_and_new_spellings_give_the_same_result_and_conflicts_are_usage_errors(tmp_path):
    from cmerl.judging.run import VERDICTS_KIND

    header = {"kind": VERDICTS_KIND, "judge": {"name": "some-judge", "settings": {}}, "decision": {}}
    rows = [header] + [{"index": i, "verdict": v, "consistent": True, "len_a": 10 + i, "len_b": 12}
                       for i, v in enumerate(["a", "b", "tie", "a", "a", "b"])]
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    new = runner.invoke(app, ["winrate", str(verdicts), "-o", str(tmp_path / "new.json"), "--n-boot", "200"])
    old = runner.invoke(app, ["winrate", str(verdicts), "--json", str(tmp_path / "old.json"), "--n-boot", "200"])
    if new.exit_code != 0:
        pytest.fail(f"{new.output} {new.exception!r}")
    assert old.exit_code == 0 and new.stdout == old.stdout
    assert json.loads((tmp_path / "new.json").read_text()) == json.loads((tmp_path / "old.json").read_text())
    both = runner.invoke(app, ["winrate", str(verdicts), "-o", str(tmp_path / "a.json"),
                               "--json", str(tmp_path / "b.json")])
    assert both.exit_code == 2 and "give --output or its old spelling --json, not both" in both.output
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_prints_its_help(name):
    """``--help`` renders (rich markup in a help text, e.g. a literal ``[/...]``, used to crash it)."""
    result = CliRunner().invoke(app, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
