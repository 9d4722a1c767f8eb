"""Constrained field types the policies' JSON configurations share (pydantic)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from router.policy.base import MAX_DRAFT_LENGTH

#: A draft length an arm names: 0 (no speculation) to MAX_DRAFT_LENGTH.
DraftLength = Annotated[int, Field(ge=0, le=MAX_DRAFT_LENGTH)]
#: The one draft length a drafter is served at (a fleet replica's k): 1 to MAX_DRAFT_LENGTH.
ServedLength = Annotated[int, Field(ge=1, le=MAX_DRAFT_LENGTH)]
