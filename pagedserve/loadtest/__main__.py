"""``python -m pagedserve.loadtest ...``: the same as ``pagedserve loadtest ...``."""

import logging
import sys

from pagedserve.loadtest.cli import main

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main())
