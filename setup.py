from setuptools import setup

# All metadata lives in setup.cfg; this file only lets `pip install -e .` work with older pips.
setup()
