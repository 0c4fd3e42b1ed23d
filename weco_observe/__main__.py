import sys

from .cli import app, run

# Help and error hints name the command as typed (`python -m weco_observe observe log ...`).
sys.exit(run(app, prog_name="python -m weco_observe"))
