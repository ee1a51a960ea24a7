"""`python -m device_server serve …` (same as `netadapt-device`)."""

import sys

from device_server.cli import main

sys.exit(main())
