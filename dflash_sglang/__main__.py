import sys

from dflash_sglang.cli import main

sys.exit(main())
