from .cli import main_weco

main_weco()
