import sys

from leash.cli import main

sys.exit(main())
