"""What every task's recipe section shares: options routed by name, and the task's error boundary.

A task's section (``anomaly``, ``recon``, ``segment``) is a ``TaskSection`` with parts (``reconstruction``,
``map``, ``measurement``...). ``route`` maps an option given by its own name to its dotted key
(``n_samples`` -> ``reconstruction.n_samples``), so the command line and keyword arguments can name options
plainly; ``updated`` applies such changes. ``boundary`` runs a task and turns an algorithm's
``ValueError`` (or a pydantic ``ValidationError``) into a ``RecipeError`` naming the recipe key.
``open_model`` loads a task's model the one way every task does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ModelError, RecipeError

__all__ = ["TaskSection", "boundary", "open_model"]

T = TypeVar("T")
S = TypeVar("S", bound="TaskSection")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*):")


class TaskSection(BaseModel):
    """A task's recipe section: unknown keys are errors; options can be named plainly (see ``route``)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def route(cls, key: str) -> str:
        """The dotted key of an option given by its own name (the section's parts override this)."""
        return key

    def updated(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied, each key routed to its part (``route``).

        Raises:
            ValueError: an unknown key or an invalid value (pydantic's ``ValidationError``).
        """
        data = self.model_dump()
        for key, value in changes.items():
            section, _, name = self.route(key).rpartition(".")
            node = data
            for part in section.split(".") if section else []:
                node = node[part]
            node[name] = value
        return type(self).model_validate(data)


def boundary(task: str, section: type[TaskSection], fn: Callable[[], T]) -> T:
    """Run ``fn`` (a task's work), naming the recipe key of an invalid option in the error.

    Args:
        task: the section's name in a recipe (``anomaly``...).
        section: the section's class (its ``route`` names keys).
        fn: the work.

    Raises:
        RecipeError: ``fn`` raised a ``ValidationError`` or a ``ValueError`` (``"key: message"`` names its key).
    """
    try:
        return fn()
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(err["msg"], where=f"{task}." + ".".join(str(p) for p in err["loc"])) from None
    except ValueError as e:
        match = _KEY.match(str(e))
        key = section.route(match.group(1)) if match else ""
        raise RecipeError(str(e), where=f"{task}.{key}".rstrip("."),
                          fix=f"see the {task} section's options (medidiff.{task}.config).") from None


def open_model(model, device) -> tuple[Any, Any, str, Any]:
    """A task's model: its device resolved, the weights checked and loaded once, its data grid required.

    Args:
        model: the weights file or folder.
        device: a ``torch.device`` or a spec (``auto``, ``cpu``, ``cuda:N``).

    Returns:
        ``(denoiser, info, sha256, device)``.

    Raises:
        ModelError: the model cannot be used, or records no ``data_prep.size``.
    """
    import torch

    from .runtime import resolve_device
    from .weights import load_checked

    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    denoiser, info, digest = load_checked(model, device=device)
    if info.data_prep.size is None:
        raise ModelError("model.json has no data_prep.size: cannot prepare scans for this model",
                         where=model, fix="train it with a medidiff recipe (which records data_prep).")
    return denoiser, info, digest, device
