import sys

from popalign.cli import main

sys.exit(main())
