"""Loading HF folders: sharding, dtype selection and the errors an operator reads in a pod log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm_runtime.models import DreamModel, LLaDAModel, ModelLoadError, load_model, load_model_files, parse_dtype
from tests.helpers.tiny_models import make_tiny_model_dir, write_weights

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture()
def golden_dir(tmp_path: Path) -> Path:
    """The golden tiny LLaDA as an HF folder (config.json + model.safetensors)."""
    shutil.copyfile(GOLDEN / "llada_tiny_config.json", tmp_path / "config.json")
    shutil.copyfile(GOLDEN / "llada_tiny.safetensors", tmp_path / "model.safetensors")
    return tmp_path


def _logits(model, ids=((248, 17, 99, 3, 250, 250),)) -> torch.Tensor:
    x = torch.tensor(ids)
    with torch.inference_mode():
        return model(x, model.position_ids(torch.ones_like(x, dtype=torch.bool)))


def _shard(folder: Path, n: int) -> list[str]:
    """Split model.safetensors into n shards + index, as `save_pretrained(max_shard_size=...)` does."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    return [p.name for p in write_weights(folder, state, n)]


def test_load_folder_equals_load_model_files(golden_dir):
    a = load_model(golden_dir)
    b = load_model_files(GOLDEN / "llada_tiny_config.json", [GOLDEN / "llada_tiny.safetensors"])
    assert isinstance(a, LLaDAModel)
    torch.testing.assert_close(_logits(a), _logits(b), atol=0, rtol=0)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_sharded_equals_single_file(golden_dir, tmp_path_factory):
    single = _logits(load_model(golden_dir))
    sharded_dir = tmp_path_factory.mktemp("sharded")
    shutil.copytree(golden_dir, sharded_dir, dirs_exist_ok=True)
    files = _shard(sharded_dir, 3)
    assert len(files) == 3 and not (sharded_dir / "model.safetensors").exists()
    torch.testing.assert_close(_logits(load_model(sharded_dir)), single, atol=0, rtol=0)


def test_dream_folder_loads_from_golden_files(tmp_path):
    shutil.copyfile(GOLDEN / "dream_tiny_config.json", tmp_path / "config.json")
    shutil.copyfile(GOLDEN / "dream_tiny.safetensors", tmp_path / "model.safetensors")
    assert isinstance(load_model(tmp_path), DreamModel)


@pytest.mark.parametrize(
    "arg, config_dtype, expected",
    [
        (None, None, torch.float32),  # stored tensors are fp32
        (None, "bfloat16", torch.bfloat16),  # config torch_dtype wins over storage
        ("auto", "float16", torch.float16),
        ("float32", "bfloat16", torch.float32),  # explicit argument wins over config
        ("bf16", None, torch.bfloat16),
        (torch.float16, None, torch.float16),
    ],
)
def test_dtype_selection(golden_dir, arg, config_dtype, expected):
    if config_dtype:
        cfg = json.loads((golden_dir / "config.json").read_text())
        cfg["torch_dtype"] = config_dtype
        (golden_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(golden_dir, dtype=arg)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert _logits(model).dtype == expected


def test_bad_dtype_is_a_value_error(golden_dir):
    with pytest.raises(ValueError, match="int8"):
        load_model(golden_dir, dtype="int8")
    assert parse_dtype("auto") is None and parse_dtype("torch.bfloat16") is torch.bfloat16


def test_cuda_request_without_cuda_is_clear(golden_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(golden_dir, device="cuda")
    assert next(load_model(golden_dir, device="auto").parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        load_model(golden_dir, device="gpu0")


def test_unknown_model_type_names_config(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (golden_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config\.json: unknown model_type 'mistral' \(supported: dream, llada\)"):
        load_model(golden_dir)


def test_model_type_falls_back_to_architectures(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())
    del cfg["model_type"]
    (golden_dir / "config.json").write_text(json.dumps(cfg))
    assert isinstance(load_model(golden_dir), LLaDAModel)
    cfg["architectures"] = ["SomethingElse"]
    (golden_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unknown model_type ''"):
        load_model(golden_dir)


def test_unsupported_architecture_option_is_rejected(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())
    cfg["alibi"] = True
    (golden_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="alibi"):
        load_model(golden_dir)


def test_truncated_shard_names_file(golden_dir):
    _shard(golden_dir, 2)
    victim = golden_dir / "model-00002-of-00002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: cannot read safetensors file"):
        load_model(golden_dir)


def test_missing_shard_names_file(golden_dir):
    _shard(golden_dir, 2)
    (golden_dir / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00001-of-00002\.safetensors: shard listed in .* is missing"):
        load_model(golden_dir)


def test_no_weights_at_all(golden_dir):
    (golden_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(golden_dir)


def test_missing_config_and_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"config\.json: config file not found"):
        load_model(tmp_path)


def _rewrite(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_wrong_shape_names_file_and_tensor(golden_dir):
    name = "model.transformer.blocks.1.k_proj.weight"
    _rewrite(golden_dir, lambda s: s.__setitem__(name, torch.zeros(32, 64)))
    with pytest.raises(ModelLoadError, match=rf"model\.safetensors: tensor '{name}' has shape \[32, 64\], config expects \[64, 64\]"):
        load_model(golden_dir)


def test_missing_tensor_is_named(golden_dir):
    name = "model.transformer.ln_f.weight"
    _rewrite(golden_dir, lambda s: s.pop(name))
    with pytest.raises(ModelLoadError, match=rf"missing tensor '{name}'.*model\.safetensors"):
        load_model(golden_dir)


def test_unexpected_tensor_names_file_and_tensor(golden_dir):
    _rewrite(golden_dir, lambda s: s.__setitem__("model.transformer.blocks.0.att_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: unexpected tensor 'model\.transformer\.blocks\.0\.att_proj\.weight'"):
        load_model(golden_dir)


def test_tiny_factory_overrides_follow_into_weights(tmp_path):
    folder = make_tiny_model_dir(tmp_path, arch="dream", num_hidden_layers=1, tie_word_embeddings=True, seed=3)
    model = load_model(folder)
    assert model.num_layers == 1 and not hasattr(model, "lm_head")
    other = load_model(make_tiny_model_dir(tmp_path / "b", arch="dream", num_hidden_layers=1, tie_word_embeddings=True, seed=4))
    ids = ((model.special_ids.bos, 10, 20),)
    assert not torch.equal(_logits(model, ids), _logits(other, ids)), "seed must change the weights"


def test_special_id_outside_vocab_is_rejected(golden_dir):
    cfg = json.loads((golden_dir / "config.json").read_text())
    cfg["mask_token_id"] = 100000
    (golden_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mask token id 100000 is outside the vocabulary"):
        load_model(golden_dir)
