"""`python -m gsa_kernels.demo`: the package's end-to-end demo (see gsa_kernels/demo/pipeline.py)."""
import sys

from .pipeline import main

if __name__ == "__main__":
    sys.exit(main())
