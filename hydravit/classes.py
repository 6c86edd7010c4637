"""Class names: labels of a split must mean the classes the model was trained on, matched by name.

timm's ImageFolder numbers the class folders it finds in each split on its own, so a validation split that lacks
one class would shift every label after it. Training records its class names (in the checkpoint and as the run's
``class_map.txt``); readers of other splits map their folders onto them by name.

Two families of datasets come out of timm's ``create_dataset``: timm's own (``ImageDataset`` /
``IterableImageDataset``, whose reader holds ``class_to_idx`` and honours ``class_map``) and torchvision's
(``--dataset torch/...``), which keep ``class_to_idx`` / ``classes`` on the dataset and ignore ``class_map``.
``dataset_class_to_idx`` reads both; ``relabel`` labels either by a ``{name: label}`` map (timm's: re-created with
it as ``class_map``; torchvision's: a ``target_transform`` that maps each own label by its class name).
"""
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


def dataset_class_to_idx(dataset) -> Optional[Dict[str, int]]:
    """The ``{class name: label}`` map of a dataset, as it labels its samples, else None (no class names).

    timm's datasets: their reader's ``class_to_idx``. torchvision's: a ``relabel`` map if one was applied, else
    ImageNet's ``wnid_to_idx`` (its ``class_to_idx`` maps several descriptive names to one label), else
    ``class_to_idx`` when it numbers classes 0..N-1 one to one, else the ``classes`` list.
    """
    reader = getattr(dataset, 'reader', None)
    if reader is not None:
        class_to_idx = getattr(reader, 'class_to_idx', None)
        return dict(class_to_idx) if isinstance(class_to_idx, dict) and class_to_idx else None
    target_transform = getattr(dataset, 'target_transform', None)
    if isinstance(target_transform, ByName):
        return dict(target_transform.class_to_idx)
    for attr in ('wnid_to_idx', 'class_to_idx'):
        class_to_idx = getattr(dataset, attr, None)
        if isinstance(class_to_idx, dict) and class_to_idx and _one_to_one(class_to_idx):
            return {str(name): int(label) for name, label in class_to_idx.items()}
    classes = getattr(dataset, 'classes', None)
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes) \
            and len(set(classes)) == len(classes):
        return {name: i for i, name in enumerate(classes)}
    return None


def _one_to_one(class_to_idx: Dict) -> bool:
    return sorted(class_to_idx.values()) == list(range(len(class_to_idx)))


class ByName:
    """A picklable ``target_transform``: a dataset's own label -> the label of the same class name in ``known``.

    Used for torchvision datasets, which timm creates without its ``class_map``. ``class_to_idx`` is the
    relabelled dataset's ``{name: label}`` (what ``dataset_class_to_idx`` reports afterwards).
    """

    def __init__(self, own: Dict[str, int], known: Dict[str, int]) -> None:
        self.class_to_idx = {name: known[name] for name in own}
        self.table = {label: known[name] for name, label in own.items()}

    def __call__(self, target):
        return self.table[int(target)]


def relabel(dataset, class_map: Dict[str, int], recreate: Callable[[Dict[str, int]], Any]):
    """``dataset`` labelled by ``class_map`` (``{class name: label}``, holding every class the dataset has).

    timm's datasets are made again by ``recreate(class_map)`` (timm's ``class_map`` argument); torchvision's
    get a ``ByName`` target transform, since timm passes them no class map.
    """
    if getattr(dataset, 'reader', None) is not None:
        return recreate(class_map)
    own = dataset_class_to_idx(dataset)
    if own is None or getattr(dataset, 'target_transform', None) is not None:  # none set by timm's create_dataset
        raise ValueError(f'{type(dataset).__name__} cannot be labelled by class name')
    missing = sorted(set(own) - set(class_map))
    if missing:
        raise ValueError(f'the class map lacks classes of the data: {shown(missing)}')
    dataset.target_transform = ByName(own, class_map)
    return dataset


def ignores_class_map(dataset) -> bool:
    """Whether ``dataset`` is a torchvision one (``--dataset torch/...``): timm creates it without its class map."""
    return getattr(dataset, 'reader', None) is None


def read_class_map(path: str, root: str = '') -> Dict[str, int]:
    """A ``--class-map`` file as timm reads it (``.txt``: line i names label i; ``.pkl``: a dict)."""
    from timm.data.readers.class_map import load_class_map
    try:
        class_to_idx = load_class_map(path, root)
    except AssertionError as e:  # timm asserts on a missing file or an unknown suffix
        raise ValueError(str(e)) from e
    return {str(name): int(label) for name, label in class_to_idx.items()}


