"""The `frontier` command: serve, pull, models, distill."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

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
                            access_log=False,  # service/api/edge.py logs each request with its x-request-id
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


def _pull_ids(settings: Settings, ids: list[str], progress: bool, force: bool, drafts: bool = True) -> None:
    from service.pool.manifest import ManifestError, Registry
    from service.pool.sources import PullError
    from service.pool.sources import pull as pull_model

    registry = Registry(settings.manifests_dir)
    queue = list(dict.fromkeys(ids))
    for model_id in queue:  # grows: a model's speculative draft is pulled with it
        try:
            m = registry.get(model_id)
            path = pull_model(m, settings.models_dir, progress=progress, force=force, registry=registry)
        except (ManifestError, PullError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{model_id}: ready at {path}", err=True)
        draft = m.speculative.model
        if drafts and draft and draft not in queue:
            queue.append(draft)


@app.command()
def distill(
    out: Annotated[Path, typer.Option(help="the full draft model directory to write (loadable as is)")],
    teacher: Annotated[str, typer.Option(help="the model to distill (pulled if missing)")] = "smollm2-135m-instruct",
    layers: Annotated[int, typer.Option(min=1, help="student layers")] = 2,
    init: Annotated[str | None, typer.Option(help="teacher layers the student starts from, e.g. 0,29 "
                                                  "(default: the first LAYERS)")] = None,
    compact: Annotated[Path | None, typer.Option(help="the compact student file (trained tensors only, fp16) "
                                                      "(default: OUT.safetensors)")] = None,
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 300,
    tokens_per_step: Annotated[int, typer.Option(min=1, help="tokens per step (whole sequences)")] = 320,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (warm-up, then cosine)")] = 3e-3,
    max_tokens: Annotated[int, typer.Option(min=1, help="longest teacher answer")] = 160,
    seed: Annotated[int, typer.Option(help="seeds the teacher's sampling and the batches")] = 0,
    cache: Annotated[Path | None, typer.Option(help="keep the teacher's answers and hidden states here; "
                                                    "a rerun with the same settings reuses them")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (0: every core)")] = 0,
):
    """Distill a small draft model (for speculative decoding) from a chat model, on its own answers."""
    import json
    import os

    import torch

    from service.distill.run import DistillConfig
    from service.distill.run import distill as run_distill
    from service.distill.train import TrainConfig
    from service.pool.manifest import Registry
    from service.pool.sources import model_dir

    settings = _settings()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    _pull_ids(settings, [teacher], progress=True, force=False, drafts=False)  # its draft may be what we rebuild
    teacher_dir = model_dir(settings.models_dir, Registry(settings.manifests_dir).get(teacher))
    cfg = DistillConfig(
        layers=layers, init=tuple(int(i) for i in init.split(",")) if init else None, max_tokens=max_tokens,
        kernel_cache=settings.models_dir / "kernels.json",
        train=TrainConfig(steps=steps, tokens_per_step=tokens_per_step, lr=lr, seed=seed))
    compact = compact or out.with_name(out.name + ".safetensors")
    report = run_distill(teacher_dir, out, compact, cfg, teacher_id=teacher, cache=cache,
                         log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(report))


@app.command("train-vision")
def train_vision(
    out: Annotated[Path, typer.Option(help="the folder the adapter folder (NAME) is written into")] = Path("models/vision"),
    lm: Annotated[str, typer.Option(help="the frozen chat model (pulled if missing)")] = "smollm2-135m-instruct",
    name: Annotated[str | None, typer.Option(help="the adapter folder (default: LM without -instruct, "
                                                  "plus -vision)")] = None,
    minutes: Annotated[float, typer.Option(min=1, help="time bound of the whole run (rendering included)")] = 20.0,
    steps: Annotated[int, typer.Option(min=1, help="LM-stage steps (fewer if MINUTES runs out first)")] = 600,
    warmup_steps: Annotated[int, typer.Option(min=1, help="warm-up steps (no LM forward)")] = 800,
    batch: Annotated[int, typer.Option(min=1, help="LM-stage batch (images)")] = 16,
    lr: Annotated[float, typer.Option(help="projector learning rate (encoder: 0.3x; warm-up, then cosine)")] = 1e-3,
    images: Annotated[int, typer.Option(min=64, help="training images rendered")] = 20000,
    seed: Annotated[int, typer.Option(help="seeds the adapter's initialisation and the batches")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
):
    """Train a vision adapter (encoder + projector) into a frozen chat model on generated images."""
    import json

    import torch

    from service.multimodal.vision.run import VisionConfig
    from service.multimodal.vision.run import train_vision as run_train_vision
    from service.multimodal.vision.train import TrainConfig
    from service.pool.manifest import Registry
    from service.pool.sources import model_dir

    settings = _settings()
    torch.set_num_threads(threads)
    _pull_ids(settings, [lm], progress=True, force=False, drafts=False)
    lm_dir = model_dir(settings.models_dir, Registry(settings.manifests_dir).get(lm))
    cfg = VisionConfig(train_images=images, minutes=minutes,
                       train=TrainConfig(steps=steps, warmup_steps=warmup_steps, batch=batch, lr=lr, seed=seed))
    target = out / (name or lm.removesuffix("-instruct") + "-vision")
    report = run_train_vision(lm_dir, target, cfg, lm_id=lm, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(report, default=str))


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
