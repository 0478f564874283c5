"""``cmerl serve``: the CME reward service (one process, or N replicas on Ray Serve)."""

from __future__ import annotations

import typer

from cmerl.cli.app import app, dtype_option, input_errors


@app.command()
def serve(
    verifier: str = typer.Option(..., "--verifier", "-v", help="Model name: packaged alias, HF folder, .gguf, hub id."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes the service to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
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
    from rich.console import Console

    from cmerl.formatting import RenderConfig
    from cmerl.integrations.openrlhf import DEFAULT_STOP_STRINGS
    from cmerl.serving.app import ServerConfig
    from cmerl.serving.run import VerifierSpec, serve_http

    console = Console(stderr=True, soft_wrap=True)
    spec = VerifierSpec(verifier, dtype=dtype, device=device,
                        render=RenderConfig(system_prompt=system_prompt, include_eos=include_eos),
                        max_batch_tokens=batch_tokens, max_length=max_length, threads=threads,
                        extra={"logprob_floor": logprob_floor, "empty_score": empty_score})
    try:
        config = ServerConfig(max_batch_items=batch_items, max_wait_ms=batch_wait_ms, batching=batching,
                              max_queue_items=max_queue, max_items=max_items,
                              max_body_bytes=int(max_body_mb * 1024 * 1024), prompt_mode=prompt_mode,
                              stop_strings=tuple(strip) if strip else DEFAULT_STOP_STRINGS,
                              served_name=served_name or verifier)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    url = f"http://{host}:{port}"
    if ray:
        from cmerl.serving.ray_serve import serve_ray

        console.print(f"starting Ray Serve with {replicas} replica(s) of {verifier} ...")
        serve_ray(spec, config, host=host, port=port, replicas=replicas,
                  address=ray_address, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
                  on_ready=lambda: console.print(f"cmerl reward service ({replicas} Ray replicas) on {url}"))
        return
    console.print(f"loading verifier {verifier} ...")
    try:
        serve_http(spec, config, host=host, port=port, log_level=log_level,
                   on_ready=lambda v: console.print(f"cmerl reward service for {v.name} on {url} "
                                                    f"(batching {'on' if batching else 'off'}; Ctrl-C stops)"))
    except input_errors() as exc:
        console.print(f"[red]cannot load verifier {verifier!r}: {exc}[/red]")
        raise typer.Exit(1) from None