def check_class_folders(dataset) -> None:
    """Raise ``ValueError`` when a folder dataset has images outside class sub-folders.

    timm's folder reader labels an image lying directly in the folder with the class name '' (one unnamed
    class), so a flat folder of images would be one class, or a class the model was not trained on.
    """
    class_to_idx = dataset_class_to_idx(dataset)
    reader = getattr(dataset, 'reader', None)
    if reader is None and isinstance(getattr(dataset, 'samples', None), list):
        _check_torchvision_folder(dataset)
        return
    if not class_to_idx or '' not in class_to_idx:
        return
    label = class_to_idx['']
    count = sum(1 for _, target in getattr(reader, 'samples', ()) if target == label)
    folder = getattr(reader, 'root', None) or getattr(dataset, 'root', '?')
    raise ValueError(class_folder_message(folder, count))


def _check_torchvision_folder(dataset) -> None:
    """torchvision's ImageFolder reads class sub-folders only: images lying directly in its root would be skipped."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    root = getattr(dataset, 'root', None)
    if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
        return
    count = sum(1 for entry in os.scandir(root) if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS))
    if count:
        raise ValueError(class_folder_message(os.fspath(root), count))


def class_folder_message(folder: str, count: Optional[int] = None) -> str:
    """The one line for a folder whose images are not in class sub-folders (``count``: images lying in it)."""
    found = 'no class sub-folders' if count is None else f'{count} image(s) directly in it, not in a class folder'
    return f'{folder} has {found}: expected CLASS/IMAGE sub-folders (one folder per class)'


def torchvision_folder_error(error: Exception) -> Optional[str]:
    """``class_folder_message`` for torchvision's "Couldn't find any class folder in FOLDER." error, else None."""
    prefix = "Couldn't find any class folder in "
    text = str(error)
    if not text.startswith(prefix):
        return None
    folder = text[len(prefix):]
    return class_folder_message(os.path.normpath(folder[:-1] if folder.endswith('.') else folder))


def recorded_class_names(checkpoint) -> Optional[List[str]]:
    """The class names a checkpoint records in label order (``class_names``, written by hydravit.train and
    carried by hydravit.convert), else None."""
    names = checkpoint.get('class_names') if isinstance(checkpoint, dict) else None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) and names else None


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


def check_class_map_agrees(known: Sequence[str], class_map: Dict[str, int]) -> None:
    """Raise ``ValueError`` when ``class_map`` (``{name: label}``) gives a class another label than ``known`` (the
    class names a checkpoint records, in label order) does: label l would be scored as class ``known[l]``.

    A map that agrees on every class it names (a subset, or the training run's own ``class_map.txt``) passes.
    """
    wrong = [(name, label) for name, label in class_map.items()
             if not 0 <= label < len(known) or known[label] != name]
    if not wrong:
        return
    name, label = wrong[0]
    recorded = f"the checkpoint's label {label} is {known[label]!r}" if 0 <= label < len(known) else \
        f'the checkpoint has {len(known)} classes'
    raise ValueError(f'labels {name!r} as {label}, but {recorded} ({len(wrong)} of its {len(class_map)} classes '
                     f'contradict the class names the checkpoint records: {shown(list(known))})')


TIMM_FOLDERS = "timm's folder reader (the default --dataset)"
TORCHVISION_FOLDERS = "torchvision's ImageFolder (--dataset torch/image_folder)"


def folder_orders(dataset) -> Optional[Tuple[Tuple[str, List[str]], Tuple[str, List[str]]]]:
    """For a class-folder dataset: ((this reader, its order of the class folders), (the other folder reader, the
    order it would give)), else None. timm's folder reader sorts class folders naturally (1, 2, 10), torchvision's
    ImageFolder (``--dataset torch/image_folder``) as strings (1, 10, 2): without recorded class names, label i
    means the i-th folder of whichever reader the model was trained with."""
    from timm.utils import natural_key
    from torchvision.datasets import DatasetFolder
    found = dataset_class_to_idx(dataset)
    reader = getattr(dataset, 'reader', None)
    timm_folders = type(reader).__name__ in ('ReaderImageFolder', 'ReaderImageInTar')
    if not found or not (timm_folders or isinstance(dataset, DatasetFolder)):
        return None
    own = (TIMM_FOLDERS if timm_folders else TORCHVISION_FOLDERS, sorted(found, key=found.__getitem__))  # as labelled
    other = (TORCHVISION_FOLDERS, sorted(found)) if timm_folders else (TIMM_FOLDERS, sorted(found, key=natural_key))
    return own, other
