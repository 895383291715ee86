"""`python -m lsm ...` is the `lsm` command."""
from lsm.cli import main

raise SystemExit(main())
