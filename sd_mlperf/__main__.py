"""`python -m sd_mlperf` runs the CLI."""

import sys

from sd_mlperf.cli import main

sys.exit(main())
