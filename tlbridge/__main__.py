"""`python -m tlbridge ...`: the same as the `tlbridge` console script."""
from .cli import main

raise SystemExit(main())
