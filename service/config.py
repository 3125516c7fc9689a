"""Settings at the edge: FRONTIER_* environment variables, an optional YAML file, CLI overrides.

Engines never read Settings directly: the pool turns them (with the model's manifest) into one
frozen `EngineConfig` (service/pool/pool.py `engine_config`), and runtime measurements (KV blocks
that fit, say) are never written back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.engine.config import DEFAULT_KV_CACHE_BYTES, MAX_SPECULATIVE_TOKENS, Quantization  # torch-free

REPO_MANIFESTS = Path(__file__).resolve().parent.parent / "models"


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "frontier" / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRONTIER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    config_file: Path | None = Field(default=None, description="optional YAML file with these keys")
    manifests_dir: Path = REPO_MANIFESTS
    models_dir: Path = Field(default_factory=_default_models_dir)
    data_dir: Path = Path("data")  # durable state (RAG collections)
    # Models loaded at start; others listed in manifests load on first use if pulled.
    models: list[str] = ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    default_chat_model: str = "smollm2-135m-instruct"
    default_embedding_model: str = "all-minilm-l6-v2"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    engine: str = "auto"  # auto (native where the architecture is supported) | native | hf
    quantization: Quantization | None = None  # override every manifest's default: none | int8 | bf16
    # quantization int8 on CPU: each linear shape runs the faster of int8 and fp16 weights, measured at
    # load and cached per CPU in models_dir/kernels.json; cpu_kernels forces one for every layer.
    cpu_kernels: Literal["auto", "int8", "fp16"] = "auto"
    # int8 kernel scheme: auto (a8w8 where the CPU's int8 kernel is exact, i.e. VNNI; else a7w8r)
    int8_scheme: Literal["auto", "a8w8", "a7w8r"] = "auto"  # service/modeling/int8_linear.py (a7w8: bench only)
    max_model_len: int | None = None  # cap on context length (default: the model's)
    max_waiting_requests: int = 256  # sequences (prompts x n) queued per engine before 429s
    # Bounded work per request (400 naming the limit past them); see service/serving/params.py.
    max_sequences_per_request: int = 64  # prompts x n of one completions/chat request
    max_embedding_inputs: int = 2048  # inputs of one /v1/embeddings call
    max_embedding_tokens: int = 65536  # tokens (after truncation) of one /v1/embeddings call
    request_timeout_s: float | None = None  # deadline of one generation; None = no deadline
    # Structured output (service/structured/grammar.py `closed`): strings a schema leaves unbounded are
    # generated with at most this many characters (0: no cap), so a looping model still closes them.
    structured_max_string: int = Field(default=512, ge=0)
    # Graceful stop (SIGTERM; service/api/drain.py): new requests get 503 at once; generations in flight
    # may run this long, then end with an error event (streams) or a 503 (non-streamed).
    shutdown_drain_s: float = Field(default=20.0, ge=0)
    # ...then other requests still running (RAG writes, embeddings) get this long before they are cancelled.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Native engine (per loaded model): the paged KV pool and the continuous-batching scheduler.
    kv_cache_memory_bytes: int = Field(default=DEFAULT_KV_CACHE_BYTES, ge=1)
    kv_block_size: int = Field(default=16, ge=1)  # tokens per KV block (prefix caching shares whole blocks)
    max_num_seqs: int = Field(default=64, ge=1)  # sequences running in one step
    max_num_batched_tokens: int = Field(default=256, ge=1)  # tokens per step: decode rows + prefill chunks
    enable_prefix_caching: bool = True  # reuse computed prompt blocks across requests
    # Speculative decoding defaults (native engine): auto = each manifest's `speculative`; off / ngram /
    # draft override every manifest. A request's `speculative` wins over both (service/serving/params.py).
    speculative_method: Literal["auto", "off", "ngram", "draft"] = "auto"
    speculative_model: str | None = None  # the draft model for method draft (default: the manifest's)
    speculative_num_tokens: int | None = Field(default=None, ge=1, le=MAX_SPECULATIVE_TOKENS)  # overrides the manifests' num_tokens
    # Nobody speculates while more sequences than this decode in one step (it stops paying under load).
    speculative_max_batch: int = Field(default=1, ge=0)
    memory_budget_bytes: int = 8 * 1024**3  # weights of all loaded models together
    api_key: str | None = None  # one key with every scope: "Authorization: Bearer <key>"
    max_request_bytes: int = 8 * 1024 * 1024  # any body, chunked or not (413 above)
    # Edge hardening (service/api/edge.py, auth.py, limits.py)
    api_keys: dict[str, Any] = {}  # FRONTIER_API_KEYS (JSON): key -> [scopes] or {scopes, *_per_minute}
    api_keys_file: Path | None = None  # YAML or JSON file, same shape (optionally under a top-level `keys:`)
    rate_limit_requests_per_minute: int | None = None  # default per key (None: unlimited)
    rate_limit_tokens_per_minute: int | None = None  # default per key: prompt estimate + max_tokens
    max_json_depth: int = 64  # deeper JSON bodies are a 400 before anything parses them
    metrics_enabled: bool = True  # GET /metrics
    metrics_require_auth: bool = True  # when API keys are configured, /metrics needs the admin scope
    max_tokens_default: int = 512
    num_threads: int | None = None  # torch intra-op threads (default: the cores available)
    # RAG (collections under data_dir/rag): defaults for new collections, limits, index tuning
    rag_chunk_size: int = 200  # tokens of the embedding model per chunk
    rag_chunk_overlap: int = 40  # tokens carried over between consecutive chunks
    rag_ann_threshold: int = 50_000  # exact (flat) search up to this many vectors, HNSW above
    rag_hnsw_m: int = 32
    rag_ef_construction: int = 64
    rag_ef_search: int = 128
    rag_max_file_bytes: int = 5 * 1024 * 1024  # per uploaded file (413 above)
    rag_max_chunks_per_request: int = 2000  # 413 above
    rag_max_documents_per_request: int = 256
    rag_save_interval_s: float = 2.0  # how often changed indexes are written (SQLite is the truth)
    log_level: str = "info"
    # --- Image intake for chat `image_url` parts (service/multimodal/, ImageLimits.from_settings);
    # a refused image is a 400 with code invalid_image.
    image_max_per_request: int = Field(default=8, ge=0)  # image parts in one request
    image_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)  # encoded bytes of one image
    # width x height from the file header, refused before decoding (keep below Pillow's ~89 MP guard)
    image_max_pixels: int = Field(default=40_000_000, ge=1)
    image_fetch_timeout_s: float = Field(default=10.0, gt=0)  # one URL: DNS, connect, redirects, body
    image_max_redirects: int = Field(default=3, ge=0)  # every hop is re-checked against the rules below
    # Image URLs resolving to loopback/private/link-local/metadata addresses are refused unless listed
    # here: host names (exact), IPs or CIDRs, e.g. FRONTIER_IMAGE_ALLOWED_HOSTS='["images.internal","10.0.0.0/8"]'
    image_allowed_hosts: list[str] = []
    # --- Responses API (POST /v1/responses; service/api/responses/store.py): responses stored with
    # `store: true` (the default) live in data_dir/responses.sqlite3 for previous_response_id and GET.
    # A stored conversation (earlier turns + input, JSON) larger than this is a 400 (conversation_too_large).
    responses_max_stored_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    responses_retention_s: float = Field(default=30 * 86400, gt=0)  # older stored responses are deleted

    @field_validator("speculative_method", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ):
        # Precedence: explicit arguments (CLI) > environment > YAML file > defaults.
        return init_settings, env_settings, _YamlSource(settings_cls)


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        import os

        path = os.environ.get("FRONTIER_CONFIG_FILE")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return data
