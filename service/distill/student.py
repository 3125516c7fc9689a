"""The student: the teacher's architecture with fewer layers, and the files it ships as.

Why start from teacher layers rather than random weights: the student keeps the teacher's
embeddings (tied with lm_head) and final norm, so teacher layers already speak the residual
stream's "language"; a couple of hundred steps then only have to bridge the missing depth.

Why two files: the compact student (its L layers and final norm, fp16, Hugging Face names) is all
that distillation produced, ~7 MB a layer, small enough to keep in the repository; the embeddings
(28 M parameters) are the teacher's and come from the pulled teacher. `assemble` joins the two into
an ordinary model directory that the native loader and transformers both read.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)$")
FORMAT = "frontier-draft-v1"  # safetensors metadata "format" of a compact student


def teacher_tensors(teacher_dir: Path, wanted) -> dict[str, torch.Tensor]:
    """The named tensors of the teacher's safetensors (however many shards)."""
    from safetensors import safe_open

    wanted, found = set(wanted), {}
    for f in sorted(Path(teacher_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in wanted & set(st.keys()):
                found[name] = st.get_tensor(name)
    if missing := sorted(wanted - set(found)):
        raise ValueError(f"teacher {teacher_dir} lacks tensors {missing[:4]}")
    return found


def _names(teacher_dir: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(Path(teacher_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names += list(st.keys())
    return names


def default_init(layers: int) -> list[int]:
    """Teacher layers a student starts from: the first L. Measured on SmolLM2-135M (2 layers, same
    300 steps): first two 25.7% held-out greedy agreement, first + last 22.9% (README "Distilled
    draft"); the last layer alone expects a residual stream that 28 layers have built."""
    return list(range(layers))


def build_student(teacher_dir: Path, init: list[int]):
    """A transformers LlamaForCausalLM with len(init) layers copied from teacher layers `init`, the
    teacher's final norm and its embeddings (frozen: never trained, never stored)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(teacher_dir)
    if not config.tie_word_embeddings:
        raise ValueError("distillation needs a teacher with tied embeddings (lm_head = embed_tokens)")
    if not init or max(init) >= config.num_hidden_layers or min(init) < 0:
        raise ValueError(f"init layers {init} out of range for a {config.num_hidden_layers}-layer teacher")
    prefixes = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(init)}
    names = [n for n in _names(teacher_dir) if n in (EMBED, NORM) or any(n.startswith(p) for p in prefixes)]
    state = {}
    for name, t in teacher_tensors(teacher_dir, names).items():
        for src, dst in prefixes.items():
            if name.startswith(src):
                name = dst + name[len(src):]
        state[name] = t.float()
    config.num_hidden_layers = len(init)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def trained_tensors(model) -> dict[str, torch.Tensor]:
    """What distillation changed: the layers and the final norm, fp16, Hugging Face names."""
    return {n: p.detach().to(torch.float16).contiguous() for n, p in model.state_dict().items()
            if _LAYER.match(n) or n == NORM}


def save_compact(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, **metadata})
    return path


def num_layers(names) -> int:
    """The student's layer count from its tensor names; raises ValueError on anything else."""
    layers = set()
    for n in names:
        if m := _LAYER.match(n):
            layers.add(int(m.group(1)))
        elif n != NORM:
            raise ValueError(f"unexpected tensor {n!r} in a compact student (only layers and {NORM})")
    if NORM not in names or layers != set(range(len(layers))) or not layers:
        raise ValueError(f"a compact student needs {NORM} and layers 0..L-1; got layers {sorted(layers)}")
    return len(layers)


WEIGHT_FILES = (".safetensors", ".safetensors.index.json", ".gguf", ".bin", ".pt", ".pth")


def assemble(teacher_dir: Path, compact: Path, out: Path) -> Path:
    """A full model directory `out`: the teacher's config (num_hidden_layers = the student's) and
    tokenizer/generation files, model.safetensors = teacher embeddings + student tensors (in the
    teacher's dtype). Raises ValueError if the student does not fit the teacher."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    teacher_dir, out = Path(teacher_dir), Path(out)
    config = json.loads((teacher_dir / "config.json").read_text())
    with safe_open(str(compact), framework="pt") as st:
        student = {n: st.get_tensor(n) for n in st.keys()}  # noqa: SIM118 (not a dict)
    layers = num_layers(student)
    if not config.get("tie_word_embeddings"):
        raise ValueError("the teacher's lm_head is not tied to its embeddings: not a draft teacher")
    embed = teacher_tensors(teacher_dir, [EMBED])[EMBED]
    if student[NORM].shape != (config["hidden_size"],) or embed.shape[1] != config["hidden_size"]:
        raise ValueError(f"student hidden size {tuple(student[NORM].shape)} does not match the teacher's "
                         f"{config['hidden_size']}")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(teacher_dir.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.startswith(".") and not f.name.endswith(WEIGHT_FILES):
            shutil.copyfile(f, out / f.name)
    config["num_hidden_layers"] = layers
    config.pop("layer_types", None)  # per-layer lists (if any) would name the teacher's depth
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {EMBED: embed, **{n: t.to(embed.dtype) for n, t in student.items()}}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out
