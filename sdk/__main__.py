import sys

from sdk.cli import main

sys.exit(main())
