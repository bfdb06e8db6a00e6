"""`python -m dmvae_study.report <results/study-dir> [--out DIR]`."""

import sys

from dmvae_study.report.build import main

sys.exit(main())
