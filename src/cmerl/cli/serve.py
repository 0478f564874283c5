"""``cmerl serve``: the CME reward service (one process, or N replicas on Ray Serve)."""

from __future__ import annotations

import math

import typer
from rich.console import Console
from rich.markup import escape

from cmerl.cli.app import app, dtype_option, input_errors
from cmerl.formatting import RenderConfig
from cmerl.integrations.openrlhf import DEFAULT_STOP_STRINGS


@app.command()
def serve(
    verifier: str = typer.Option(..., "--verifier", "-v", help="Model name: packaged alias, HF folder, .gguf, hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the service to the network)."),
    port: int = typer.Option(8000, help="TCP port (0: any free port, printed once bound)."),
    dtype: str = dtype_option("Verifier weights"),
    device: str = typer.Option("cpu", help="Torch device of the verifier (cpu, cuda, cuda:1, ...)."),
    system_prompt: str = typer.Option(None, help="System turn used when rendering text pairs."),
    include_eos: bool = typer.Option(False, help="Also score the verifier's end-of-turn token."),
    batch_tokens: int = typer.Option(4096, help="Token budget of one forward batch."),
    max_length: int = typer.Option(None, help="Context limit in tokens (default: the model's)."),
    batching: bool = typer.Option(True, help="Merge concurrent requests into engine batches."),
    batch_items: int = typer.Option(64, help="Most items merged into one engine call."),
    batch_wait_ms: float = typer.Option(5.0, help="How long a request may wait for others to batch with."),
    max_queue: int = typer.Option(4096, help="Items allowed to wait for the engine before answering 503."),
    max_items: int = typer.Option(1024, help="Most items in one request (413 above)."),
    max_body_mb: float = typer.Option(16.0, help="Largest request body in MiB (413 above)."),
    logprob_floor: float = typer.Option(-20.0, help="Per-token log-prob floor of CME scores (natural log)."),
    empty_score: float = typer.Option(None, help="Score of an empty response (default: the floor)."),
    prompt_mode: str = typer.Option("chat", help="/get_reward prompts: chat (verifier template around the "
                                                 "prompt), label (around the label), verbatim (prompt text as is)."),
    strip: list[str] = typer.Option(None, help="Stop string to strip from /get_reward responses (repeatable; "
                                               "default: common EOS/end-of-turn strings)."),
    served_name: str = typer.Option(None, help="Model name reported by /v1/models (default: --verifier)."),
    ray: bool = typer.Option(False, "--ray", help="Deploy on Ray Serve instead of one uvicorn process."),
    replicas: int = typer.Option(1, help="Ray Serve replicas (each loads the verifier once)."),
    ray_address: str = typer.Option(None, help="Ray cluster to join ('auto', 'ray://...'; 'local' starts one)."),
    replica_cpus: float = typer.Option(1.0, help="CPUs reserved per Ray replica."),
    replica_gpus: float = typer.Option(0.0, help="GPUs reserved per Ray replica."),
    threads: int = typer.Option(None, help="Torch CPU threads of the engine (default: torch's choice)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve a verifier over HTTP: /score, /get_reward (OpenRLHF), /v1/completions (vLLM prompt_logprobs),
    /health, /metrics. Set CMERL_API_KEY to require 'Authorization: Bearer <key>'."""
    # deferred: fastapi, via cmerl.serving.app and cmerl.serving.run (server only)
    from cmerl.serving.app import ServerConfig
    from cmerl.serving.run import PortUnavailableError, VerifierSpec, serve_http

    console = Console(stderr=True, soft_wrap=True)
    try:
        check_flags(port=port, max_body_mb=max_body_mb, replicas=replicas, replica_cpus=replica_cpus,
                    replica_gpus=replica_gpus, log_level=log_level, ray=ray)
        spec = VerifierSpec(verifier, dtype=dtype, device=device,
                            render=RenderConfig(system_prompt=system_prompt, include_eos=include_eos),
                            max_batch_tokens=batch_tokens, max_length=max_length, threads=threads,
                            extra={"logprob_floor": logprob_floor, "empty_score": empty_score})
        config = ServerConfig(max_batch_items=batch_items, max_wait_ms=batch_wait_ms, batching=batching,
                              max_queue_items=max_queue, max_items=max_items,
                              max_body_bytes=int(max_body_mb * 1024 * 1024), prompt_mode=prompt_mode,
                              stop_strings=tuple(strip) if strip else DEFAULT_STOP_STRINGS,
                              served_name=served_name or verifier)
        ServerConfig(logprob_floor=logprob_floor, empty_score=empty_score)  # the same bounds as per request
    except ValueError as exc:
        console.print(f"[red]error: {escape(flag_message(str(exc)))}[/red]")
        raise typer.Exit(2) from None
    url = f"http://{host}:{port}"
    if ray:
        # deferred: ray, via cmerl.serving.ray_serve (optional extra)
        from cmerl.serving.ray_serve import serve_ray

        console.print(f"starting Ray Serve with {replicas} replica(s) of {verifier} ...")
        serve_ray(spec, config, host=host, port=port, replicas=replicas,
                  address=ray_address, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                  on_ready=lambda: console.print(f"cmerl reward service ({replicas} Ray replicas) on {url}"))
        return
    try:
        serve_http(spec, config, host=host, port=port, log_level=log_level,
                   on_bound=lambda: console.print(f"loading verifier {verifier} ..."),
                   on_ready=lambda v, bound: console.print(f"cmerl reward service for {v.name} on {bound} "
                                                           f"(batching {'on' if batching else 'off'}; Ctrl-C stops)"))
    except PortUnavailableError as exc:
        console.print(f"[red]error: {escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    except input_errors(ValueError) as exc:
        console.print(f"[red]cannot load verifier {escape(repr(verifier))}: {escape(str(exc))}[/red]")
        raise typer.Exit(1) from None


#: The flag behind each setting a config object names in its errors.
FLAGS = {"max_batch_items": "--batch-items", "max_queue_items": "--max-queue", "max_wait_ms": "--batch-wait-ms",
         "max_items": "--max-items", "max_body_bytes": "--max-body-mb", "max_batch_tokens": "--batch-tokens",
         "max_length": "--max-length", "threads": "--threads", "logprob_floor": "--logprob-floor",
         "empty_score": "--empty-score", "unknown prompt mode": "--prompt-mode", "unknown dtype": "--dtype"}


def flag_message(message: str) -> str:
    """A config error as the flag that set the value: ``"--batch-items: max_batch_items must be ..."``."""
    flag = next((f for key, f in FLAGS.items() if message.startswith(key)), None)
    return f"{flag}: {message}" if flag else message


def check_flags(*, port: int, max_body_mb: float, replicas: int, replica_cpus: float, replica_gpus: float,
                log_level: str, ray: bool) -> None:
    """The flags that no config object checks, refused before anything loads (ValueError naming the flag)."""
    from cmerl.serving.run import LOG_LEVELS  # deferred: fastapi, via cmerl.serving.run (server only)

    if isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (got {port}; 0 picks a free port)")
    if not (math.isfinite(max_body_mb) and max_body_mb > 0):
        raise ValueError(f"--max-body-mb must be a positive number (got {max_body_mb})")
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1 (got {replicas})")
    for flag, value in (("--replica-cpus", replica_cpus), ("--replica-gpus", replica_gpus)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a number >= 0 (got {value})")
    if ray and port == 0:
        raise ValueError("--port 0 (any free port) is not supported with --ray; pass a port")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)} (got {log_level!r})")
