import sys

from rulesvc.cli import main

sys.exit(main())
