import sys

from autoopt.cli import main

sys.exit(main())
