"""Migration scripts. This file only makes the folder a package so it ships in the wheel."""
