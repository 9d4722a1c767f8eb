"""Build what the sidecar serves from its settings: world, target, engine, classifier."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from router.drafter_pool import NO_DRAFTER
from router.registry import DrafterRecord
from router.service import Components
from router.settings import Settings

logger = logging.getLogger(__name__)

NGRAM_DRAFTER = "ngram"
FINETUNE_SAMPLE_FILE = "finetune_sample.jsonl"
FINETUNE_SAMPLE_SIZE = 64


def resolve_world_dir(settings: Settings) -> Path:
    """The configured world directory, or the built-in default world's."""
    if settings.world_dir is not None:
        return Path(settings.world_dir).expanduser()
    from benchmarks.world.layout import default_world_dir

    return default_world_dir(settings.world_scale)


def read_finetune_sample(drafter_dir: Path, limit: int = FINETUNE_SAMPLE_SIZE) -> tuple[str, ...]:
    """Texts from a drafter's ``finetune_sample.jsonl`` (strings or objects with "text")."""
    path = drafter_dir / FINETUNE_SAMPLE_FILE
    if not path.is_file():
        return ()
    texts: list[str] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        value = json.loads(line)
        text = value if isinstance(value, str) else value.get("text") or value.get("prompt", "")
        if text:
            texts.append(str(text))
        if len(texts) >= limit:
            break
    return tuple(texts)


def builtin_drafter_records(world: Any) -> tuple[DrafterRecord, ...]:
    """The world's drafters (generic + one per task), then ngram and none."""
    records = [
        DrafterRecord(
            name=name,
            kind="model",
            path=str(directory),
            tasks=(name,) if name in world.tasks else tuple(world.tasks),
            finetune_sample=read_finetune_sample(Path(directory)),
            builtin=True,
        )
        for name, directory in world.drafter_dirs.items()
    ]
    records.append(DrafterRecord(name=NGRAM_DRAFTER, kind="ngram", builtin=True))
    records.append(DrafterRecord(name=NO_DRAFTER, kind="none", builtin=True))
    return tuple(records)


def build_components(settings: Settings) -> Components:
    """Load the world's target, engine, classifier and built-in drafters (blocking)."""
    from benchmarks.world.layout import World

    from classifiers import ClassifierHolder, OnnxTaskClassifier, ensure_world_classifier
    from drafters import SpeculativeEngine
    from drafters.loader import default_placement, load_model

    world_dir = resolve_world_dir(settings)
    world = World.load(world_dir)
    placement = default_placement(settings.device)
    target = load_model(settings.target_dir or world.target_dir, placement=placement)
    classifier_dir = settings.classifier_dir or ensure_world_classifier(world.root, settings.seed)
    classifier = OnnxTaskClassifier.load(classifier_dir)
    roots = (Path(world.root), *(Path(r) for r in settings.model_roots))
    drafters = builtin_drafter_records(world) if settings.builtin_drafters else ()
    logger.info("world %s: target %s, classifier %s", world.root, target.path, classifier_dir)
    return Components(
        target=target,
        engine=SpeculativeEngine(target),
        classifiers=ClassifierHolder(classifier),
        builtin_drafters=drafters,
        model_roots=roots,
        tasks=tuple(world.tasks),
    )
