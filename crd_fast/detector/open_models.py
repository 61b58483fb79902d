"""What a fit may end with, read from the detector's options: the open scoring models, the check that each takes
the options, the label-free selector among them, and the model a fit of too few images settles on.

Shared by :class:`~crd_fast.detector.CRDDetector` and the anomalib model (crd_fast/integrations/anomalib.py), so both
offer the same scoring models (crd_fast/scoring registry), refuse the same options and choose in the same way
(docs/DESIGN.md "The detector's choice of spatial model and lam_rel").
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..choices import DEFAULT_LAM_GRID, DEFAULT_LAM_REL, LAM_AUTO
from ..scoring.base import ScoringModel
from ..scoring.registry import AUTO, model_class, selectable_names
from ..selection.record import SelectionRecord
from ..selection.selector import LabelFreeSelector, default_choice


def open_models(spatial: str) -> tuple[str, ...]:
    """The scoring models a fit may end with: the one ``spatial`` names, or every selectable one for "auto"."""
    return selectable_names() if spatial == AUTO else (spatial,)


def lam_grid(lam_rel: Any) -> tuple[float, ...]:
    """The lam_rel values a fit may end with: the grid for "auto", else the one value."""
    return tuple(DEFAULT_LAM_GRID) if lam_rel == LAM_AUTO else (float(lam_rel),)


def check_open_models(options: Mapping[str, Any]) -> None:
    """Refuse, before any image is read, options an open model cannot take (ValueError naming the problem).

    ``options``: the detector's options as a dict (``DetectorConfig.to_dict()``; lam_rel a number or "auto").
    Every open model is created once with them; a fixed lam_rel is refused for a model without one.
    """
    for name in open_models(options["spatial"]):
        cls = model_class(name)
        if not cls.has_lam_rel and options["lam_rel"] != LAM_AUTO:
            raise ValueError(f"the {name!r} scoring model has no lam_rel: leave lam_rel {LAM_AUTO!r}")
        cls.create({**options, "lam_rel": DEFAULT_LAM_REL})


def label_free_selector(
    options: Mapping[str, Any],
    grid: Sequence[float],
    count: Optional[int],
    seed: int,
    model: Optional[ScoringModel] = None,
) -> LabelFreeSelector:
    """The selector of a fit from empty that chooses what ``options`` leave open, among ``grid`` (lam_rel values).

    Its templates are every open model created with ``options`` at ``grid[0]``, or ``model.fresh()`` where a fixed
    spatial model is already held (its options as they are now). ``count``: the number of training images when
    known; ``seed``: the pseudo-defects' seed.
    """
    templates = {
        name: model.fresh() if model is not None else model_class(name).create({**options, "lam_rel": grid[0]})
        for name in open_models(options["spatial"])
    }
    asked = {"lam_rel": options["lam_rel"], "spatial": options["spatial"]}
    return LabelFreeSelector(templates, grid, count, asked, seed)


def settled_model(
    options: Mapping[str, Any], grid: Sequence[float], n_images: int, model: Optional[ScoringModel] = None
) -> tuple[ScoringModel, SelectionRecord]:
    """The unfitted model a fit of ``n_images`` (fewer than ``MIN_IMAGES``: no hold-out, no choice) uses, and the
    record saying why: spatial "global" where open, lam_rel ``DEFAULT_LAM_REL`` where open (``default_choice``).
    ``model``: the one already held, kept when it is the model settled on (its lam_rel set)."""
    spatial, lam = default_choice(open_models(options["spatial"]), grid)
    if model is None or model.name != spatial:
        model = model_class(spatial).create({**options, "lam_rel": lam})
    if model.has_lam_rel:
        model.set_lam_rel(lam)
    asked = {"lam_rel": options["lam_rel"], "spatial": options["spatial"]}
    record = SelectionRecord.without_selection(asked, spatial, lam if model.has_lam_rel else None, n_images)
    return model, record


__all__ = ["check_open_models", "label_free_selector", "lam_grid", "open_models", "settled_model"]
