import sys

from ihd_node.commands.cli import main

sys.exit(main())
