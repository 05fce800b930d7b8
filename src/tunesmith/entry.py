"""How a child process runs tunesmith's command line: `python -c SAFE_ENTRY ARGS` (the dashboard's
trainer, torchrun's ranks). `python -m tunesmith.cli` would put the working folder first on the
module path, and a file there named like a module tunesmith imports (a cloned project's yaml.py)
would run in the trainer."""

SAFE_ENTRY = "import sys; sys.path[:] = [p for p in sys.path if p]; from tunesmith.cli import main; sys.exit(main())"
