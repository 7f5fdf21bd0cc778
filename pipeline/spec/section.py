"""What every spec section shares: the pydantic base (unknown fields forbidden, frozen)
and the URL type whose local paths are made absolute."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


# Local paths become absolute: Ray workers do not share the driver's working directory.
def absolute_if_local(url: str) -> str:
    """A local path made absolute (``~`` expanded); URLs with a scheme unchanged."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


StorageURL = Annotated[str, AfterValidator(absolute_if_local)]


class Section(BaseModel):
    """A spec section: unknown fields are errors (a typo names the allowed fields); frozen, built once."""

    model_config = ConfigDict(extra="forbid", frozen=True)
