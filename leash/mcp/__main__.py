import sys

from leash.mcp.cli import main

sys.exit(main())
