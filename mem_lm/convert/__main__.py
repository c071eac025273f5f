"""`python -m mem_lm.convert`: see mem_lm/convert/__init__.py."""
import sys

from mem_lm.convert import main

sys.exit(main())
