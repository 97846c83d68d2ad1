"""`python -m raycompress ...`: the same command line as the `raycompress` entry point, for
environments where the script is not on the PATH (a Ray job's working directory, a container)."""
import sys

from raycompress.cli import main

sys.exit(main())
