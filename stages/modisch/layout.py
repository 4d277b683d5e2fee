"""Read class labels off the folder layout of a source.

A file's class label is the name of the folder that contains it. Wrapper folders
(``Clothes_Dataset/``) and the source's own split folders (``training/``, ``val/``) above
the class folder are recorded but never taken as a label.
"""

from pathlib import PurePosixPath

SPLIT_FOLDERS = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})


def class_label(member_path: str) -> str:
    """Return the class folder of a member path such as ``x.zip/root/training/boots/1.jpg``.

    The first component is the fetched item (archive or folder) and is never a label.
    Returns an empty string when the file sits directly in that item or in a split folder.
    """
    folders = PurePosixPath(member_path).parts[1:-1]
    if not folders or folders[-1].lower() in SPLIT_FOLDERS:
        return ""
    return folders[-1]


def source_split(member_path: str) -> str:
    """Return the split folder the source placed the file in, or an empty string."""
    folders = PurePosixPath(member_path).parts[1:-1]
    for folder in reversed(folders):
        if folder.lower() in SPLIT_FOLDERS:
            return folder
    return ""
