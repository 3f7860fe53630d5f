"""`python -m pagedserve.entrypoints.openai [MODEL] [flags]`: the server without the CLI."""

import sys

from pagedserve.entrypoints.openai.server import main

sys.exit(main())
