"""`python -m flows STAGE`: the command of every dvc.yaml stage (flows/stages.py).

The garbage collector stays off while the process imports (`flows.stages.imports_done` turns it back on
before the stage's own work) and everything alive at the end is frozen, so that the collections at exit
do not walk the million objects of torch, Prefect and pydantic again (~1 s on 2 cores)."""
import gc
import sys

gc.disable()

from flows.stages import main  # noqa: E402

try:
    code = main()
finally:
    gc.freeze()
sys.exit(code)
