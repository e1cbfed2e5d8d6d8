import sys

from elemta.cli.elemta import main

sys.exit(main())
