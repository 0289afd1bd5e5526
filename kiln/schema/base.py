"""What every settings model of Kiln is: strict (an unknown key is an error)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a manifest must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")
