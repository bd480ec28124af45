import sys

from ihd_node.cli import main

sys.exit(main())
