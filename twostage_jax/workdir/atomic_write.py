"""Whole-or-nothing file writes: a reader never sees a half-written file.

The text goes to a temporary file beside the target, is flushed to disk and
then replaces the target with one rename (atomic within a filesystem). A
crash or an error while writing leaves the previous file, or none, and no
temporary file behind. Run outputs that later runs read back (thresholds,
metrics, reports) are written this way.
"""

import json
import os
import uuid
from typing import Any


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically, creating its folder if needed."""
  write_bytes(path, text.encode('utf-8'))


def write_bytes(path: str, content: bytes) -> None:
  """Writes `content` to `path` atomically, creating its folder if needed."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  # Opened like any new file, so its permissions follow the umask.
  temporary = f'{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp'
  try:
    with open(temporary, 'xb') as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def write_json(path: str, value: Any) -> None:
  """Writes `value` as indented JSON to `path` atomically.

  The value is serialised before any file is touched, so a value JSON cannot
  hold raises TypeError with the previous file intact.
  """
  write_text(path, json.dumps(value, indent=2))
