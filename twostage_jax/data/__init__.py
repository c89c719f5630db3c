"""Dataset reading: MVTec AD layout folders, their tfds cache, new images, the demo set."""

from twostage_jax.data.cache import default_cache_dir
from twostage_jax.data.demo import DEMO_CATEGORIES
from twostage_jax.data.demo import ensure_demo_dataset
from twostage_jax.data.errors import DatasetError
from twostage_jax.data.fingerprint import category_contents
from twostage_jax.data.fingerprint import differences as content_differences
from twostage_jax.data.folder import FolderImages
from twostage_jax.data.folder import load_image_folder
from twostage_jax.data.holdout import split_holdout
from twostage_jax.data.holdout import training_images
from twostage_jax.data.images import image_size_of
from twostage_jax.data.images import integers_to_unit
from twostage_jax.data.images import read_mask
from twostage_jax.data.images import read_rgb
from twostage_jax.data.mvtec import list_categories
from twostage_jax.data.mvtec import load_test_set
from twostage_jax.data.mvtec import load_train_images
from twostage_jax.data.mvtec import TestSet
from twostage_jax.data.resolve import category_test_set
from twostage_jax.data.resolve import category_train_images
from twostage_jax.data.resolve import check_test_split
from twostage_jax.data.resolve import DATA_CACHES
from twostage_jax.data.resolve import resolve_data_dir

__all__ = [
    'DATA_CACHES', 'DEMO_CATEGORIES', 'DatasetError', 'FolderImages', 'TestSet',
    'category_contents', 'category_test_set', 'category_train_images', 'check_test_split',
    'content_differences', 'default_cache_dir', 'ensure_demo_dataset', 'image_size_of',
    'integers_to_unit', 'list_categories',
    'load_image_folder', 'load_test_set', 'load_train_images', 'read_mask', 'read_rgb',
    'resolve_data_dir', 'split_holdout', 'training_images',
]
