"""Class names: labels of a split must mean the classes the model was trained on, matched by name.

timm's ImageFolder numbers the class folders it finds in each split on its own, so a validation split that lacks
one class would shift every label after it. Training records its class names (in the checkpoint and as the run's
``class_map.txt``); readers of other splits map their folders onto them by name.
"""
from typing import Dict, List, Optional, Sequence, Tuple


def dataset_class_to_idx(dataset) -> Optional[Dict[str, int]]:
    """The ``{class name: label}`` map of a timm dataset whose reader has one (folder datasets), else None."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return dict(class_to_idx) if isinstance(class_to_idx, dict) and class_to_idx else None


def class_names(class_to_idx: Dict[str, int]) -> List[str]:
    """Class names in label order (``class_to_idx`` must number them 0..N-1)."""
    names = sorted(class_to_idx, key=class_to_idx.__getitem__)
    if [class_to_idx[n] for n in names] != list(range(len(names))):
        raise ValueError('class labels are not 0..N-1')
    return [str(n) for n in names]


def class_map_onto(known: Sequence[str], found: Dict[str, int], what: str) -> Optional[Dict[str, int]]:
    """The class map that labels ``found`` (a split's own ``{name: label}``) by the ``known`` class names.

    None when the split's own labels already agree. Raises ``ValueError`` naming the classes ``what`` holds
    that are not among ``known``: their images would otherwise be dropped or mislabeled.
    """
    known_idx = {name: i for i, name in enumerate(known)}
    extra = sorted(set(found) - set(known_idx))
    if extra:
        shown = ', '.join(extra[:8]) + (f', ... ({len(extra)} in all)' if len(extra) > 8 else '')
        raise ValueError(f'{what} has classes the model was not trained on: {shown} '
                         f'(trained on {len(known)}: {", ".join(list(known)[:8])}{", ..." if len(known) > 8 else ""})')
    if all(known_idx[name] == label for name, label in found.items()):
        return None
    return known_idx


def match_classes(known: Sequence[str], found: Dict[str, int], what: str) -> Tuple[Optional[Dict[str, int]], List[str]]:
    """``(class_map_onto(known, found, what), missing_classes(known, found))``: how a split is labelled by the
    ``known`` classes, and which of them it lacks (to warn about). Raises ``class_map_onto``'s ``ValueError``."""
    return class_map_onto(known, found, what), missing_classes(known, found)


def missing_classes(known: Sequence[str], found: Dict[str, int]) -> List[str]:
    """The ``known`` classes a split has no folder for."""
    return [name for name in known if name not in found]


def shown(names: Sequence[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, with ``...`` when there are more."""
    return ', '.join(names[:limit]) + (', ...' if len(names) > limit else '')
