"""Setuptools entry point; the project metadata is in setup.cfg.

`pip install -e .` maps glm5_jax.data / .sharding / .configs onto top-level folders, so setuptools installs
them through an import hook and prints an "Editable installation" note telling users to beware of folders
named like the package in the working directory. That is expected for this layout (the repository root has
no folder named glm5_jax other than the package itself); the note is hidden so an install prints no warning.
"""

import warnings

from setuptools import setup
from setuptools.warnings import InformationOnly

warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
setup()
