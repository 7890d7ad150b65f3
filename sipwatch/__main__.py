import os
import sys

from .heap import early_choice

# before anything else is imported: see sipwatch.heap
early_choice(sys.argv[1:], os.environ)

from .cli import main  # noqa: E402

sys.exit(main())
