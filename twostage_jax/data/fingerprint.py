"""What a category's files hold, so a trained run recognises its data in a new place.

A run learns from the content of its images, not from where they lie: a
dataset moved after training is the same data when every file it reads
holds the same bytes under the same path relative to the category folder.
"""

import hashlib
import os

from twostage_jax.data import mvtec

_DIGEST_BYTES = 16
_LISTED = 5  # files named per kind of difference


def category_contents(data_dir: str, category: str) -> dict[str, str]:
  """{path relative to the category folder: BLAKE2b of its bytes} of every file read.

  The files are the training images and the test split's images and masks.

  Raises:
    DatasetError: naming the problem, as reading the category would.
  """
  test = mvtec.test_files(data_dir, category)
  paths = (mvtec.train_files(data_dir, category) + test.paths
           + tuple(path for path in test.mask_paths if path is not None))
  folder = mvtec.category_dir(data_dir, category)
  contents = {}
  for path in paths:
    with open(os.path.join(folder, path), 'rb') as f:
      contents[path] = hashlib.blake2b(f.read(), digest_size=_DIGEST_BYTES).hexdigest()
  return contents


def differences(expected: dict[str, str], found: dict[str, str]) -> list[str]:
  """Lines naming the files missing, added or changed in `found`; [] when the same."""
  kinds = (('missing', sorted(set(expected) - set(found))),
           ('added', sorted(set(found) - set(expected))),
           ('changed', sorted(p for p in set(expected) & set(found) if expected[p] != found[p])))
  lines = []
  for kind, paths in kinds:
    if paths:
      more = f' and {len(paths) - _LISTED} more' if len(paths) > _LISTED else ''
      lines.append(f'{len(paths)} {kind}: {", ".join(paths[:_LISTED])}{more}')
  return lines
