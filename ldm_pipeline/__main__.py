"""`python -m ldm_pipeline ...` is the `ldm` command."""

import sys

from ldm_pipeline.cli import main

sys.exit(main())
