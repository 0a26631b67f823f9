import sys

from mumu_core.eval.cli import main

sys.exit(main())
