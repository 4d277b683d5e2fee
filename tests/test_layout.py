"""Tests for modisch.layout: class labels and source splits read off member paths."""

import pytest

from modisch.layout import class_label, source_split


@pytest.mark.parametrize(
    ("member_path", "label", "split"),
    [
        # The first component is the fetched item (archive or folder), never a label.
        ("clothes.zip/Clothes_Dataset/Blazer/1.jpg", "Blazer", ""),
        ("clothes.zip/Blazer/1.jpg", "Blazer", ""),
        ("Clothes_Dataset/Blazer/1.jpg", "Blazer", ""),
        ("shoes.zip/shoeTypeClassifierDataset/training/boots/1.jpeg", "boots", "training"),
        ("shoes.zip/shoeTypeClassifierDataset/validation/boots/1.jpeg", "boots", "validation"),
        ("shoes.zip/train/boots/1.jpg", "boots", "train"),
        ("shoes.zip/val/boots/1.jpg", "boots", "val"),
        ("shoes.zip/valid/boots/1.jpg", "boots", "valid"),
        ("shoes.zip/test/boots/1.jpg", "boots", "test"),
        ("shoes.zip/testing/boots/1.jpg", "boots", "testing"),
        ("shoes.zip/Training/boots/1.jpg", "boots", "Training"),
        # A file directly in a split folder has no class folder.
        ("shoes.zip/root/training/1.jpg", "", "training"),
        ("shoes.zip/VALIDATION/1.jpg", "", "VALIDATION"),
        ("shoes.zip/test/1.jpg", "", "test"),
        # A file directly in the archive root, or a loose file, has no class folder.
        ("shoes.zip/1.jpg", "", ""),
        ("photo.jpg", "", ""),
        # Non-ASCII and spaces in folder names are kept as they are.
        ("clothes.zip/Jaket Denim/é 1.jpg", "Jaket Denim", ""),
    ],
)
def test_layout_label_and_split(member_path, label, split):
    assert class_label(member_path) == label
    assert source_split(member_path) == split
