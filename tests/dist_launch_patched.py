"""`python dist_launch_patched.py CONFIG MODE`: `tunesmith train CONFIG --nproc 2` launched as the
command line launches it (training/distributed.py launch), each rank changed as tests/dist_patched.py's
MODE says."""
import sys
from pathlib import Path

from tunesmith import entry
from tunesmith.training.distributed import launch

config, mode = sys.argv[1], sys.argv[2]
patched = str(Path(__file__).with_name("dist_patched.py"))
entry.SAFE_ENTRY = (f"import runpy, sys; sys.argv = ['dist_patched.py', {config!r}, {mode!r}]; "
                    f"runpy.run_path({patched!r}, run_name='__main__')")
sys.exit(launch(2, ["train", config]))
