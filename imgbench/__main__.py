"""Run the imgbench command line: ``python -m imgbench report|compare ...``."""

from imgbench.cli import main

raise SystemExit(main())
