"""`python -m flash_export`: the flash-export command line."""

from flash_export.cli.main import run

run("python -m flash_export")
