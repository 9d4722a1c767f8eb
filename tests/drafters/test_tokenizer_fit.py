"""Tokenizer compatibility compares vocabularies and special-token ids, not EOS names: a
Qwen2.5 base drafter (EOS <|endoftext|>) drafts for an Instruct target (EOS <|im_end|>),
padded to another row count or not; a real difference is named by its first id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from drafters.loader import load_model
from drafters.registry import TokenizerMismatchError, create_drafter, tokenizer_difference

from .conftest import VOCAB, tiny_config

SPECIALS = ("<|endoftext|>", "<|im_end|>", "<|im_start|>")  # ids 0, 1, 2
INSTRUCT_EOS, BASE_EOS = "<|im_end|>", "<|endoftext|>"


def qwen_like_tokenizer(
    eos: str, words: dict[int, str] | None = None, special: tuple[str, ...] = SPECIALS
) -> PreTrainedTokenizerFast:
    """Specials 0-2 registered as special (as every Qwen2.5 tokenizer lists them), words
    w0.. at ids 3..63 (``words`` replaces some), the EOS role given to ``eos``."""
    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    for index, token in (words or {}).items():
        vocab = {t: i for t, i in vocab.items() if i != index} | {token: index}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BASE_EOS))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    others = [token for token in special if token not in (eos, BASE_EOS)]
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=eos,
        pad_token=BASE_EOS,
        additional_special_tokens=others,
    )


def test_a_base_tokenizer_fits_an_instruct_one() -> None:
    instruct, base = qwen_like_tokenizer(INSTRUCT_EOS), qwen_like_tokenizer(BASE_EOS)
    assert instruct.eos_token != base.eos_token  # the comparison this replaces refused it
    assert tokenizer_difference(instruct, base) is None
    assert tokenizer_difference(base, instruct) is None


def test_the_first_differing_id_is_named() -> None:
    instruct = qwen_like_tokenizer(INSTRUCT_EOS)
    renamed = qwen_like_tokenizer(INSTRUCT_EOS, words={40: "hello", 50: "world"})
    assert tokenizer_difference(instruct, renamed) == (
        "first difference at id 40: target 'w37', drafter 'hello'"
    )


def test_a_longer_vocabulary_names_its_sizes_and_first_extra_token() -> None:
    instruct = qwen_like_tokenizer(INSTRUCT_EOS)
    longer = qwen_like_tokenizer(INSTRUCT_EOS)
    longer.add_tokens(["zz"])
    assert tokenizer_difference(instruct, longer) == (
        "vocabulary sizes differ: target 64, drafter 65; "
        "first difference at id 64: target absent, drafter 'zz'"
    )


def test_a_special_token_id_that_differs_is_named() -> None:
    instruct = qwen_like_tokenizer(INSTRUCT_EOS)
    plain_start = qwen_like_tokenizer(INSTRUCT_EOS, special=SPECIALS[:2])  # <|im_start|> plain
    assert tokenizer_difference(instruct, plain_start) == (
        "special tokens differ: id 2 ('<|im_start|>') is special in the target, not in the drafter"
    )


def _save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def instruct_and_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An Instruct-like target with 80 rows and a base-like drafter with 72 (both padded
    past the tokenizer's 64 ids, as Qwen2.5's 152,064 and 151,936 are)."""
    root = tmp_path_factory.mktemp("instruct-and-base")
    torch.manual_seed(5)
    target_config, drafter_config = tiny_config(), tiny_config(layers=1)
    target_config.vocab_size, drafter_config.vocab_size = 80, 72
    target = _save(
        Qwen2ForCausalLM(target_config), qwen_like_tokenizer(INSTRUCT_EOS), root / "instruct"
    )
    drafter = _save(Qwen2ForCausalLM(drafter_config), qwen_like_tokenizer(BASE_EOS), root / "base")
    return target, drafter


def test_a_base_drafter_drafts_for_an_instruct_target(
    instruct_and_base: tuple[Path, Path],
) -> None:
    target_dir, drafter_dir = instruct_and_base
    target = load_model(target_dir)
    drafter = create_drafter("model", name="base", target=target, path=drafter_dir)
    rows = drafter.model.get_output_embeddings().weight.shape[0]  # type: ignore[attr-defined]
    assert rows == 80  # resized to the target's padded vocabulary


def test_a_drafter_for_another_vocabulary_is_refused_naming_it(
    instruct_and_base: tuple[Path, Path], tmp_path: Path
) -> None:
    target_dir, _ = instruct_and_base
    other = _save(
        Qwen2ForCausalLM(tiny_config(layers=1)),
        qwen_like_tokenizer(BASE_EOS, words={3: "hello"}),
        tmp_path / "other",
    )
    with pytest.raises(TokenizerMismatchError) as refused:
        create_drafter("model", name="other", target=load_model(target_dir), path=other)
    message = str(refused.value)
    assert message.startswith(f"drafter 'other' at {other.resolve()} cannot draft for the target")
    assert message.endswith("first difference at id 3: target 'w0', drafter 'hello'")
    assert "\n" not in message
