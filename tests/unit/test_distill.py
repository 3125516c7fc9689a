"""service/distill (`frontier distill`) and the `distilled` manifest source, on a tiny random
4-layer Llama teacher built from a config: distillation must lower the held-out KL, its outputs
must load through the native loader and transformers alike, and `pull` must assemble a draft from
a compact student and its pulled teacher (and refuse a corrupt one)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from service.distill import student as S
from service.distill.run import DistillConfig, distill
from service.distill.train import TrainConfig, evaluate, runs
from service.pool import sources
from service.pool.manifest import ManifestError, Registry
from service.pool.sources import MARKER, PullError, is_pulled, pull
from tests.unit.conftest import build_tokenizer

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = [f"{a} {b}" for a in ("hello world", "the quick fox", "café déjà vu", "stop here")
           for b in ("please", "and then", "this is a test", "emoji 🙂")]  # 16: indices 7 and 15 held out


def _save_teacher(path: Path, layers: int = 4, seed: int = 0) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharper (tied) logits: greedy choices are not near-ties
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return _save_teacher(tmp_path_factory.mktemp("teacher"))


def _logits_native(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from service.modeling.loader import load_model

    model = load_model(path)
    with torch.inference_mode():
        return model.compute_logits(model(ids))


def _logits_hf(path_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.inference_mode():
        return model.eval()(ids[None]).logits[0].float()


# ---------------------------------------------------------------- student construction and metrics


def test_a_student_of_every_teacher_layer_is_the_teacher(teacher_dir):
    """The construction is exact: all layers in order give the teacher's logits; the embeddings
    (tied with lm_head) are frozen, everything else trains."""
    ids = torch.tensor([5, 17, 99, 3, 42, 7])
    full = S.build_student(teacher_dir, [0, 1, 2, 3])
    torch.testing.assert_close(_logits_hf(full, ids), _logits_hf(teacher_dir, ids), atol=1e-5, rtol=1e-5)
    two = S.build_student(teacher_dir, [0, 3])
    assert two.config.num_hidden_layers == 2 and two.lm_head.weight is two.model.embed_tokens.weight
    assert not two.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in two.named_parameters() if "embed_tokens" not in n)
    assert set(S.trained_tensors(two)) == {S.NORM} | {
        n for n, _ in two.named_parameters() if n.startswith("model.layers.")}
    with pytest.raises(ValueError, match="out of range"):
        S.build_student(teacher_dir, [0, 4])


def test_default_init_takes_the_first_layers():
    assert S.default_init(2) == [0, 1] and S.default_init(1) == [0]


def test_runs_count_consecutive_agreements():
    agree = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    assert runs(agree).tolist() == [2, 1, 0, 5, 4, 3, 2, 1, 0]
    assert runs(torch.zeros(0, dtype=torch.bool)).tolist() == []


def test_evaluate_scores_only_the_answer_positions(teacher_dir):
    """A student equal to its teacher agrees everywhere: each draft position's run is capped at k
    and cut by the sequence's end; KL is zero."""
    model = S.build_student(teacher_dir, [0, 1, 2, 3])
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    ids = torch.tensor([5, 17, 99, 3, 42, 7, 8, 9, 10, 11])
    with torch.inference_mode():
        hidden = teacher.model(ids[None]).last_hidden_state[0]
    out = evaluate(model, [(ids, hidden, 4)], k=4)
    # answer tokens at positions 4..9 are predicted at 3..8: runs 6,5,4,3,2,1 capped at 4
    assert out["positions"] == 6 and out["agreement"] == 1.0
    assert out["accepted_at_4"] == pytest.approx((4 + 4 + 4 + 3 + 2 + 1) / 6, abs=1e-3)
    assert abs(out["kl"]) < 1e-4


# ---------------------------------------------------------------- distillation end to end


