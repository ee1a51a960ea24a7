"""`python -m host.deploy …` (same as `netadapt-deploy`)."""

import sys

from host.cli.netadapt_deploy import main

sys.exit(main())
