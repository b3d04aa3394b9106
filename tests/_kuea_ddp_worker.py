"""torchrun worker for tests/test_kuea_ddp.py: the finetune stage's command (`cli.cmd_finetune`) on every rank.

Usage, from a directory holding the study's stage outputs under results/<study>/:
    torchrun --nproc_per_node=W tests/_kuea_ddp_worker.py CFG_JSON
"""

import json
import sys
from argparse import Namespace
from pathlib import Path

from dinorankclip.cli import cmd_finetune
from dinorankclip.tracking import NullTracker

if __name__ == "__main__":
    cmd_finetune(json.loads(Path(sys.argv[1]).read_text()), Namespace(source=None), NullTracker())
