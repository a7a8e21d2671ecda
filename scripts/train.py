#!/usr/bin/env python
"""Train any stage from a YAML config: see ``ldm/cli/train.py`` (also installed as ``ldm-train``)."""
import sys

from ldm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
