"""``python -m zopro.train``: see :mod:`zopro.train.program`."""

import sys

from zopro.train.program import main

sys.exit(main())
