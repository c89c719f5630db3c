"""The memory-mapped store of anomaly sources and their SLIC labels."""

import concurrent.futures
import multiprocessing
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from twostage_jax import data
from twostage_jax import synthesis
from twostage_jax.synthesis import source_store
from twostage_jax.synthesis import superpixel

SIZE = 32
N_SEGMENTS = (30, 150)


def write_sources(folder, count=5):
  rng = np.random.default_rng(0)
  for i in range(count):
    sub = folder / ('a' if i % 2 else 'b')
    sub.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(sub / f'texture_{i}.png')


def build(folder, cache, processes=1, n_segments=N_SEGMENTS):
  return synthesis.build_source_store(str(folder) if folder else '', SIZE, n_segments, 8.0,
                                      1.0, str(cache), num_processes=processes)


def test_store_holds_the_decoded_sources_and_their_slic_labels(tmp_path):
  write_sources(tmp_path / 'src')
  store = build(tmp_path / 'src', tmp_path / 'cache')
  expected = synthesis.load_anomaly_sources(str(tmp_path / 'src'), SIZE)
  assert len(store) == 5 and store.image_shape == (SIZE, SIZE, 3)
  assert store.n_segments == N_SEGMENTS
  np.testing.assert_array_equal(store.images, np.stack(expected))
  for n in N_SEGMENTS:
    labels = store.labels(n)
    assert labels.dtype == np.uint16 and labels.shape == (5, SIZE, SIZE)
    for image, label in zip(expected, labels):
      np.testing.assert_array_equal(label, superpixel.slic_labels(image, n, 8.0, 1.0))
  # Memory-mapped, read-only: workers share the page cache, nobody writes.
  assert isinstance(store.images, np.memmap) and not store.images.flags.writeable
  with pytest.raises(KeyError, match='not 250'):
    store.labels(250)


def test_store_is_built_once_and_pickles_as_its_folder(tmp_path, monkeypatch):
  write_sources(tmp_path / 'src')
  store = build(tmp_path / 'src', tmp_path / 'cache')
  written = []
  monkeypatch.setattr(source_store, '_write', lambda *args: written.append(args))
  again = build(tmp_path / 'src', tmp_path / 'cache')
  assert not written and again.folder == store.folder
  assert os.listdir(tmp_path / 'cache' / 'sources') == [os.path.basename(store.folder)]
  payload = pickle.dumps(store)
  assert len(payload) < 1000  # the path, not the arrays
  restored = pickle.loads(payload)
  assert isinstance(restored.images, np.memmap)
  np.testing.assert_array_equal(restored.labels(30), store.labels(30))
  # An in-memory store pickles its arrays.
  small = synthesis.SourceStore.from_images(list(store.images[:2]), (30,), 8.0, 1.0)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(small)).labels(30), small.labels(30))


def test_a_changed_folder_or_setting_builds_a_new_store(tmp_path):
  write_sources(tmp_path / 'src')
  first = build(tmp_path / 'src', tmp_path / 'cache')
  other_segments = build(tmp_path / 'src', tmp_path / 'cache', n_segments=(30,))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'src' / 'new.png')
  more = build(tmp_path / 'src', tmp_path / 'cache')
  assert len({first.folder, other_segments.folder, more.folder}) == 3
  assert len(more) == 6 and len(first) == 5


def test_builtin_sources_make_a_store(tmp_path):
  store = build(None, tmp_path, processes=2)
  assert os.path.basename(store.folder).startswith('builtin-32px-')
  np.testing.assert_array_equal(store.images,
                                np.stack(synthesis.load_anomaly_sources('', SIZE)))


def test_bad_source_folders_are_named(tmp_path):
  with pytest.raises(ValueError, match='nowhere'):
    build(tmp_path / 'nowhere', tmp_path / 'cache')
  write_sources(tmp_path / 'src', count=2)
  (tmp_path / 'src' / 'broken.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(data.DatasetError, match='broken.jpg'):
    build(tmp_path / 'src', tmp_path / 'cache')
  # The failed build leaves no store and no half-written folder behind.
  assert not os.listdir(tmp_path / 'cache' / 'sources')


def _build_in_process(folder, cache):
  return build(folder, cache).folder


def test_concurrent_builders_end_with_one_store(tmp_path):
  write_sources(tmp_path / 'src', count=8)
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
    folders = list(pool.map(_build_in_process, [tmp_path / 'src'] * 2,
                            [tmp_path / 'cache'] * 2))
  assert folders[0] == folders[1]
  assert os.listdir(tmp_path / 'cache' / 'sources') == [os.path.basename(folders[0])]
  assert len(synthesis.SourceStore.open(folders[0])) == 8


def test_image_store_is_identified_by_the_image_content(tmp_path):
  images = np.random.default_rng(3).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
  store = synthesis.build_image_store(images, 'bottle-train', N_SEGMENTS, 8.0, 1.0,
                                      str(tmp_path), num_processes=1)
  np.testing.assert_array_equal(store.images, images)
  np.testing.assert_array_equal(store.labels(30)[2],
                                superpixel.slic_labels(images[2], 30, 8.0, 1.0))
  assert os.path.basename(store.folder).startswith('bottle-train-32px-')
  same = synthesis.build_image_store(images.copy(), 'bottle-train', N_SEGMENTS, 8.0, 1.0,
                                     str(tmp_path), num_processes=1)
  changed = images.copy()
  changed[0, 0, 0, 0] ^= 1
  other = synthesis.build_image_store(changed, 'bottle-train', N_SEGMENTS, 8.0, 1.0,
                                      str(tmp_path), num_processes=1)
  assert same.folder == store.folder != other.folder
  with pytest.raises(ValueError, match=r'uint8 \(N, S, S, 3\)'):
    synthesis.build_image_store(images[:, :, :30], 'x', N_SEGMENTS, 8.0, 1.0, str(tmp_path), 1)
