import sys

from erasus.cli import main

sys.exit(main())
