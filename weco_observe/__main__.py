from .cli import main_weco

# Help and error hints name the command as typed (`python -m weco_observe observe log ...`).
main_weco(prog_name="python -m weco_observe")
