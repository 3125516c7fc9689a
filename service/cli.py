"""The `frontier` command: serve, pull, models."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

from service.config import Settings

app = typer.Typer(help="Frontier: an OpenAI-compatible model server.", no_args_is_help=True)


def _settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="bind address (FRONTIER_HOST, default 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (FRONTIER_PORT, default 8000)"),
    models: Optional[str] = typer.Option(None, help="comma-separated model ids to load at start"),
    pull_missing: bool = typer.Option(True, help="pull the start-up models first if they are missing"),
):
    """Start the HTTP server (one uvicorn worker: the engine owns the cores)."""
    import uvicorn

    from service.api.app import create_app
    from service.api.drain import DrainingServer

    settings = _settings(host=host, port=port, models=models.split(",") if models else None)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if pull_missing:
        _pull_ids(settings, settings.models, progress=True, force=False)
    app_ = create_app(settings)
    config = uvicorn.Config(app_, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s)
    DrainingServer(config, app_.state.frontier.drain).run()  # SIGTERM: drain, then stop; exits 0


@app.command()
def pull(
    model_ids: list[str] = typer.Argument(None, help="model ids (default: the start-up models)"),
    force: bool = typer.Option(False, help="download and convert again even if cached"),
):
    """Download, verify and convert models into the models directory."""
    settings = _settings()
    _pull_ids(settings, model_ids or settings.models, progress=True, force=force)


def _pull_ids(settings: Settings, ids: list[str], progress: bool, force: bool) -> None:
    from service.pool.manifest import ManifestError, Registry
    from service.pool.sources import PullError
    from service.pool.sources import pull as pull_model

    registry = Registry(settings.manifests_dir)
    for model_id in ids:
        try:
            path = pull_model(registry.get(model_id), settings.models_dir, progress=progress, force=force)
        except (ManifestError, PullError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{model_id}: ready at {path}", err=True)


@app.command("models")
def list_models():
    """List known models and whether they are pulled."""
    from service.pool.manifest import Registry
    from service.pool.sources import is_pulled

    settings = _settings()
    registry = Registry(settings.manifests_dir)
    for model_id in registry.ids():
        m = registry.get(model_id)
        state = "pulled" if is_pulled(settings.models_dir, m) else "not pulled"
        typer.echo(f"{model_id:28} {m.task.value:12} {m.architecture:10} {state}")


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
