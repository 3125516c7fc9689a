"""Scale Frontier past one machine on Ray Serve (an existing engine; no home-made cluster).

Each replica is one Frontier app (one engine owning its cores); Ray Serve routes requests and
autoscales replicas on queue length. Ray is an optional deployment dependency, not a project
dependency:   pip install "ray[serve]" && serve run deploy/ray-serve/config.yaml
"""

from __future__ import annotations

from ray import serve

from service.api.app import create_app
from service.config import Settings

app = create_app(Settings())


@serve.deployment(
    ray_actor_options={"num_cpus": 2},
    autoscaling_config={"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 16},
    max_ongoing_requests=64,
)
@serve.ingress(app)
class Frontier:
    """FastAPI routes are served as they are; the app's lifespan loads the models per replica."""


frontier = Frontier.bind()
