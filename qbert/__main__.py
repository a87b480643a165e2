import sys

from qbert.cli import main

sys.exit(main())
