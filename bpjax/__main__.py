import sys

from bpjax.cli import main

sys.exit(main())
