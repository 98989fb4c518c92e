import sys

from slao_kernels.cli import main

sys.exit(main())
