#!/usr/bin/env python
"""Sample images: see ``ldm/cli/sample.py`` (also installed as ``ldm-sample``)."""
import sys

from ldm.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
