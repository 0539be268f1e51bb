"""
C{python -m mailfw}: the same as the C{mailfw} command.
"""

import sys

from mailfw.admin._main import main

sys.exit(main())
