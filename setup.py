from setuptools import find_packages, setup

# Metadata lives in setup.cfg. The packages are listed here because setup.cfg cannot add a mapped
# package to `find:`: the repository's top-level recipes/ (where a clone runs `accelerate launch
# recipes/a100_40g.yaml`) ships inside the wheel as the data-only package vggt_fsdp.recipes, so an
# installed package has its recipes and SLURM script too (vggt_fsdp/bundled.py finds them either way).
setup(
    packages=find_packages(include=["vggt_fsdp", "vggt_fsdp.*"]) + ["vggt_fsdp.recipes"],
    package_dir={"vggt_fsdp.recipes": "recipes"},
)
