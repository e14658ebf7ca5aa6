"""`python -m flash_export.cli`: the flash-export command line."""

from flash_export.cli.main import run

run("python -m flash_export.cli")
