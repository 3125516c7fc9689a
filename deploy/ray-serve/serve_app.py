"""Frontier on Ray Serve: the unchanged FastAPI app, one copy per Ray Serve replica.

Ray Serve does the cluster work (placement, replica autoscaling on ongoing requests, health
checks, HTTP proxy on every node, rolling updates); this file only tells it how to build one
Frontier app inside a replica. Ray is an optional deployment path: it is not a dependency of the
`frontier` package, and nothing in the package or its tests imports this module.

    pip install "ray[serve]"            # next to an installed frontier (the image, or `pip install .`)
    cd deploy/ray-serve
    serve run config.yaml               # or: serve run serve_app:app / serve deploy config.yaml

Each replica:
  * pulls its start-up models into FRONTIER_MODELS_DIR when they are missing on that node (under a
    file lock, so replicas sharing a node pull once), like `frontier serve` does;
  * sets torch's threads to the CPUs Ray gave the replica (ray_actor_options.num_cpus), unless
    FRONTIER_NUM_THREADS says otherwise;
  * becomes RUNNING (gets traffic) only once its start-up models are loaded: the app's lifespan is
    wrapped to wait for what /ready waits for, and a load error fails the replica so Ray replaces it.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from ray import serve

log = logging.getLogger("frontier.ray_serve")

READY_TIMEOUT_S = float(os.environ.get("FRONTIER_RAY_READY_TIMEOUT_S", "900"))


def _settings():
    from service.config import Settings

    overrides = {}
    if not os.environ.get("FRONTIER_NUM_THREADS"):
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            overrides["num_threads"] = max(1, int(cpus))
    return Settings(**overrides)


def _pull_missing(settings) -> None:
    """`frontier serve`'s pull of missing start-up models, serialized between replicas on a node."""
    from service.pool.manifest import Registry
    from service.pool.sources import is_pulled, pull

    registry = Registry(settings.manifests_dir)
    manifests = [registry.get(model_id) for model_id in settings.models]
    if all(is_pulled(settings.models_dir, m) for m in manifests):
        return
    models_dir = Path(settings.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".pull.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica on this node may be pulling the same files
        for m in manifests:
            pull(m, models_dir, progress=False)  # idempotent: returns at once when already there


async def _wait_until_loaded(state) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    while True:
        if state.load_error:
            raise RuntimeError(f"frontier could not load its start-up models: {state.load_error}")
        missing = [m for m in state.settings.models if m not in state.pool.loaded]
        if not missing:
            return
        if loop.time() > deadline:
            raise RuntimeError(f"frontier models not loaded after {READY_TIMEOUT_S:.0f} s: {missing}")
        await asyncio.sleep(0.5)


def build_frontier_app():
    """Builder that @serve.ingress calls inside each replica (the app is never pickled)."""
    from service.api.app import create_app

    settings = _settings()
    _pull_missing(settings)
    app = create_app(settings)
    app_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan_until_ready(a):
        async with app_lifespan(a) as state:
            await _wait_until_loaded(a.state.frontier)
            yield state

    app.router.lifespan_context = lifespan_until_ready
    return app


@serve.deployment(
    name="frontier",
    # One replica = one Frontier process with its own engine: give it whole cores.
    ray_actor_options={"num_cpus": 2},
    # Replicas follow the number of in-flight requests per replica (Ray Serve's own autoscaler).
    autoscaling_config={
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 30,
        "downscale_delay_s": 600,  # a new replica needs minutes (pull + load): scale down slowly
    },
    # Above this Ray queues in the proxy/router instead of the engine's waiting queue.
    max_ongoing_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress(build_frontier_app)
class FrontierDeployment:
    """Routes come from Frontier's app; this class only adds Ray's health check."""

    def check_health(self) -> None:
        state = self.app.state.frontier
        if state.load_error:
            raise RuntimeError(state.load_error)


# `serve run serve_app:app`; config.yaml overrides the options above per deployment.
app = FrontierDeployment.bind()
