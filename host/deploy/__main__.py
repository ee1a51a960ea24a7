"""`python -m host.deploy …` (same as `netadapt-deploy`)."""

import sys

from host.deploy.cli import main

sys.exit(main())
