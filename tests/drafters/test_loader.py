"""The one model loader: safetensors only, offline, local directories under the roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from drafters.loader import (
    DevicePlacement,
    ModelLoadError,
    PathOutsideRootsError,
    load_model,
    resolve_under_roots,
    safetensors_files,
    weights_bytes,
)

# Qwen2.5-0.5B-Instruct's config fields, shrunk in size only.
QWEN25_FIELDS = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "max_window_layers": 2,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 128,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 64,
}


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|im_start|>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(61)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def _save_model(directory: Path, *, safe: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_FIELDS))
    model.save_pretrained(directory, safe_serialization=safe)
    _tiny_tokenizer().save_pretrained(directory)
    return model


def test_loads_a_qwen25_config_directory(tmp_path: Path) -> None:
    saved = _save_model(tmp_path / "qwen")
    config = json.loads((tmp_path / "qwen" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["rope_theta"] == 1000000.0

    loaded = load_model(tmp_path / "qwen")

    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.parameter_count == sum(p.numel() for p in saved.parameters())
    assert len(loaded.weights_digest) == 64
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = saved(ids).logits
        actual = loaded.model(ids).logits
    torch.testing.assert_close(actual, expected)
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 1


def test_refuses_pickle_only_weights(tmp_path: Path) -> None:
    _save_model(tmp_path / "pickled", safe=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_model(tmp_path / "pickled")


def test_a_hugging_face_cache_folder_points_at_its_snapshots(tmp_path: Path) -> None:
    """It said the folder had no tokenizer files, and to copy them there."""
    cache = tmp_path / "models--Own--Qwen2.5-0.5B-Instruct"
    (cache / "snapshots" / "8f1f").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="is a Hugging Face cache folder: point at"):
        safetensors_files(cache)


def test_refuses_missing_and_non_model_directories(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        safetensors_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        safetensors_files(tmp_path / "empty")


def test_a_tokenizer_is_only_read_from_a_local_directory_that_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that is not a directory was taken for a Hugging Face repo id: served from
    the Hub's cache when it was there (outside every model root, the context check off),
    else refused as "Repo id must be in the form ..."; a directory without tokenizer files
    failed with "expected str, bytes or os.PathLike object, not NoneType"."""
    from drafters.loader import describe_target, load_tokenizer

    hub = tmp_path / "hub"
    _tiny_tokenizer().save_pretrained(hub / "Qwen" / "Qwen2.5-7B-Instruct")
    monkeypatch.chdir(hub)  # where a relative repo id would find a cached copy
    with pytest.raises(ModelLoadError, match="no such directory"):
        describe_target(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_tokenizer("Qwen2.5-7B-Instruct")
    _save_model(tmp_path / "checkpoint")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "checkpoint" / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        load_tokenizer(tmp_path / "checkpoint")


def test_code_shipped_with_a_checkpoint_never_runs(tmp_path: Path) -> None:
    """``trust_remote_code`` stays off: a config whose ``auto_map`` names a module of the
    directory loads transformers' own class for its ``model_type``, and the module is
    never imported."""
    _save_model(tmp_path / "remote")
    marker = tmp_path / "ran"
    (tmp_path / "remote" / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen2Config as EvilConfig, Qwen2ForCausalLM as EvilModel\n"
    )
    config_path = tmp_path / "remote" / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config_path.write_text(json.dumps(config))
    loaded = load_model(tmp_path / "remote")
    assert type(loaded.model) is Qwen2ForCausalLM
    assert not marker.exists()


def test_refuses_corrupt_weights(tmp_path: Path) -> None:
    _save_model(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="cannot load model weights"):
        load_model(tmp_path / "corrupt")


def test_refuses_weights_that_lack_a_tensor_the_config_needs(tmp_path: Path) -> None:
    """A tied model (as Qwen2.5-0.5B) exported with ``tie_word_embeddings`` false and no
    ``lm_head.weight``: transformers filled the head with random values and only warned,
    so the target served noise and such a drafter passed the probe."""
    from safetensors.torch import load_file, save_file

    _save_model(tmp_path / "untied")
    config_path = tmp_path / "untied" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tie_word_embeddings": False}))
    weights = tmp_path / "untied" / "model.safetensors"
    tensors = load_file(weights)
    assert "lm_head.weight" not in tensors  # tied: saved once, as the embeddings
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lack 1 tensor.*lm_head\.weight.*tie_word"):
        load_model(tmp_path / "untied")


@pytest.mark.parametrize("damaged", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_refuses_a_corrupt_tokenizer_or_config(tmp_path: Path, damaged: str) -> None:
    """A tokenizer.json that is not JSON raised the tokenizers library's bare Exception:
    UNKNOWN on RegisterDrafter, a traceback at start."""
    _save_model(tmp_path / "corrupt")
    (tmp_path / "corrupt" / damaged).write_text("garbage{")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path / "corrupt")


def test_only_paths_under_model_roots(tmp_path: Path) -> None:
    root = tmp_path / "models"
    _save_model(root / "ok")
    assert load_model(root / "ok", roots=[root]).path == (root / "ok").resolve()
    outside = tmp_path / "elsewhere"
    _save_model(outside)
    with pytest.raises(PathOutsideRootsError, match="outside the configured model roots"):
        load_model(outside, roots=[root])
    # A symlink inside the root that points outside it is still outside.
    (root / "link").symlink_to(outside)
    with pytest.raises(PathOutsideRootsError):
        resolve_under_roots(root / "link", [root])
    with pytest.raises(PathOutsideRootsError):
        resolve_under_roots(root / ".." / "elsewhere", [root])


def test_a_file_linked_from_outside_the_roots_is_refused(tmp_path: Path) -> None:
    """A directory under a root whose weight file is a symlink to a file elsewhere would
    load that file: refused, naming the link; a link to a file under a root (as a Hugging
    Face cache's snapshot links to its blobs) is served."""
    root = tmp_path / "models"
    _save_model(root / "linked")
    weights = next((root / "linked").glob("*.safetensors"))
    blobs = root / "blobs"
    blobs.mkdir()
    weights.rename(blobs / "weights")
    weights.symlink_to(blobs / "weights")
    assert load_model(root / "linked", roots=[root]).path == (root / "linked").resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (blobs / "weights").rename(outside / "weights")
    weights.unlink()
    weights.symlink_to(outside / "weights")
    with pytest.raises(PathOutsideRootsError, match=f"{weights.name} links to .*elsewhere"):
        load_model(root / "linked", roots=[root])
    assert load_model(root / "linked", roots=[root, outside]).path == (root / "linked").resolve()


def test_a_tokenizer_is_read_from_its_own_directory_whatever_its_config_names(
    tmp_path: Path,
) -> None:
    """transformers reads the ``tokenizer_file`` that tokenizer_config.json names over the
    directory's own: a directory under a model root whose config named a file elsewhere
    (absolute, or relative, which is read from the working directory) loaded that
    tokenizer from outside the roots."""
    root = tmp_path / "models"
    model = root / "named"
    _save_model(model)
    outside = tmp_path / "elsewhere"
    _tiny_tokenizer().save_pretrained(outside)
    from tokenizers import Tokenizer

    foreign = Tokenizer.from_file(str(outside / "tokenizer.json"))
    foreign.add_tokens(["outsider"])
    foreign.save(str(outside / "tokenizer.json"))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for named in (str(outside / "tokenizer.json"), "../../elsewhere/tokenizer.json"):
        config_path.write_text(json.dumps({**config, "tokenizer_file": named}))
        tokenizer = load_model(model, roots=[root]).tokenizer
        assert "outsider" not in tokenizer.get_vocab()


def test_a_shard_index_must_name_files_of_its_own_directory(tmp_path: Path) -> None:
    """transformers joins a sharded checkpoint's index names onto the directory: an index
    naming ``../`` or absolute shards loaded weights from outside the model roots, while
    the checks (no symlink, a *.safetensors file present) passed on a decoy and the
    digest covered the decoy only."""
    root = tmp_path / "models"
    sharded = root / "sharded"
    model = _save_model(sharded)
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    index = sharded / "model.safetensors.index.json"
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and index.is_file()
    assert [p.name for p in safetensors_files(sharded)] == shards  # the digest's files
    assert load_model(sharded, roots=[root]).path == sharded.resolve()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    listed = json.loads(index.read_text())
    moved = shards[0]
    (sharded / moved).rename(outside / moved)
    (sharded / "decoy.safetensors").write_bytes(b"")
    for name in (f"../../elsewhere/{moved}", str(outside / moved)):
        weight_map = {k: (name if v == moved else v) for k, v in listed["weight_map"].items()}
        index.write_text(json.dumps({**listed, "weight_map": weight_map}))
        with pytest.raises(ModelLoadError, match="which is not a file of"):
            load_model(sharded, roots=[root])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_refuses_weights_holding_nan_or_infinity(tmp_path: Path, value: float) -> None:
    """Such weights passed every check: a drafter of them failed every sampled request it
    drafted for, and a target of them served noise."""
    from safetensors.torch import load_file, save_file

    _save_model(tmp_path / "broken")
    weights = tmp_path / "broken" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        load_model(tmp_path / "broken")


def test_all_finite_tells_overflowing_sums_from_nan_and_infinity() -> None:
    from drafters.loader import all_finite

    huge = torch.full((8,), 3e38)  # finite, its sum is not
    assert all_finite(huge) and all_finite(huge.to(torch.bfloat16))
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = huge.clone()
        broken[5] = bad
        assert not all_finite(broken)
    assert all_finite(torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_the_memory_weights_take_is_read_from_their_headers(
    tmp_path: Path, dtype: torch.dtype, tied: bool
) -> None:
    """What a drafter's registration checks against the memory left: the loaded tensors'
    bytes at the placement's precision, tied embeddings once."""
    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN25_FIELDS, "tie_word_embeddings": tied})
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    _tiny_tokenizer().save_pretrained(tmp_path / "m")
    files = safetensors_files(tmp_path / "m")
    loaded = load_model(tmp_path / "m", placement=DevicePlacement(torch.device("cpu"), dtype))
    tensors = {t.data_ptr(): t for t in loaded.model.state_dict().values()}.values()
    assert weights_bytes(files, dtype) == sum(t.numel() * t.element_size() for t in tensors)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="is not a safetensors file"):
        weights_bytes(files, dtype)
