"""Build what the sidecar serves from its settings: world, target, engine, classifier."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.bundle import GENERIC_DRAFTER, ModelBundle, read_finetune_sample
from router.policy.base import NONE_DRAFTER
from router.service import Components
from router.settings import Settings
from router.store import DrafterRecord

if TYPE_CHECKING:
    from drafters.engine import SpeculativeEngine
    from drafters.loader import DevicePlacement, TargetInfo, WeightsDigestCache

logger = logging.getLogger(__name__)

NGRAM_DRAFTER = "ngram"
WEIGHTS_DIGEST_CACHE = "weights_digests.json"  # in the state dir


def model_drafter_records(
    drafter_dirs: Mapping[str, Path], tasks: Sequence[str]
) -> list[DrafterRecord]:
    """Built-in model drafters: a name that is a task is that task's fine-tuned drafter."""
    return [
        DrafterRecord(
            name=name,
            kind="model",
            path=str(directory),
            tasks=(name,) if name in tasks else tuple(tasks),
            finetune_sample=read_finetune_sample(Path(directory)),
            builtin=True,
        )
        for name, directory in drafter_dirs.items()
    ]


def cluster_name_warnings(names: Iterable[str], tasks: Sequence[str]) -> list[str]:
    """A line for each configured drafter named after no cluster (nor ``generic``): it is
    tried in every cluster, as a generic drafter is, which a typo ("coder" for "code")
    made so without a word."""
    lines = []
    for name in names:
        if name in tasks or name == GENERIC_DRAFTER:
            continue
        close = difflib.get_close_matches(name, tasks, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        lines.append(
            f"drafter_dirs.{name} is named after no cluster{hint}: it drafts for every "
            f"cluster, as {GENERIC_DRAFTER!r} does; clusters: {', '.join(tasks)}"
        )
    return lines


def model_free_records() -> list[DrafterRecord]:
    return [
        DrafterRecord(name=NGRAM_DRAFTER, kind="ngram", builtin=True),
        DrafterRecord(name=NONE_DRAFTER, kind="none", builtin=True),
    ]


def apply_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count for this process (0 keeps torch's default)."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch intra-op threads: %d", threads)


def tokenizer_misfits(
    drafter_dirs: Mapping[str, Path], target_tokenizer: Any, target_dir: Path
) -> dict[str, str]:
    """Drafter name -> a one-line message naming it and the first difference, for each
    drafter whose tokenizer does not fit the target (read before any weights load)."""
    from drafters.registry import drafter_tokenizer_difference, mismatch_message

    misfits = {}
    for name, directory in drafter_dirs.items():
        difference = drafter_tokenizer_difference(target_tokenizer, directory)
        if difference is not None:
            misfits[name] = mismatch_message(name, directory, target_dir, difference)
    return misfits


def load_target(
    target_dir: str | Path,
    placement: DevicePlacement,
    digest_cache: WeightsDigestCache,
    *,
    fleet: bool,
) -> tuple[TargetInfo, SpeculativeEngine | None]:
    """The target and its engine; in fleet mode its description alone (no weights read)
    and no engine, since the replicas generate."""
    from drafters.loader import describe_target, load_model

    if fleet:
        return describe_target(target_dir, placement=placement, digest_cache=digest_cache), None
    from drafters.engine import SpeculativeEngine, unapplied_generation_defaults

    logger.info(
        "loading the target from %s (%s on %s)", target_dir, placement.dtype, placement.device
    )
    target = load_model(target_dir, placement=placement, digest_cache=digest_cache)
    unapplied = unapplied_generation_defaults(target)
    if unapplied:
        logger.warning(
            "the target's generation_config.json sets %s: not applied (only its EOS ids "
            "are); each request decodes as it asks, greedy unless it samples, so greedy "
            "output is transformers' generate(do_sample=False) with these left at their "
            "defaults; send them per request to use them",
            ", ".join(f"{name}={value}" for name, value in unapplied.items()),
        )
    return target, SpeculativeEngine(target)


def target_dir_of(settings: Settings) -> Path:
    """The target's directory: ``target_dir``, else the world's target."""
    if settings.target_dir is not None:
        return Path(settings.target_dir).expanduser()
    return Path(ModelBundle.load(settings.world_path()).target_dir)


def build_components(settings: Settings) -> Components:
    """Load the target, engine, classifier and built-in drafters (blocking).

    From the world (the configured one or the built-in default), with ``target_dir``,
    ``classifier_dir`` and ``drafter_dirs`` overriding or adding to it. Drafter
    tokenizers are checked against the target's before any weights load: a configured
    drafter that does not fit stops the start (``TokenizerMismatchError``), a bundle
    drafter that does not fit is left out with a warning. In fleet mode
    (``settings.fleet_file``) the vLLM replicas run the target: its weights are not
    loaded (its tokenizer and config.json only) and there is no engine.
    """
    from classifiers import ClassifierHolder, OnnxTaskClassifier
    from drafters import TokenizerMismatchError
    from drafters.loader import (
        WeightsDigestCache,
        default_placement,
        load_tokenizer,
        safetensors_files,
    )

    bundle_dirs: dict[str, Path] = {}
    roots = [Path(r).expanduser() for r in settings.model_roots]
    tasks: tuple[str, ...] = ()
    classifier_dir = settings.classifier_dir
    target_dir = settings.target_dir
    if settings.uses_world():
        world = ModelBundle.load(settings.world_path())
        if settings.bundle_drafters:
            bundle_dirs.update(world.drafter_dirs)
        roots.insert(0, Path(world.root))
        tasks = tuple(world.tasks)
        target_dir = target_dir or world.target_dir
        if classifier_dir is None:
            from classifiers import ensure_world_classifier

            classifier_dir = ensure_world_classifier(world.root, world.corpus_dir, settings.seed)
    assert target_dir is not None and classifier_dir is not None
    configured = {name: Path(d).expanduser() for name, d in settings.drafter_dirs.items()}
    # Every configured directory's files before any weights load, each named by its
    # setting: a drafter's missing config.json was found after the target had loaded.
    if settings.fleet_file is None:  # a fleet's target directory holds no weights
        named_setting("target_dir", safetensors_files, target_dir)
    for name, directory in configured.items():
        named_setting(f"drafter_dirs.{name}", safetensors_files, directory)
    target_tokenizer = named_setting("target_dir", load_tokenizer, target_dir)
    # A configured drafter that does not fit stops the start; a bundle drafter (a bundle
    # used with your own target_dir may hold drafters for another vocabulary) is left out.
    refused = tokenizer_misfits(configured, target_tokenizer, Path(target_dir))
    if refused:
        raise TokenizerMismatchError(next(iter(refused.values())))
    bundle_dirs = {name: d for name, d in bundle_dirs.items() if name not in configured}
    left_out = tokenizer_misfits(bundle_dirs, target_tokenizer, Path(target_dir))
    for message in left_out.values():
        logger.warning("bundle drafter left out: %s", message)
    drafter_dirs = {
        **{name: d for name, d in bundle_dirs.items() if name not in left_out},
        **configured,
    }
    apply_torch_threads(settings.torch_threads)
    placement = default_placement(settings.device, settings.dtype)
    digest_cache = WeightsDigestCache(Path(settings.state_dir).expanduser() / WEIGHTS_DIGEST_CACHE)
    fleet = settings.fleet_file is not None
    target, engine = load_target(target_dir, placement, digest_cache, fleet=fleet)
    classifier = OnnxTaskClassifier.load(classifier_dir)
    tasks = tasks or tuple(classifier.labels)
    records = model_drafter_records(drafter_dirs, tasks) + model_free_records()
    for line in cluster_name_warnings(configured, tasks):
        logger.warning(line)
    logger.info(
        "target %s (%s on %s%s), classifier %s, drafters %s",
        target.path,
        placement.dtype,
        placement.device,
        "" if engine is not None else ", tokenizer only: the fleet runs it",
        classifier_dir,
        drafter_dirs,
    )
    return Components(
        target=target,
        engine=engine,
        classifiers=ClassifierHolder(classifier),
        builtin_drafters=tuple(records),
        model_roots=distinct_paths(roots),
        tasks=tasks,
    )


def named_setting(setting: str, load: Callable[..., Any], *args: Any) -> Any:
    """``load(*args)``; a ``ModelLoadError`` it raises names ``setting`` first."""
    from drafters.loader import ModelLoadError

    try:
        return load(*args)
    except ModelLoadError as error:
        raise ModelLoadError(f"{setting}: {error}") from None


def distinct_paths(paths: Sequence[Path]) -> tuple[Path, ...]:
    """``paths`` in order, each directory once (compared resolved): the world's directory
    is a model root of its own, and one listed in ``model_roots`` too was named twice in
    every PERMISSION_DENIED message."""
    seen: set[Path] = set()
    kept = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            kept.append(path)
    return tuple(kept)
