"""`python -m jpaged` runs the `jpaged` command line."""
import sys

from jpaged.cli import main

sys.exit(main())
