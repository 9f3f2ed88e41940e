import sys

from klipstream.cli import main

sys.exit(main())
