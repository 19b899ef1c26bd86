"""One progress bar for long work, counting images (not batches).

Shown on stderr only when it is a terminal, only after :data:`DELAY` seconds (short work stays
silent) and never with ``progress=False``. Used by ``extract``, ``score_model`` and ``Detector``.
"""

from __future__ import annotations

from tqdm.auto import tqdm

#: seconds of work before a bar appears
DELAY = 2.0


def bar(total: int | None, desc: str, progress: bool = True) -> tqdm:
    """A tqdm bar over ``total`` images; call ``.update(n_images)`` per batch and ``.close()``."""
    return tqdm(total=total, desc=desc, unit="img", disable=None if progress else True, delay=DELAY, leave=False)
