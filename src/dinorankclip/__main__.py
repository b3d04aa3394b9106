"""`python -m dinorankclip`: the same entry point as the `dinorankclip` console script."""

import sys

from dinorankclip.cli import main

sys.exit(main())
