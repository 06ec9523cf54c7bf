import sys

from .hf2mcore import main

sys.exit(main())
