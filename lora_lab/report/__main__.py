"""python -m lora_lab.report: see lora_lab/report/__init__.py."""

import sys

from lora_lab.report import main

sys.exit(main())
