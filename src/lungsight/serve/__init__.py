"""``lungsight serve``: an upload page and a versioned JSON API that answer a study in seconds.

>>> from lungsight.serve import Settings, create_app
>>> app = create_app(Settings(data_dir="serve-data", keep_minutes=60))   # doctest: +SKIP

Uploads are read and de-identified in memory and deleted at once; only de-identified results are kept, for
``keep_minutes``. See ``docs/service.md``.
"""

from lungsight.serve.app import create_app, run
from lungsight.serve.settings import Settings

__all__ = ["Settings", "create_app", "run"]