@pytest.fixture(scope="module")
def distilled(teacher_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("distilled")
    prompts = work / "prompts.txt"
    prompts.write_text("# tiny\n" + "\n".join(PROMPTS) + "\n")
    cfg = DistillConfig(layers=2, max_tokens=12, prompts=prompts, quantization="none",
                        train=TrainConfig(steps=40, tokens_per_step=96, lr=3e-3, warmup=5, bf16=False))
    torch.set_num_threads(2)
    report = distill(teacher_dir, work / "draft", work / "draft.safetensors", cfg, teacher_id="tiny",
                     cache=work / "cache.pt", log=lambda _: None)
    return work, cfg, report


def test_distillation_lowers_the_held_out_kl(distilled):
    _, _, report = distilled
    assert report["init"] == [0, 1] and report["layers"] == 2
    assert report["train_examples"] == 14 and report["held_out_examples"] == 2
    before, after = report["before"], report["after"]
    assert after["kl"] < 0.7 * before["kl"], (before, after)
    assert after["positions"] == before["positions"] > 0 and 0.0 <= after["agreement"] <= 1.0
    assert report["training"]["steps"] == 40 and report["training"]["bf16"] is False


def test_distilled_outputs_load_natively_and_in_transformers(distilled, teacher_dir):
    work, _, report = distilled
    out, compact = work / "draft", work / "draft.safetensors"
    assert report["compact_bytes"] == compact.stat().st_size
    assert report["compact_sha256"] == hashlib.sha256(compact.read_bytes()).hexdigest()
    with safe_open(str(compact), framework="pt") as st:
        meta, names = st.metadata(), set(st.keys())
        compact_tensors = {n: st.get_tensor(n) for n in names}
    assert meta["format"] == S.FORMAT and meta["teacher"] == "tiny" and meta["teacher_layers"] == "0,1"
    assert all(t.dtype == torch.float16 for t in compact_tensors.values())
    assert S.EMBED not in names and S.num_layers(names) == 2  # only the trained tensors
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["tie_word_embeddings"]
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        for n, t in compact_tensors.items():
            torch.testing.assert_close(st.get_tensor(n), t.float(), atol=0, rtol=0)
        embed = st.get_tensor(S.EMBED)
    torch.testing.assert_close(embed, S.teacher_tensors(teacher_dir, [S.EMBED])[S.EMBED], atol=0, rtol=0)
    ids = torch.tensor([5, 17, 99, 3, 42, 7, 200, 1])
    torch.testing.assert_close(_logits_native(out, ids), _logits_hf(out, ids), atol=1e-4, rtol=1e-4)


def test_cached_teacher_data_is_reused(distilled, teacher_dir, monkeypatch):
    from service.distill import data
    from service.distill.run import prepare

    work, cfg, _ = distilled

    def no_generation(*a, **kw):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(data, "generate", no_generation)
    train, held, hidden = prepare(teacher_dir, cfg, work / "cache.pt", log=lambda _: None)
    assert len(train) == 14 and len(held) == 2 and len(hidden) == 16
    assert {e.temperature for e in train} == {0.0, 0.7} and {e.temperature for e in held} == {0.0}
    assert all(h.shape == (len(e.ids), 64) for e, h in zip(train + held, hidden))


# ---------------------------------------------------------------- pull: source kind "distilled"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def draft_registry(tmp_path, teacher_dir, monkeypatch):
    """A registry with a teacher (a local "GGUF" whose conversion copies the tiny teacher, so that
    it must be pulled into models_dir first) and a draft distilled from it, named by the teacher's
    speculative section."""
    reg_dir = tmp_path / "manifests"
    (reg_dir / "drafts").mkdir(parents=True)
    student = S.build_student(teacher_dir, [0, 3])
    compact = S.save_compact(S.trained_tensors(student), reg_dir / "drafts" / "tiny-draft.safetensors",
                             {"teacher": "tiny"})
    src = tmp_path / "src"
    src.mkdir()
    (src / "tiny.gguf").write_bytes(b"GGUF stand-in")
    (reg_dir / "tiny.yaml").write_text(yaml.safe_dump({
        "id": "tiny", "task": "chat", "architecture": "llama", "license": "MIT",
        "source": {"kind": "local", "path": str(src)}, "format": "gguf", "gguf_file": "tiny.gguf",
        "files": [{"name": "tiny.gguf", "sha256": _sha(src / "tiny.gguf")}],
        "speculative": {"method": "draft", "model": "tiny-draft"}}))
    (reg_dir / "tiny-draft.yaml").write_text(yaml.safe_dump({
        "id": "tiny-draft", "task": "completion", "architecture": "llama", "license": "MIT",
        "source": {"kind": "distilled", "teacher": "tiny", "path": "drafts/tiny-draft.safetensors"},
        "files": [{"name": "tiny-draft.safetensors", "sha256": _sha(compact)}]}))

    def convert(m, raw, out):
        shutil.copytree(teacher_dir, out)

    monkeypatch.setattr(sources, "_convert_gguf", convert)
    return Registry(reg_dir), student


def test_pull_assembles_a_distilled_draft_after_its_teacher(tmp_path, draft_registry):
    registry, student = draft_registry
    models_dir = tmp_path / "models"
    draft = registry.get("tiny-draft")
    final = pull(draft, models_dir, progress=False, registry=registry)
    assert final == models_dir / "tiny-draft"
    assert is_pulled(models_dir, registry.get("tiny"))  # the teacher came first
    assert is_pulled(models_dir, draft) and (final / MARKER).exists()
    assert sorted(p.name for p in models_dir.iterdir()) == ["tiny", "tiny-draft"]  # no partial dirs
    assert json.loads((final / "config.json").read_text())["num_hidden_layers"] == 2
    ids = torch.tensor([5, 17, 99, 3, 42, 7])
    native = _logits_native(final, ids)
    torch.testing.assert_close(native, _logits_hf(final, ids), atol=1e-4, rtol=1e-4)
    # the fp16 compact file is all that was rounded: close to the fp32 student it came from
    torch.testing.assert_close(native, _logits_hf(student, ids), atol=2e-2, rtol=1e-2)
    # idempotent
    assert pull(draft, models_dir, progress=False, registry=registry) == final


def test_distilled_checksum_mismatch_is_a_pull_error(tmp_path, draft_registry):
    registry, _ = draft_registry
    models_dir = tmp_path / "models"
    bad = registry.get("tiny-draft").model_copy(deep=True)
    bad.files[0].sha256 = "0" * 64
    with pytest.raises(PullError, match="checksum mismatch for tiny-draft.safetensors"):
        pull(bad, models_dir, progress=False, registry=registry)
    assert not (models_dir / "tiny-draft").exists() and not list(models_dir.glob(".tiny-draft.partial-*"))


def test_distilled_pull_needs_the_registry_and_a_known_teacher(tmp_path, draft_registry):
    registry, _ = draft_registry
    draft = registry.get("tiny-draft")
    with pytest.raises(PullError, match="registry"):
        pull(draft, tmp_path / "models", progress=False)
    orphan = draft.model_copy(update={"source": draft.source.model_copy(update={"teacher": "nope"})})
    with pytest.raises(ManifestError, match="unknown model 'nope'"):
        pull(orphan, tmp_path / "models", progress=False, registry=registry)


def test_distilled_student_that_does_not_fit_the_teacher_is_a_pull_error(tmp_path, draft_registry):
    registry, _ = draft_registry
    other = _save_teacher(tmp_path / "wide", layers=2)
    cfg = json.loads((other / "config.json").read_text())
    cfg["hidden_size"] = 32  # the student's norm (64) no longer fits
    (other / "config.json").write_text(json.dumps(cfg))
    wrong = registry.get("tiny-draft")
    with pytest.raises(PullError, match="cannot assemble"):
        sources._assemble_distilled(wrong, registry.dir / "drafts", tmp_path / "out", other)


def test_frontier_pull_also_pulls_the_draft_a_manifest_names(tmp_path, draft_registry, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    registry, _ = draft_registry
    monkeypatch.setenv("FRONTIER_MANIFESTS_DIR", str(registry.dir))
    monkeypatch.setenv("FRONTIER_MODELS_DIR", str(tmp_path / "models"))
    result = CliRunner().invoke(app, ["pull", "tiny"])
    assert result.exit_code == 0, result.output
    assert is_pulled(tmp_path / "models", registry.get("tiny-draft"))
